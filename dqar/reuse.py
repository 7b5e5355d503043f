"""The reuse engine: patches each block's `attn1` (or the whole block), executes host-side decisions.

Decisions are taken once per model evaluation by a *decider* (a plan, later a gate or a
policy) and read from a host tuple inside each layer: no device→host reads on the plan
path. All state lives in `ReuseEngine` and its per-generation `GenerationState`; the
patched modules only get their `forward` replaced, and `detach` puts it back.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .cache import LayerCache, StorePolicy
from .config import ReuseConfig
from .errors import DqarError
from .flops import dit_shape, forward_flops, skipped_flops
from .plan import Plan, build_plan
from .stats import ReuseStats, summarize

_ATTACHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
EXECUTORS = ("patch", "fused", "compiled")


class Decider(Protocol):
    """Chooses, per evaluation, which layers reuse and which computed outputs must be stored."""

    def begin(self, num_evaluations: int, num_layers: int, scheduler: Any) -> None: ...

    def row(self, evaluation: int) -> tuple[bool, ...]: ...

    def store_row(self, evaluation: int) -> tuple[bool, ...]: ...


class PlanDecider:
    """Decisions read from a plan built once per (evaluations, layers) and kept."""

    def __init__(self, cfg: ReuseConfig, key: dict[str, Any] | None = None, plan: Plan | None = None):
        self.cfg = cfg
        self.key = dict(key or {})
        self.fixed = plan
        self.plans: dict[tuple[int, int], tuple[Plan, list, list]] = {}
        self.plan: Plan | None = None
        self._rows: list[tuple[bool, ...]] = []
        self._store: list[tuple[bool, ...]] = []

    def begin(self, num_evaluations: int, num_layers: int, scheduler: Any = None) -> None:
        shape = (num_evaluations, num_layers)
        if shape not in self.plans:
            plan = self.fixed or build_plan(self.cfg, num_evaluations, num_layers, {**self.key, "steps": num_evaluations})
            plan.check_shape(num_evaluations, num_layers)
            rows = plan.rows()
            # store a computed output only if the next evaluation reuses it (reuse runs are contiguous)
            store = rows[1:] + [tuple(False for _ in range(num_layers))]
            self.plans[shape] = (plan, rows, store)
        self.plan, self._rows, self._store = self.plans[shape]

    def row(self, evaluation: int) -> tuple[bool, ...]:
        return self._rows[evaluation]

    def store_row(self, evaluation: int) -> tuple[bool, ...]:
        return self._store[evaluation]


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


class ReuseEngine:
    """Attach reuse to a diffusers `DiTTransformer2DModel`; detach restores it exactly."""

    def __init__(self, transformer: torch.nn.Module, cfg: ReuseConfig, decider: Decider | None = None, scheduler: Any = None,
                 executor: str = "patch"):
        if transformer in _ATTACHED:
            raise DqarError("reuse is already attached to this transformer", "call handle.disable() before enabling it again")
        if not hasattr(transformer, "transformer_blocks"):
            raise DqarError(f"{type(transformer).__name__} has no transformer_blocks", "pass a diffusers DiTTransformer2DModel or DiTPipeline")
        self.transformer = transformer
        self.cfg = cfg
        self.decider = decider or PlanDecider(cfg)
        self.scheduler = scheduler  # optional: a pipeline's scheduler, to detect new generations
        self.blocks = list(transformer.transformer_blocks)
        if executor not in EXECUTORS:
            raise DqarError(f"unknown executor '{executor}'", f"choose one of: {', '.join(EXECUTORS)}")
        self.executor = executor  # "patch": wrap attn1 / block; "fused"/"compiled": pure block functions (dqar.compiled)
        self.state: GenerationState | None = None
        self.last_stats: ReuseStats | None = None
        self._patched: list[tuple[torch.nn.Module, Any]] = []
        self._hook = None
        self._attach()

    # ----- attach / detach -------------------------------------------------------------
    def _attach(self) -> None:
        if self.executor != "patch":
            self._attach_fused()
            return
        for layer, block in enumerate(self.blocks):
            if self.cfg.granularity == "block":
                self._patch(block, functools.partial(self._block_forward, layer, block.forward))
            elif self.cfg.target == "kv":
                self._patch(block.attn1, functools.partial(self._kv_forward, layer, block.attn1))
            else:
                self._patch(block.attn1, functools.partial(self._attn_forward, layer, block.attn1.forward))
        self._hook = self.transformer.register_forward_pre_hook(self._on_evaluation, with_kwargs=True)
        _ATTACHED.add(self.transformer)

    def _attach_fused(self) -> None:
        from .compiled import check_supported, fused_forward, make_kernels

        check_supported(self.cfg, self.blocks)
        kernels = make_kernels(compile=self.executor == "compiled")
        for layer, block in enumerate(self.blocks):
            self._patch(block, functools.partial(fused_forward, self, layer, block, kernels))
        self._hook = self.transformer.register_forward_pre_hook(self._on_evaluation, with_kwargs=True)
        _ATTACHED.add(self.transformer)

    def _patch(self, module: torch.nn.Module, forward: Callable) -> None:
        self._patched.append((module, module.__dict__.get("forward")))
        module.forward = forward

    def detach(self) -> None:
        """Restore every patched module and remove the evaluation hook."""
        for module, previous in reversed(self._patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._patched.clear()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        _ATTACHED.discard(self.transformer)
        self.state = None

    @property
    def attached(self) -> bool:
        return self._hook is not None

    # ----- generation lifecycle ----------------------------------------------------------
    def begin_generation(self, num_evaluations: int, scheduler: Any = None) -> None:
        """Reset all state for a generation of `num_evaluations` model evaluations."""
        if num_evaluations < 1:
            raise DqarError(f"a generation needs at least one model evaluation, got {num_evaluations}", "use steps >= 1")
        num_layers = len(self.blocks)
        self.decider.begin(num_evaluations, num_layers, scheduler)
        self.state = GenerationState(
            num_evaluations=num_evaluations,
            cache=LayerCache(num_layers, self._policies(), self.cfg.track_quant_error),
            executed=np.zeros((num_evaluations, num_layers), dtype=bool),
            rows_per_eval=[],
            timesteps_ref=getattr(scheduler, "timesteps", None),
        )

    def end_generation(self) -> ReuseStats | None:
        """Summarize the generation that just ran (one host read for the INT8 error)."""
        if self.state is not None and self.state.evaluation >= 0:
            self.last_stats = self._summarize(self.state)
        return self.last_stats

    def _policies(self) -> tuple[StorePolicy, ...]:
        heads = self.blocks[0].attn1.heads
        int8 = self.cfg.cache_dtype == "int8"
        main = StorePolicy(int8=int8, mode=self.cfg.quant_mode, num_heads=heads)
        if self.cfg.target == "kv":
            key = StorePolicy(int8=False) if self.cfg.kv_mixed else main
            value = StorePolicy(int8=int8 or self.cfg.kv_mixed, mode=self.cfg.quant_mode, num_heads=heads)
            return (key, value)
        return (main,)

    def _on_evaluation(self, module, args, kwargs) -> None:
        """Forward pre-hook: one transformer call is one model evaluation."""
        self._maybe_autobegin()
        st = self.state
        st.evaluation += 1
        e = st.evaluation
        if e >= st.num_evaluations:
            raise DqarError(
                f"the transformer was called {e + 1} times but the generation was begun for {st.num_evaluations} evaluations",
                "call begin_generation with the sampler's number of model evaluations",
            )
        hidden = args[0] if args else kwargs["hidden_states"]  # (B, C, H, W)
        st.rows_per_eval.append(hidden.shape[0])
        st.shape = (hidden.shape[-2], hidden.shape[-1])
        st.row = self.decider.row(e)
        st.store = self.decider.store_row(e)

    def _maybe_autobegin(self) -> None:
        """Inside a stock pipeline: a new `scheduler.timesteps` object means a new generation."""
        sched = self.scheduler
        if sched is not None and (self.state is None or sched.timesteps is not self.state.timesteps_ref):
            if self.state is not None and self.state.evaluation >= 0:
                self.end_generation()
            self.begin_generation(len(sched.timesteps), sched)
        elif self.state is None:
            raise DqarError("no generation has begun", "sample with dqar.sampling.sample(..., reuse=handle) or call handle.begin_generation(steps)")

    # ----- patched forwards (hot path) -----------------------------------------------------
    def _attn_forward(self, layer: int, original: Callable, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        if st.row[layer] and st.cache.has(layer):
            st.executed[st.evaluation, layer] = True
            return st.cache.get(layer)[0]  # (B, T, C)
        out = original(hidden_states, *args, **kwargs)  # (B, T, C)
        if st.store[layer]:
            st.cache.put(layer, out)
        return out

    def _block_forward(self, layer: int, original: Callable, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        if st.row[layer] and st.cache.has(layer):
            st.executed[st.evaluation, layer] = True
            return hidden_states + st.cache.get(layer)[0]  # (B, T, C) residual of attention + MLP
        out = original(hidden_states, *args, **kwargs)
        if st.store[layer]:
            st.cache.put(layer, out - hidden_states)
        return out

    def _kv_forward(self, layer: int, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Self-attention with fresh Q against cached (or fresh) K and V; same math as diffusers' SDPA processor."""
        st = self.state
        b, t, _ = hidden_states.shape
        q = attn.to_q(hidden_states)  # (B, T, C)
        if st.row[layer] and st.cache.has(layer):
            st.executed[st.evaluation, layer] = True
            k, v = st.cache.get(layer)
        else:
            k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)  # (B, T, C) each
            if st.store[layer]:
                st.cache.put(layer, k, v)
        heads = attn.heads
        q, k, v = (x.view(b, t, heads, -1).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(b, t, -1).to(q.dtype)  # (B, T, C)
        return attn.to_out[1](attn.to_out[0](o))

    # ----- stats ---------------------------------------------------------------------------
    def _summarize(self, st: GenerationState) -> ReuseStats:
        done = st.evaluation + 1
        mask = st.executed[:done]
        shape = dit_shape(self.transformer.config, *st.shape)
        per_row_skip = skipped_flops(shape, self.cfg.target, self.cfg.granularity)
        rows = np.asarray(st.rows_per_eval[:done], dtype=np.int64)
        return summarize(
            mask,
            cache_bytes=st.cache.bytes_now,
            cache_bytes_peak=st.cache.bytes_peak,
            quant_error=st.cache.mean_error(),
            flops_total=int(rows.sum()) * forward_flops(shape),
            flops_skipped=int((mask.sum(axis=1) * rows).sum()) * per_row_skip,
            host_syncs=st.host_syncs,
            nonfinite_recomputes=st.nonfinite,
        )
