"""The reuse engine: patches each block's `attn1` (or the whole block), executes host-side decisions.

Decisions are taken once per model evaluation by a *decider* (a plan, later a gate or a
policy) and read from a host tuple inside each layer: no device→host reads on the plan
path. All state lives in `ReuseEngine` and its per-generation `GenerationState`; the
patched modules only get their `forward` replaced, and `detach` puts it back.
"""
from __future__ import annotations

import functools
import warnings
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from dqar.engine.cache import LayerCache, StorePolicy
from dqar.engine.config import ReuseConfig
from dqar.engine.decider import Decider, DeciderContext
from dqar.errors import DqarError
from dqar.engine.flops import attention_flops, dit_shape, forward_flops, skipped_flops
from dqar.engine.attention import attend
from dqar.engine.signals import Needs, SignalRecorder, attention_entropy, attention_with_entropy, is_plain_attention, relative_change
from dqar.engine.stats import ReuseStats, summarize

_ATTACHED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
EXECUTORS = ("patch", "fused", "compiled")


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
    signals: SignalRecorder | None = None  # measured signals, when the decider needs any
    share_from: int = -1  # CFG-branch sharing from this evaluation on (-1: never)
    guided: bool | None = None  # the batch is [conditional; unconditional] (None: look at the labels once)
    sharing: bool = False  # attn1 computes one CFG half in the current evaluation
    shared: np.ndarray | None = None  # (E, L) bool: attn1 computed on one half and copied to the other


class ReuseEngine:
    """Attach reuse to a diffusers `DiTTransformer2DModel`; detach restores it exactly."""

    def __init__(self, transformer: torch.nn.Module, cfg: ReuseConfig, decider: Decider, scheduler: Any = None,
                 executor: str = "patch"):
        if transformer in _ATTACHED:
            raise DqarError("reuse is already attached to this transformer", "call handle.disable() before enabling it again")
        if not hasattr(transformer, "transformer_blocks"):
            raise DqarError(f"{type(transformer).__name__} has no transformer_blocks", "pass a diffusers DiTTransformer2DModel or DiTPipeline")
        self.transformer = transformer
        self.cfg = cfg
        self.decider = decider
        self.scheduler = scheduler  # optional: a pipeline's scheduler, to detect new generations
        self.blocks = list(transformer.transformer_blocks)
        if executor not in EXECUTORS:
            raise DqarError(f"unknown executor '{executor}'", f"choose one of: {', '.join(EXECUTORS)}")
        self.executor = executor  # "patch": wrap attn1 / block; "fused"/"compiled": pure block functions (dqar.engine.fused)
        self.needs: Needs = getattr(self.decider, "needs", None) or Needs()
        if executor != "patch" and (self.needs.any or cfg.cfg_share != "none"):
            raise DqarError(f"the gate, signal traces and cfg_share run on the 'patch' executor, not '{executor}'", "use executor = 'patch'")
        if self.needs.entropy and not all(is_plain_attention(b.attn1) for b in self.blocks):
            raise DqarError("the entropy gate needs plain self-attention (no q/k norms, residual or rescaling)", "set gate = false")
        self.state: GenerationState | None = None
        self.last_stats: ReuseStats | None = None
        self._patched: list[tuple[torch.nn.Module, Any]] = []
        self._hook = None
        self._post_hook = None
        self._attach()

    # ----- attach / detach -------------------------------------------------------------
    def _attach(self) -> None:
        if self.executor != "patch":
            self._attach_fused()
            return
        inner = self.needs.entropy or self.cfg.cfg_share != "none"  # attn1 must measure or share inside whole blocks
        for layer, block in enumerate(self.blocks):
            if self.cfg.granularity == "block":
                self._patch(block, functools.partial(self._block_forward, layer, block.forward))
                if inner:
                    self._patch(block.attn1, functools.partial(self._attn_compute, layer, block.attn1, block.attn1.forward))
            elif self.cfg.target == "kv":
                self._patch(block.attn1, functools.partial(self._kv_forward, layer, block.attn1))
            else:
                self._patch(block.attn1, functools.partial(self._attn_forward, layer, block.attn1, block.attn1.forward))
        self._hook = self.transformer.register_forward_pre_hook(self._on_evaluation, with_kwargs=True)
        if self.needs.snr or self.needs.record:
            self._post_hook = self.transformer.register_forward_hook(self._after_evaluation, with_kwargs=True)
        _ATTACHED.add(self.transformer)

    def _attach_fused(self) -> None:
        from dqar.engine.fused import check_supported, fused_forward, make_kernels

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
        for hook in (self._hook, self._post_hook):
            if hook is not None:
                hook.remove()
        self._hook = self._post_hook = None
        _ATTACHED.discard(self.transformer)
        self.state = None

    @property
    def attached(self) -> bool:
        return self._hook is not None

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
        self.state = GenerationState(
            num_evaluations=num_evaluations,
            cache=LayerCache(num_layers, self._policies(), self.cfg.track_quant_error),
            executed=np.zeros((num_evaluations, num_layers), dtype=bool),
            rows_per_eval=[],
            timesteps_ref=getattr(scheduler, "timesteps", None),
            signals=signals,
            share_from=share_from,
            guided=guided,
            shared=np.zeros((num_evaluations, num_layers), dtype=bool),
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
        if st.signals is not None:
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            st.signals.begin_evaluation(e, timestep, hidden.device, hidden)
        st.sharing = 0 <= st.share_from <= e and self._is_guided(st, args, kwargs, hidden.shape[0])
        st.row = self.decider.row(e)
        st.store = self.decider.store_row(e)
        self._check_finite(st)

    def _check_finite(self, st: GenerationState) -> None:
        """Guard on: one host read, NaN/Inf entries recompute. Guard off: counted on the device, reported after."""
        reusing = [layer for layer, r in enumerate(st.row) if r and st.cache.has(layer)]
        if not reusing:
            return
        if not self.cfg.nonfinite_guard:
            st.cache.count_nonfinite(reusing)
            return
        ok = st.cache.finite_flags(reusing).tolist()  # the one host read of this check
        st.host_syncs += 1
        bad = {layer for layer, fine in zip(reusing, ok) if not fine}
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

    def _after_evaluation(self, module, args, kwargs, output) -> None:
        """Forward post-hook: signals of the evaluation's output (prediction SNR), on the device."""
        st = self.state
        if st is not None and st.signals is not None:
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, C, H, W)
            sample = output[0] if isinstance(output, tuple) else output.sample
            st.signals.end_evaluation(hidden, sample)

    def _maybe_autobegin(self) -> None:
        """Inside a stock pipeline: a new `scheduler.timesteps` object means a new generation."""
        sched = self.scheduler
        if sched is not None and (self.state is None or sched.timesteps is not self.state.timesteps_ref):
            if self.state is not None and self.state.evaluation >= 0:
                self.end_generation()
            self.begin_generation(len(sched.timesteps), sched)  # guided: read from the labels when sharing needs it
        elif self.state is None:
            raise DqarError("no generation has begun", "sample with dqar.sampling.sample(..., reuse=handle) or call handle.begin_generation(steps)")

    # ----- patched forwards (hot path) -----------------------------------------------------
    def _attn_forward(self, layer: int, attn, original: Callable, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        if st.row[layer] and st.cache.has(layer):
            st.executed[st.evaluation, layer] = True
            return st.cache.get(layer)[0]  # (B, T, C)
        out = self._attn_compute(layer, attn, original, hidden_states, *args, **kwargs)  # (B, T, C)
        if st.signals is not None and st.signals.needs.change and st.cache.has(layer):
            st.signals.put_change(layer, relative_change(out, st.cache.get(layer)[0]))
        if st.store[layer]:
            st.cache.put(layer, out)
        return out

    def _attn_compute(self, layer: int, attn, original: Callable, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """attn1 computed: on one CFG half when sharing (copied to the other), measuring entropy when needed."""
        st = self.state
        x = hidden_states  # (B, T, C)
        if st.sharing:
            half = x.shape[0] // 2
            x = x[:half] if self.cfg.cfg_share == "cond_to_uncond" else x[half:]  # (B/2, T, C)
            st.shared[st.evaluation, layer] = True
        sig = st.signals
        if sig is not None and sig.needs.entropy:
            out, entropy = attention_with_entropy(attn, x, sig.rows(x.shape[1], x.device))
            sig.put_entropy(layer, entropy)
        else:
            out = original(x, *args, **kwargs)
        return torch.cat([out, out]) if st.sharing else out

    def _block_forward(self, layer: int, original: Callable, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        st = self.state
        if st.row[layer] and st.cache.has(layer):
            st.executed[st.evaluation, layer] = True
            return hidden_states + st.cache.get(layer)[0]  # (B, T, C) residual of attention + MLP
        out = original(hidden_states, *args, **kwargs)
        if st.signals is not None and st.signals.needs.change and st.cache.has(layer):
            st.signals.put_change(layer, relative_change(out - hidden_states, st.cache.get(layer)[0]))
        if st.store[layer]:
            st.cache.put(layer, out - hidden_states)
        return out

    def _kv_forward(self, layer: int, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """Self-attention with fresh Q against cached (or fresh) K and V; same math as diffusers' SDPA processor."""
        st = self.state
        q = attn.to_q(hidden_states)  # (B, T, C)
        if st.row[layer] and st.cache.has(layer):
            st.executed[st.evaluation, layer] = True
            k, v = st.cache.get(layer)
        else:
            k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)  # (B, T, C) each
            if st.signals is not None and st.signals.needs.change and st.cache.has(layer):
                st.signals.put_change(layer, relative_change(v, st.cache.get(layer)[1]))
            if st.store[layer]:
                st.cache.put(layer, k, v)
            if st.signals is not None and st.signals.needs.entropy:
                st.signals.put_entropy(layer, attention_entropy(attn, q, k, st.signals.rows(q.shape[1], q.device)))
        return attend(attn, q, k, v)

    # ----- stats ---------------------------------------------------------------------------
    def _nonfinite_reused(self, st: GenerationState) -> int:
        count = st.cache.nonfinite_count()
        if count:
            warnings.warn(f"{count} reused cache entries held NaN/Inf in this generation; set nonfinite_guard = true to recompute them",
                          RuntimeWarning, stacklevel=3)
        return count

    def _summarize(self, st: GenerationState) -> ReuseStats:
        done = st.evaluation + 1
        mask = st.executed[:done]
        shape = dit_shape(self.transformer.config, *st.shape)
        per_row_skip = skipped_flops(shape, self.cfg.target, self.cfg.granularity)
        rows = np.asarray(st.rows_per_eval[:done], dtype=np.int64)
        shared = st.shared[:done] & ~mask  # (E, L) attn1 computed on half the rows
        share_skip = int((shared.sum(axis=1) * (rows // 2)).sum()) * attention_flops(shape)
        syncs = st.host_syncs + (st.signals.host_syncs if st.signals is not None else 0)
        return summarize(
            mask,
            cache_bytes=st.cache.bytes_now,
            cache_bytes_peak=st.cache.bytes_peak,
            quant_error=st.cache.mean_error(),
            flops_total=int(rows.sum()) * forward_flops(shape),
            flops_skipped=int((mask.sum(axis=1) * rows).sum()) * per_row_skip + share_skip,
            host_syncs=syncs,
            nonfinite_recomputes=st.nonfinite,
            nonfinite_reused=self._nonfinite_reused(st),
            cfg_shared=int(shared.sum()),
        )
