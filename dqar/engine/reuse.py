"""The reuse engine: diffusers hooks on each block's `attn1` (or the whole block) execute host-side decisions.

Decisions are taken once per model evaluation by a *decider* (`dqar.engine.decider`: a plan,
the gate, a policy) and read from a host tuple inside each layer: no device→host reads on the
plan path. All state lives in `ReuseEngine` and its per-generation `GenerationState`; the
modules only get named hooks in their diffusers `HookRegistry` (`dqar.engine.hooks`), and
`detach` removes them, leaving other libraries' hooks in place.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dqar.engine import branches, forecast, forwards, verify, verify_rows
from dqar.engine.adapter import check_family, describe
from dqar.engine.cache import LayerCache, StorePolicy
from dqar.engine.row_cache import RowCache
from dqar.engine.codec import Codec
from dqar.engine.config import ReuseConfig
from dqar.engine.decider import Decider, DeciderContext
from dqar.engine.executors import EXECUTORS
from dqar.engine.forecasters import forecaster_of
from dqar.engine.flops import FlopModel, counted_flops, counted_model, dit_model, shape_key
from dqar.engine.fused import check_supported, fused_forward, make_kernels
from dqar.engine.hooks import (ATTENTION_HOOK, BLOCK_HOOK, EVALUATION_HOOK, EvaluationHook, LayerHook, add_hook, has_hook,
                               refresh_child_registries, remove_hook)
from dqar.engine.signals import Needs, SignalRecorder, is_plain_attention
from dqar.engine.stats import ReuseStats, summarize
from dqar.errors import DqarError


UNSET = object()  # a GenerationState field not known until the generation's first forward


@dataclass
class GenerationState:
    """Everything that changes during one generation; replaced at the start of the next."""

    num_evaluations: int
    cache: LayerCache
    executed: np.ndarray  # (E, L) bool: reuse actually executed
    rows_per_eval: list[int]  # batch rows of each evaluation (2N with CFG)
    timesteps_ref: Any = None  # the scheduler's timesteps object this generation belongs to
    evaluation: int = -1
    row: tuple[bool, ...] = ()
    store: tuple[bool, ...] = ()
    host_syncs: int = 0
    nonfinite: int = 0
    shape: tuple[int, int] = (0, 0)  # latent (H, W)
    signals: SignalRecorder | None = None  # measured signals, when the decider needs any (None in a later CFG branch)
    recorder: SignalRecorder | None = None  # the generation's signals, whichever branch runs (`signals` mirrors it)
    signal_branch: Any = UNSET  # the CFG branch whose forwards the signals measure: the first one to run a forward
    share_from: int = -1  # CFG-branch sharing from this evaluation on (-1: never)
    guided: bool | None = None  # the batch is [conditional; unconditional] (None: look at the labels once)
    sharing: bool = False  # attn1 computes one CFG half in the current evaluation
    shared: np.ndarray | None = None  # (E, L) bool: attn1 computed on one half and copied to the other
    x_t: torch.Tensor | None = None  # the current evaluation's input, while its signals are measured
    positions: np.ndarray | None = None  # (E,) where each evaluation lies on the forecast axis (host)
    finished: int = 0  # evaluations whose forward has returned
    stats: ReuseStats | None = None  # the summary, once the generation has ended
    branch: str | None = None  # the cache context whose branch the fields above mirror (`dqar.engine.branches`)
    branches: dict = field(default_factory=dict)  # the other branches: context → Branch
    call: tuple | None = None  # (args, kwargs) of the first forward: its shapes give counted FLOPs (non-DiT families)
    row_share: np.ndarray | None = None  # (E, L) float: share of rows reused where per-sample refresh split the batch (0 elsewhere)
    split: Any = None  # this evaluation's per-sample split (`dqar.engine.verify_rows.Split`), or None


class ReuseEngine:
    """Attach reuse to a diffusers transformer (any family `dqar.engine.adapter` describes); detach restores it exactly."""

    def __init__(self, transformer: torch.nn.Module, cfg: ReuseConfig, decider: Decider, scheduler: Any = None,
                 executor: str = "patch"):
        if has_hook(transformer, EVALUATION_HOOK):
            raise DqarError("reuse is already attached to this transformer", "call handle.disable() before enabling it again")
        self.layout = describe(transformer)  # the layers and their output streams, from diffusers' block registry
        self.transformer = transformer
        self.cfg = cfg
        self.decider = decider
        self.scheduler = scheduler  # optional: a pipeline's scheduler, to detect new generations
        self.blocks = list(self.layout.blocks)
        self.slots = self.layout.slots  # first cache slot of each layer (one slot per output stream)
        if executor not in EXECUTORS:
            raise DqarError(f"unknown executor '{executor}'", f"choose one of: {', '.join(EXECUTORS)}")
        self.executor = executor  # "patch": hook attention / block; "fused"/"compiled": pure block functions (dqar.engine.fused)
        self.caps = EXECUTORS[executor]
        if executor == "graph" and type(self)._attach is ReuseEngine._attach:
            raise DqarError("the graph executor is dqar.engine.graph.GraphEngine", "enable it with dqar.enable(..., executor='graph')")
        self.needs: Needs = getattr(self.decider, "needs", None) or Needs()
        check_family(self.layout, cfg, self.needs, executor)
        if self.needs.any and not self.caps.signals or cfg.cfg_share != "none" and not self.caps.cfg_share:
            raise DqarError(f"the gate, signal traces and cfg_share run on the 'patch' executor, not '{executor}'", "use executor = 'patch'")
        if self.needs.entropy and not all(is_plain_attention(b.attn1) for b in self.blocks):
            raise DqarError("the entropy gate needs plain self-attention (no q/k norms, residual or rescaling)", "set gate = false")
        self.verifier = decider if getattr(decider, "verifies", False) else None  # its probe is measured in `forwards`
        if self.verifier is not None:
            verify.check(cfg, self.layout, executor)
        if self.caps.kernels:
            check_supported(cfg, self.blocks)
        self.forms: dict[int, int] = {}  # layer → its output's form (0 a tensor, n a tuple), seen when it computes
        self.context: str | None = None  # the pipeline's cache context ("cond" / "uncond"), set through the evaluation hook
        self.counting = False  # a FLOP count on fake tensors is running: the hooks pass through
        self._flop_counts: dict[tuple, dict[str, int]] = {}  # input shapes → counted FLOPs (non-DiT families)
        self.kernels = make_kernels(compile=self.caps.compile) if self.caps.kernels else None
        self.codec = self.kernels.codec if self.kernels is not None else Codec()
        self.state: GenerationState | None = None
        self.last_stats: ReuseStats | None = None
        self._hooked: list[tuple[torch.nn.Module, str, bool]] = []  # (module, hook name, registry created by dqar)
        self._attach()

    # ----- attach / detach -------------------------------------------------------------
    def _layer_forwards(self):
        """(module, hook name, forward(original, *args, **kwargs)) for every module the executor takes over."""
        if self.kernels is not None:
            return [(b, BLOCK_HOOK, functools.partial(fused_forward, self, i, b, self.kernels)) for i, b in enumerate(self.blocks)]
        inner = self.needs.entropy or self.cfg.cfg_share != "none"  # attn1 must measure or share inside whole blocks
        out = []
        for layer, block in enumerate(self.blocks):
            if self.cfg.granularity == "block":
                out.append((block, BLOCK_HOOK, functools.partial(forwards.block, self, layer)))
                if inner:
                    out.append((block.attn1, ATTENTION_HOOK, functools.partial(forwards.attention_compute, self, layer, block.attn1)))
            else:
                forward = forwards.kv if self.cfg.target == "kv" else forwards.attention
                attn = self.layout.attention_module(layer)
                out.append((attn, ATTENTION_HOOK, functools.partial(forward, self, layer, attn)))
        return out

    def _attach(self) -> None:
        self._hooked.append((self.transformer, EVALUATION_HOOK, add_hook(self.transformer, EVALUATION_HOOK, EvaluationHook(self))))
        for module, name, forward in self._layer_forwards():
            self._hooked.append((module, name, add_hook(module, name, LayerHook(forward))))
        refresh_child_registries(self.transformer)

    def detach(self) -> None:
        """Remove dqar's hooks (other hooks stay); a module nothing else hooks is exactly as before."""
        for module, name, created in reversed(self._hooked):
            remove_hook(module, name, created)
        self._hooked.clear()
        refresh_child_registries(self.transformer)
        self.state = None

    @property
    def attached(self) -> bool:
        return bool(self._hooked)

    # ----- generation lifecycle ----------------------------------------------------------
    def begin_generation(self, num_evaluations: int, scheduler: Any = None, guided: bool | None = None) -> None:
        """Reset all state for a generation of `num_evaluations` model evaluations.

        `guided`: the sampler batches [conditional; unconditional] rows (CFG); None lets the engine
        look at the class labels once (one host read) when CFG-branch sharing needs to know.
        """
        if num_evaluations < 1:
            raise DqarError(f"a generation needs at least one model evaluation, got {num_evaluations}", "use steps >= 1")
        num_layers = len(self.blocks)
        signals = SignalRecorder(self.needs, num_evaluations, num_layers, scheduler) if self.needs.any else None
        self.decider.begin(DeciderContext(num_evaluations, num_layers, scheduler, signals))
        share_from = -1
        if self.cfg.enabled and self.cfg.cfg_share != "none":
            share_from = math.ceil(self.cfg.cfg_share_from * num_evaluations)
        first = self._new_branch(num_evaluations)
        self.state = GenerationState(
            num_evaluations=num_evaluations,
            cache=first.cache,
            executed=first.executed,
            rows_per_eval=first.rows_per_eval,
            timesteps_ref=getattr(scheduler, "timesteps", None),
            positions=self._positions(num_evaluations, scheduler),
            signals=signals,
            recorder=signals,
            share_from=share_from,
            guided=guided,
            shared=first.shared,
            row_share=first.row_share,
            branch=self.context,
        )

    def _new_branch(self, num_evaluations: int) -> branches.Branch:
        num_layers = len(self.blocks)
        return branches.Branch(cache=self._new_cache(num_layers), executed=np.zeros((num_evaluations, num_layers), dtype=bool),
                               shared=np.zeros((num_evaluations, num_layers), dtype=bool), rows_per_eval=[],
                               row_share=np.zeros((num_evaluations, num_layers)))

    def _new_cache(self, num_layers: int):
        """The cache of a new generation: a `LayerCache` (the graph executor reuses its static history instead)."""
        cls = RowCache if self.cfg.verify_per_sample else LayerCache  # per-sample refresh: each row its own history
        return cls(self.layout.num_slots, self._policies(), self.cfg.track_quant_error, forecaster_of(self.cfg), self.codec)

    def _positions(self, num_evaluations: int, scheduler: Any) -> np.ndarray:
        """(E,) forecast-axis positions, from the scheduler's timesteps (read once per generation) for axis 'timestep'."""
        timesteps = getattr(scheduler, "timesteps", None)
        if not forecaster_of(self.cfg).extrapolates or self.cfg.forecast_axis != "timestep" or timesteps is None:
            return forecast.positions("evaluation", num_evaluations)
        return forecast.positions("timestep", num_evaluations, torch.as_tensor(timesteps).detach().cpu().double().numpy())

    def end_generation(self) -> ReuseStats | None:
        """Summarize the generation that just ran, once (one host read for the INT8 error); later calls return the same."""
        st = self.state
        if st is not None and st.evaluation >= 0:
            if st.stats is None:
                st.stats = self._summarize(st)
            self.last_stats = st.stats
        return self.last_stats

    @property
    def stats(self) -> ReuseStats | None:
        """The generation's stats: summarized once when it has ended (or run all its evaluations); in progress, what ran so far."""
        st = self.state
        if st is None or st.evaluation < 0 or st.stats is not None or st.finished == st.num_evaluations:
            return self.end_generation()
        return self._summarize(st)

    def _policies(self) -> tuple[StorePolicy, ...]:
        heads = self.layout.heads()
        int8 = self.cfg.cache_dtype == "int8"
        main = StorePolicy(int8=int8, mode=self.cfg.quant_mode, num_heads=heads)
        if self.cfg.target == "kv":
            key = StorePolicy(int8=False) if self.cfg.kv_mixed else main
            value = StorePolicy(int8=int8 or self.cfg.kv_mixed, mode=self.cfg.quant_mode, num_heads=heads)
            return (key, value)
        return (main,)

    def on_evaluation(self, args: tuple, kwargs: dict) -> None:
        """Before each transformer forward: one call is one model evaluation."""
        self._maybe_autobegin()
        st = self.state
        if self.context != st.branch:
            self._switch_branch(st)
        st.evaluation += 1
        st.stats = None  # more evaluations in this generation: summarize again at its end
        e = st.evaluation
        if e >= st.num_evaluations:
            raise DqarError(
                f"the transformer was called {e + 1} times but the generation was begun for {st.num_evaluations} evaluations",
                "call begin_generation with the sampler's number of model evaluations",
            )
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, C, H, W), or (B, T, C) tokens
        st.rows_per_eval.append(hidden.shape[0])
        if st.call is None and not self.layout.is_dit:
            st.call = (args, dict(kwargs))
        st.cache.at(float(st.positions[e]))
        st.shape = (hidden.shape[-2], hidden.shape[-1])
        # signals measure the first CFG branch only (the one a decision is taken on; later branches replay it)
        if st.signal_branch is UNSET:
            st.signal_branch = st.branch
        st.signals = st.recorder if st.branch == st.signal_branch else None
        if st.signals is not None:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            st.signals.begin_evaluation(e, timestep, hidden.device, hidden)
            st.x_t = hidden
        st.sharing = 0 <= st.share_from <= e and self._is_guided(st, args, kwargs, hidden.shape[0])
        st.row = self.decider.row(e)
        st.store = self.decider.store_row(e)
        if getattr(self.verifier, "per_sample", False):
            if st.guided is None and self.layout.is_dit:
                self._is_guided(st, args, kwargs, hidden.shape[0])  # which rows are one sample's CFG pair
            verify_rows.begin_evaluation(self, hidden)
        self._check_finite(st)

    def _check_finite(self, st: GenerationState) -> None:
        """Guard on: one host read, NaN/Inf entries recompute. Guard off: counted on the device, reported after."""
        reusing = [layer for layer, r in enumerate(st.row) if r and st.cache.has(self.slots[layer])]
        if not reusing:
            return
        slots = [(layer, s) for layer in reusing for s in range(self.slots[layer], self.slots[layer] + self.layout.specs[layer].streams)
                 if st.cache.has(s)]
        if not self.cfg.nonfinite_guard:
            st.cache.count_nonfinite([s for _, s in slots])
            return
        ok = st.cache.finite_flags([s for _, s in slots]).tolist()  # the one host read of this check
        st.host_syncs += 1
        bad = {layer for (layer, _), fine in zip(slots, ok) if not fine}
        if bad:
            st.row = tuple(r and layer not in bad for layer, r in enumerate(st.row))
            st.nonfinite += len(bad)

    def _is_guided(self, st: GenerationState, args, kwargs, batch: int) -> bool:
        """Whether the batch is [conditional; unconditional]; asked of the labels once per generation if unknown."""
        if batch % 2:
            return False
        if st.guided is None:
            labels = kwargs.get("class_labels", args[2] if len(args) > 2 else None)
            null = int(self.transformer.config.num_embeds_ada_norm)
            if labels is None:
                st.guided = False
            else:
                half = labels.reshape(-1)[batch // 2 :]
                st.guided = bool((half == null).all())  # one host read per generation
                st.host_syncs += 1
        return st.guided

    def after_evaluation(self, output: Any) -> None:
        """After each transformer forward: signals of the evaluation's output (prediction SNR), on the device."""
        st = self.state
        if st is None:
            return
        st.finished = st.evaluation + 1
        if st.signals is not None:
            sample = output[0] if isinstance(output, tuple) else output.sample
            st.signals.end_evaluation(st.x_t, sample)  # x_t: (B, C, H, W)
            st.x_t = None

    def reset(self) -> None:
        """The registry's reset (`reset_stateful_hooks`): end the generation in progress and drop its state."""
        self.end_generation()
        self.state = None

    def _maybe_autobegin(self) -> None:
        """Inside a stock pipeline: a new `scheduler.timesteps` object means a new generation."""
        sched = self.scheduler
        if sched is not None and (self.state is None or sched.timesteps is not self.state.timesteps_ref):
            if self.state is not None and self.state.evaluation >= 0:
                self.end_generation()
            self.begin_generation(len(sched.timesteps), sched)  # guided: read from the labels when sharing needs it
        elif self.state is None:
            raise DqarError("no generation has begun", "sample with dqar.sampling.sample(..., reuse=handle) or call handle.begin_generation(steps)")

    def _switch_branch(self, st: GenerationState) -> None:
        """A forward in another cache context: make its branch current (a new one starts with its own history)."""
        if not self.caps.branches and st.evaluation >= 0:
            raise DqarError(f"the '{self.executor}' executor keeps one history, but the pipeline runs CFG branches as separate "
                            "forwards (cache_context)", "use executor = 'patch' for this pipeline")
        branches.switch(st, self.context, lambda: self._new_branch(st.num_evaluations))

    # ----- stats ---------------------------------------------------------------------------
    def _nonfinite_reused(self, runs) -> int:
        count = sum(b.cache.nonfinite_count() for b in runs)
        if count:
            warnings.warn(f"{count} reused cache entries held NaN/Inf in this generation; set nonfinite_guard = true to recompute them",
                          RuntimeWarning, stacklevel=3)
        return count

    def _flops(self, st: GenerationState) -> FlopModel:
        """Per-row FLOPs of this generation's forwards: analytic for the DiT, counted on fake tensors (once per shape) else."""
        if self.layout.is_dit:
            return dit_model(self.transformer.config, *st.shape, len(self.blocks), self.cfg.target, self.cfg.granularity)
        args, kwargs = st.call
        key = shape_key(args, kwargs)
        if key not in self._flop_counts:
            self._flop_counts[key] = self._count_flops(args, kwargs)
        block = self.cfg.granularity == "block"
        paths = [s.path if block else f"{s.path}.{s.attention}" for s in self.layout.specs]
        return counted_model(self._flop_counts[key], (args[0] if args else kwargs["hidden_states"]).shape[0], paths)

    def _count_flops(self, args: tuple, kwargs: dict) -> dict[str, int]:
        """One forward on fake tensors with every hook passing through (no row reuses, nothing stored): FLOPs per module."""
        num_layers = len(self.blocks)
        idle = GenerationState(num_evaluations=1, cache=self._new_branch(1).cache, executed=np.zeros((1, num_layers), dtype=bool),
                               rows_per_eval=[], evaluation=0, row=(False,) * num_layers, store=(False,) * num_layers,
                               shared=np.zeros((1, num_layers), dtype=bool), row_share=np.zeros((1, num_layers)))
        saved, self.state, self.counting = self.state, idle, True
        try:
            return counted_flops(self.transformer, args, kwargs)
        finally:
            self.state, self.counting = saved, False

    def _summarize(self, st: GenerationState) -> ReuseStats:
        runs = branches.ran(st)
        done = max(b.evaluation + 1 for b in runs)
        mask = np.logical_or.reduce([b.executed[:done] for b in runs])
        fm = self._flops(st)
        total = skipped = shared_cells = 0
        for b in runs:
            n = b.evaluation + 1
            rows = np.asarray(b.rows_per_eval[:n], dtype=np.int64)
            shared = b.shared[:n] & ~b.executed[:n]  # (E, L) attn1 computed on half the rows
            shared_cells += int(shared.sum())
            total += int(rows.sum()) * fm.forward
            reused = np.where(b.row_share[:n] > 0, b.row_share[:n], b.executed[:n])  # (E, L) share of rows reused
            skipped += int(round(float(((reused @ fm.skip) * rows).sum())))
            skipped += int((shared.sum(axis=1) * (rows // 2)).sum()) * fm.attention
        caches = [b.cache for b in runs]
        errors = [c.mean_error() for c in caches]
        syncs = st.host_syncs + (st.recorder.host_syncs if st.recorder is not None else 0)
        return summarize(
            mask,
            cache_bytes=sum(c.bytes_now for c in caches),
            cache_bytes_peak=sum(c.bytes_peak for c in caches),
            quant_error=None if all(e is None for e in errors) else float(np.mean([e for e in errors if e is not None])),
            flops_total=total,
            flops_skipped=skipped,
            host_syncs=syncs,
            nonfinite_recomputes=st.nonfinite,
            nonfinite_reused=self._nonfinite_reused(runs),
            forecasts=sum(c.forecasts for c in caches),
            cache_entries_peak=sum(c.entries_peak for c in caches),
            cfg_shared=shared_cells,
        )
