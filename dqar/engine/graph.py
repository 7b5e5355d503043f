"""The graph executor: one whole-model evaluation (patch embedding, every block, final layer) per compiled graph.

Each distinct reuse row of a generation is a *pattern* (the layers that store are fixed per plan); its graph unrolls the
blocks with the row baked in as constants. The history is a `StaticHistory` of fixed buffers updated
in place; per-evaluation values (latents, timestep, labels, the (L, K) forecast weights) enter as
tensors, so new values never recompile. On CUDA the graphs use `torch.compile(mode="reduce-overhead")`,
which captures each one as a CUDA graph and replays it. At most `max_patterns` patterns get a graph
(the most frequent of a plan first); other evaluations run the same layer functions compiled per block
and walked in Python (the fallback), counted in the stats. Host-side bookkeeping (weights, bytes,
counts) happens before each call, never inside a replay. The verifying decider's evaluations run as two graphs, split
at its probe block (`evaluate_head`, `evaluate_tail`), with its verdict read on the host between them.
"""
from __future__ import annotations

import functools
import os
import time
import weakref
from collections import Counter
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F

from dqar.engine import block as B
from dqar.engine import history as H
from dqar.engine.adapter import DIT_CLASS, describe
from dqar.engine.cache import device_weights
from dqar.engine.forecasters import forecaster_of
from dqar.engine.reuse import ReuseEngine
from dqar.engine.variants import Variants, compiled_copy
from dqar.engine.stats import ReuseStats
from dqar.engine.verify import VerifyDecider, relative_l1
from dqar.errors import DqarError

GRAPH_HOOK = "dqar_graph"


# ----- the traceable evaluation ------------------------------------------------------------------
def layer(spec: H.Spec, reuse: bool, store: bool, share: str, blk, h, timestep, labels, bufs, weights, error_sum, bad):
    """One block with the decisions as constants; (B, T, C) → (B, T, C); the history `bufs` is updated in place.

    `share`: "none", or the CFG direction in which a computed attn1 output is shared (computed on one half).
    """
    if reuse:
        H.count_nonfinite(bufs, bad)
        cached = H.read(spec, bufs, weights, h.dtype)  # (B, T, C)
        return B.skip(h, cached) if spec.block else B.reuse(blk, h, timestep, labels, cached)
    out, cached = (B.whole if spec.block else B.compute)(blk, h, timestep, labels, share)
    if store:
        H.write(spec, bufs, cached, error_sum)
    return out


def _region(fn: Callable) -> Callable:
    """`fn` as a nested compile region where it can be one: torch.compile traces the 28 calls of a DiT-XL/2 evaluation
    but compiles each distinct (decision, shapes) once and stamps it out (about half the compile time of the unrolled
    graph of 28 tiny blocks on a CPU, docs/BENCHMARKS.md "Graph executor"). Only without autograd (sampling): the region
    operator refuses in-place history writes under grad mode. DQAR_NESTED_REGIONS=0, or a torch without it: `fn`."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    if region is None or os.environ.get("DQAR_NESTED_REGIONS", "1") == "0":
        return fn
    compiled = region(fn)

    def call(*args):
        return (fn if torch.is_grad_enabled() else compiled)(*args)  # a trace-time constant, guarded by dynamo
    return call


block_region = _region(layer)  # what the whole-model graphs call per block


def head(model, h, timestep, labels):
    """DiT's final layer and unpatchify, as in diffusers' forward: (B, T, C) → (B, C_out, H, W)."""
    conditioning = model.transformer_blocks[0].norm1.emb(timestep, labels, hidden_dtype=h.dtype)
    shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    h = model.proj_out_2(model.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
    p, side = model.patch_size, int(h.shape[1] ** 0.5)
    h = h.reshape(-1, side, side, p, p, model.out_channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(-1, model.out_channels, side * p, side * p)


def evaluate_head(spec, row, store, share, probe, checked, model, x, timestep, labels, weights, state):
    """The verifying decider's first graph: the layers before the probe (decided at the evaluation's start) and the probe
    computed, its store deferred to the verdict. Returns h (B, T, C) after the probe, the probe's value to store
    (residual or attention output, (B, T, C)) and ε () against its forecast (0 where `checked` is False: no history)."""
    layers, error_sum, bad = state
    blocks = model.transformer_blocks
    h = model.pos_embed(x)  # (B, T, C)
    for i in range(probe):
        h = block_region(spec, row[i], store[i], share, blocks[i], h, timestep, labels, layers[i], weights[i], error_sum, bad)
    out, cached = (B.whole if spec.block else B.compute)(blocks[probe], h, timestep, labels, share)
    error = relative_l1(cached, H.read(spec, layers[probe], weights[probe], h.dtype)) if checked else error_sum * 0
    return out, cached, error


def evaluate_tail(spec, row, store, share, probe, model, h, cached, timestep, labels, weights, state):
    """The verifying decider's second graph, per verdict: the probe's store, the layers after it, the final layer."""
    layers, error_sum, bad = state
    blocks = model.transformer_blocks
    if store[probe]:
        H.write(spec, layers[probe], cached, error_sum)
    for i in range(probe + 1, len(blocks)):
        h = block_region(spec, row[i], store[i], share, blocks[i], h, timestep, labels, layers[i], weights[i], error_sum, bad)
    return head(model, h, timestep, labels)


def evaluate(spec, row, store, share, model, x, timestep, labels, weights, state):
    """A whole model evaluation for one pattern; `state` = (per-layer buffers, error_sum, bad); (B, C, H, W) → (B, C', H, W)."""
    layers, error_sum, bad = state
    h = model.pos_embed(x)  # (B, T, C)
    for i, blk in enumerate(model.transformer_blocks):
        h = block_region(spec, row[i], store[i], share, blk, h, timestep, labels, layers[i], weights[i], error_sum, bad)
    return head(model, h, timestep, labels)


def check_graph_supported(engine_cfg, decider, transformer) -> None:
    """One line naming what to use for what the graph executor cannot run (the config, the decider's needs, the model)."""
    layout = describe(transformer)
    family = layout.family
    if not layout.is_dit:
        raise DqarError(f"the graph executor runs the class-conditional DiT ({DIT_CLASS}), not {family}", "use executor = 'patch'")
    if getattr(decider, "verifies", False) and not isinstance(decider, VerifyDecider):
        raise DqarError(f"{decider.name} reads its probe block's error inside the forward, which a graph cannot",
                        "use executor = 'patch'")
    needs = getattr(decider, "needs", None)
    if needs is not None and needs.any:
        raise DqarError("the gate, signal traces and policies run on the 'patch' executor, not 'graph'", "use executor = 'patch'")
    if engine_cfg.target == "kv":
        raise DqarError("the graph executor caches attention or block outputs, not K/V", "use target = 'attention' or executor = 'patch'")
    if engine_cfg.nonfinite_guard:
        raise DqarError("nonfinite_guard reads the cache on the host each evaluation, which a graph cannot", "use executor = 'compiled'")
    try:
        for blk in getattr(transformer, "transformer_blocks", []):
            B.check_block(blk)
    except DqarError as exc:
        raise DqarError(f"the graph executor runs DiT ada_norm_zero blocks only ({exc.problem})", "use executor = 'patch'") from None
    if not all(hasattr(transformer, n) for n in ("pos_embed", "proj_out_1", "proj_out_2", "norm_out")):
        raise DqarError(f"{type(transformer).__name__} is not a DiT transformer", "use executor = 'patch'")


class GraphEngine(ReuseEngine):
    """`ReuseEngine` whose transformer forward is one compiled graph per pattern (hooks and lifecycle shared).

    A pattern is (row, stores, CFG share): from `cfg_share_from` on, the host knows before each evaluation that attn1
    runs on one CFG half (`state.sharing`), so the share direction is a constant of that evaluation's graph.
    """

    def __init__(self, transformer: torch.nn.Module, cfg, decider, scheduler: Any = None):
        check_graph_supported(cfg, decider, transformer)
        self.spec = H.make_spec(cfg, transformer.transformer_blocks[0].attn1.heads)
        self.forecaster = forecaster_of(cfg)  # set on the shared history each generation (specs do not name the kind)
        # graphs and buffers outlive one attachment: a later handle on the same model and config reuses them (no recompiles)
        shared = _SHARED.setdefault(transformer, {})
        num_layers = len(transformer.transformer_blocks)

        def once(name: str, make: Callable[[], Any]) -> Any:  # built on the first handle of this model and spec only
            key = (name, self.spec)
            if key not in shared:
                shared[key] = make()
            return shared[key]

        self.history = once("history", lambda: H.StaticHistory(self.spec, num_layers, self.forecaster))
        self.graphs: dict[tuple, Callable] = once("graphs", dict)  # (shape, dtype, device, row, store, share) -> graph
        self.compile_seconds: dict[tuple, float] = once("seconds", dict)  # key -> first call (compile + capture)
        # the fallback's layer function: one compiled copy per (reuse, store, share), shared by all (identical) layers,
        # so no code object sees more than the shapes and dtypes of one decision (dynamo's recompile limit is 8)
        self.layer_kernels = once("layers", lambda: Variants(layer, _decision_key))
        self.allowed: set[tuple] | None = None  # (row, share) patterns that get a graph in this generation (None: first come)
        self.guided: bool | None = None  # whether `allowed` assumed CFG batches (sharing from share_from on)
        self.stores: tuple[bool, ...] | None = None  # layers that store what they compute in this generation
        self.table: list | None = None  # (E, L, K) forecast weights of a plan's generation (host)
        self.table_device: torch.Tensor | None = None
        self.generation = {"graphs": set(), "fallback": 0, "fallback_rows": set(), "compile": 0.0}
        super().__init__(transformer, cfg, decider, scheduler, executor="graph")

    def _attach(self) -> None:
        """The graph forward first, so the evaluation hook (registered after it) wraps it: decisions, then the graph."""
        from dqar.engine.hooks import EVALUATION_HOOK, EvaluationHook, LayerHook, add_hook, refresh_child_registries

        self._hooked.append((self.transformer, GRAPH_HOOK, add_hook(self.transformer, GRAPH_HOOK, LayerHook(self.forward))))
        self._hooked.append((self.transformer, EVALUATION_HOOK, add_hook(self.transformer, EVALUATION_HOOK, EvaluationHook(self))))
        refresh_child_registries(self.transformer)

    def begin_generation(self, num_evaluations: int, scheduler: Any = None, guided: bool | None = None) -> None:
        super().begin_generation(num_evaluations, scheduler, guided)
        self.generation = {"graphs": set(), "fallback": 0, "fallback_rows": set(), "compile": 0.0}
        self.guided = guided is not False  # unknown: assume CFG batches until an evaluation shows otherwise
        self.allowed = self._allowed_patterns()
        self.stores = self._store_set()
        self.table = self._weight_table(num_evaluations)
        self.table_device: torch.Tensor | None = None  # (E, L, K) on the device, uploaded at the first evaluation

    def _new_cache(self, num_layers: int) -> H.StaticHistory:
        """The static history, emptied: the summary reads bytes, entries, forecasts and errors from it."""
        self.history.forecaster = self.forecaster
        self.history.begin()
        return self.history

    def _share(self, evaluation: int, guided: bool) -> str:
        """The CFG share direction of an evaluation ("none" before `cfg_share_from` or without CFG batches)."""
        return self.cfg.cfg_share if guided and 0 <= self.state.share_from <= evaluation else "none"

    def _allowed_patterns(self) -> set[tuple] | None:
        """The `max_patterns` most frequent (row, share) patterns of a plan; None for a decider whose rows are not known ahead."""
        rows = getattr(self.decider, "_rows", None)
        if not rows:
            return None
        patterns = pattern_counts(rows, lambda e: self._share(e, self.guided))
        return {p for p, _ in patterns.most_common(self.cfg.max_patterns)}

    def _weight_table(self, num_evaluations: int) -> list | None:
        """(E, L, K) forecast weights of the generation on the host, for a plan (rows and stores known ahead); None otherwise."""
        rows, stores = getattr(self.decider, "_rows", None), getattr(self.decider, "_store", None)
        if not self.forecaster.extrapolates or not rows or not stores or len(rows) != num_evaluations:
            return None
        stores = [self.stores] * num_evaluations if self.stores is not None else stores
        return H.weight_table(len(self.blocks), self.forecaster, self.spec.slots, rows, stores, self.state.positions)

    def _store_set(self) -> tuple[bool, ...] | None:
        """Layers that store every output they compute: those any evaluation of the plan stores (None: per evaluation).

        A graph per row, not per (row, store) pair: a computing layer the plan reuses always stores. The reuses read
        the same history as under the decider's store rows (each needs the newest computed outputs only).
        """
        stores = getattr(self.decider, "_store", None)
        return tuple(bool(any(col)) for col in zip(*stores)) if stores else None

    def _check_finite(self, st) -> None:
        """Reuses of non-finite histories are counted inside the graphs (nonfinite_guard is refused)."""

    # ----- one evaluation --------------------------------------------------------------------------
    def forward(self, original, hidden_states, timestep=None, class_labels=None, cross_attention_kwargs=None, return_dict=True, **_):
        """The transformer's forward: host bookkeeping, then one graph (or the per-block fallback). (B, C, H, W) → (B, C', H, W)."""
        st, x = self.state, hidden_states
        timestep = _as_batch(timestep, x)
        layers = self.history.use(_token_shape(self.transformer, x), x.dtype, x.device)
        if self.verifier is not None and self.verifier.active[st.evaluation]:
            out = self._verified(st, x, timestep, class_labels, layers)
            return (out,) if not return_dict else _output(out)
        row = tuple(bool(r) and self.history.has(i) for i, r in enumerate(st.row))
        store = self.stores if self.stores is not None else tuple(bool(s) for s in st.store)
        st.executed[st.evaluation] = row
        share = self.cfg.cfg_share if st.sharing else "none"
        if st.sharing:
            st.shared[st.evaluation] = [not r for r in row]  # attn1 of every computing layer runs on one half
        elif self.guided and (x.shape[0] % 2 or self._share(st.evaluation, True) != "none"):  # no CFG batch: plain patterns
            self.guided = False
            self.allowed = self._allowed_patterns()
        weights = self._weights(st.evaluation, self.history.step(row, store), x.device)  # (L, K)
        out = self._run(row, store, share, x, timestep, class_labels, weights, layers)
        return (out,) if not return_dict else _output(out)

    def _weights(self, evaluation: int, rows: list[list[float]], device: torch.device) -> torch.Tensor:
        """The static (L, K) weights buffer, filled on the device: unused at order 0 (a copy reads one slot), else
        from the generation's table (one upload per generation) or, for deciders without known rows, this evaluation's."""
        buf = self.history.weight_buffer(device)
        if not self.forecaster.extrapolates:
            return buf
        if self.table is not None and self.table[evaluation] == rows:
            if self.table_device is None:
                with torch.inference_mode(False):
                    flat = tuple(w for t in self.table for r in t for w in r)
                    self.table_device = device_weights(flat, device).reshape(len(self.table), *buf.shape)
            buf.copy_(self.table_device[evaluation])  # device → device
        else:
            buf.copy_(device_weights(tuple(w for r in rows for w in r), device).reshape(buf.shape))
        return buf

    def _run(self, row, store, share, x, timestep, labels, weights, layers) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device, row, store, share)
        allowed = self.allowed is None or (row, share) in self.allowed  # the bound holds per plan
        graph = self.graphs.get(key) if allowed else None
        if key not in self.graphs and (self.allowed is None and len(self.graphs) < self.cfg.max_patterns or
                                       self.allowed is not None and allowed):
            graph = self.graphs[key] = self._compile(row, store, share, x.device)
        if graph is None:
            self.generation["fallback"] += 1
            self.generation["fallback_rows"].add("".join("R" if r else "." for r in row))
            return self._fallback(row, store, share, x, timestep, labels, weights, layers)
        out = self._timed(key, graph, x.device, (x, timestep, labels, weights, layers))
        return out.clone()  # a CUDA-graph replay overwrites its outputs: hand out a copy (on every device, so tests see it)

    def _verified(self, st, x, timestep, labels, layers) -> torch.Tensor:
        """An evaluation the verifying decider decides: the head graph up to the probe, the verdict on the host (one read of
        ε where the interval bounds do not decide), then the tail graph of that verdict's rows. Graphs per (rows before the
        probe, stores, history present) and per (rows after it, stores): a handful (both groups' rows are uniform)."""
        d, p, e = self.verifier, self.verifier.probe, st.evaluation
        share = self.cfg.cfg_share if st.sharing else "none"
        checked = self.history.has(p)
        before = tuple(bool(r) and self.history.has(i) for i, r in enumerate(st.row[:p]))
        pre = before + (checked,) + (False,) * (len(self.blocks) - p - 1)  # the probe's forecast weights, as if it reused
        weights = self._weights(e, H.row_weights(self.history.where, pre, self.history.position, self.forecaster,
                                                 self.spec.slots), x.device)  # (L, K)
        key = ("head", tuple(x.shape), x.dtype, x.device, before, tuple(st.store[:p]), checked, share)
        h, cached, error = self._call(key, evaluate_head, (pre, tuple(st.store), share, p, checked),
                                      (x, timestep, labels, weights, layers))
        row, store, read = d.verdict(e, error if checked else None)
        st.host_syncs += read
        row = tuple(bool(r) and self.history.has(i) for i, r in enumerate(row))
        st.row, st.store = row, store
        st.executed[e] = row
        if st.sharing:
            st.shared[e] = [not r for r in row]
        weights = self._weights(e, self.history.step(row, store), x.device)
        key = ("tail", tuple(x.shape), x.dtype, x.device, row[p + 1:], tuple(store[p:]), share)
        return self._call(key, evaluate_tail, (row, tuple(store), share, p), (h.clone(), cached.clone(), timestep, labels,
                                                                                weights, layers)).clone()

    def _call(self, key: tuple, fn: Callable, constants: tuple, args: tuple):
        """`fn` compiled once per key with `constants` baked in (shared by later handles), called on `args`."""
        graph = self.graphs.get(key)
        if graph is None:
            mode = "reduce-overhead" if key[3].type == "cuda" else None
            graph = self.graphs[key] = functools.partial(compiled_copy(fn, f"dqar_{key[0]}_{len(self.graphs)}", mode), self.spec,
                                                         *constants)
        return self._timed(key, graph, key[3], args)

    def _timed(self, key: tuple, graph: Callable, device: torch.device, args: tuple):
        """One call of a graph: counted in the generation, its first call's seconds (the compile) recorded per key."""
        self.generation["graphs"].add(key)
        first = key not in self.compile_seconds
        start = time.perf_counter()
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        out = graph(self.transformer, *args)
        if first:
            self.compile_seconds[key] = time.perf_counter() - start
            self.generation["compile"] += self.compile_seconds[key]
        return out

    def _compile(self, row, store, share, device) -> Callable:
        graph = compiled_copy(evaluate, f"dqar_pattern_{len(self.graphs)}", "reduce-overhead" if device.type == "cuda" else None)
        return functools.partial(graph, self.spec, row, store, share)

    def _fallback(self, row, store, share, x, timestep, labels, weights, state) -> torch.Tensor:
        """The same layers, compiled once per decision (shared by all layers) and walked in Python."""
        layers, error_sum, bad = state
        h = self.transformer.pos_embed(x)  # (B, T, C)
        for i, blk in enumerate(self.blocks):
            h = self.layer_kernels(self.spec, row[i], store[i], share, blk, h, timestep, labels, layers[i], weights[i], error_sum, bad)
        return head(self.transformer, h, timestep, labels)

    # ----- stats -----------------------------------------------------------------------------------
    def _summarize(self, st) -> ReuseStats:
        g = self.generation
        return replace(super()._summarize(st), graphs=len(g["graphs"]), fallback_evaluations=g["fallback"],
                       fallback_rows=sorted(g["fallback_rows"]), compile_seconds=round(g["compile"], 3))


def pattern_counts(rows, share: Callable[[int], str]) -> Counter:
    """How many evaluations run each (row, CFG share) pattern; `share(e)`: the share direction of evaluation e."""
    return Counter((tuple(bool(r) for r in row), share(e)) for e, row in enumerate(rows))


def _decision_key(spec, reuse, store, share, *_) -> tuple:
    """What the fallback's layer function specializes on besides shapes (the spec is fixed per engine)."""
    return reuse, store, share


_SHARED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()  # transformer -> graphs, buffers


def _as_batch(timestep, x: torch.Tensor) -> torch.Tensor:
    """The timestep as a (B,) tensor on the latents' device (a Python number becomes a host→device copy)."""
    if not torch.is_tensor(timestep):
        return torch.full((x.shape[0],), float(timestep), device=x.device)
    if timestep.ndim == 0:
        return timestep.to(x.device).expand(x.shape[0])
    return timestep


def _token_shape(model, x: torch.Tensor) -> tuple[int, int, int]:
    """(B, T, C): the token shape of the blocks' hidden states for latents `x` (B, C, H, W)."""
    p = model.patch_size
    return x.shape[0], (x.shape[-2] // p) * (x.shape[-1] // p), model.inner_dim


def _output(sample: torch.Tensor):
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)
