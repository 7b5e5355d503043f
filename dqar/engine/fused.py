"""The fused block path: each block's forward replaced by a host-side branch over pure block functions.

With `compile=True` every function in `dqar.engine.block` becomes one `torch.compile` graph
shared by all blocks (a bounded set of graphs: compute / reuse, model dtype / INT8), so
per-evaluation decisions never trigger recompilation. Decisions come from the engine's
host-side row, exactly as on the patched-`attn1` path. The verifying decider's probe block runs the
model-dtype kernel (`whole` / `compute`), whose second output `verify.observe` compares with its forecast
before it is stored (INT8 encoded by the cache, outside the graph: one layer).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from dqar.engine import block as B
from dqar.engine import verify
from dqar.engine.codec import Codec, forecast_anchored, rebase
from dqar.engine.variants import Variants, forecast_key, rebase_key
from dqar.errors import DqarError
from dqar.engine.quant import QTensor


@dataclass(frozen=True)
class Kernels:
    """The block functions, compiled or not."""

    compute: Callable
    compute_q: Callable
    reuse: Callable
    reuse_q: Callable
    reuse_forecast: Callable
    whole: Callable
    whole_q: Callable
    skip: Callable
    skip_q: Callable
    skip_forecast: Callable
    codec: Codec  # the anchored INT8 history's write and read


@functools.lru_cache(maxsize=None)
def make_kernels(compile: bool, mode: str | None = None) -> Kernels:
    """Wrap each block function with `torch.compile` (static shapes) when `compile` is set; shared by all handles."""
    names = ("compute", "compute_q", "reuse", "reuse_q", "reuse_forecast", "whole", "whole_q", "skip", "skip_q", "skip_forecast")
    wrap = (lambda f: torch.compile(f, dynamic=False, mode=mode)) if compile else (lambda f: f)
    codec = Codec(Variants(rebase, rebase_key, mode), Variants(forecast_anchored, forecast_key, mode), True) if compile else Codec()
    return Kernels(**{n: wrap(getattr(B, n)) for n in names}, codec=codec)


def check_supported(cfg, blocks) -> None:
    if cfg.target == "kv":
        raise DqarError("the fused/compiled path caches attention or block outputs, not K/V", "use target = 'attention' or compile=False")
    for blk in blocks:
        B.check_block(blk)


def fused_forward(engine, layer: int, blk, kernels: Kernels, original: Callable, hidden_states, attention_mask=None,
                  encoder_hidden_states=None, encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None,
                  added_cond_kwargs=None):
    """Drop-in `BasicTransformerBlock.forward` for DiT blocks; (B, T, C) → (B, T, C); `original` is not called.

    Stores and reads through the engine's `LayerCache` as the patched path does: INT8 values, scales and the
    round-trip error come out of the compute graph and enter `put_encoded`; a reuse reads `cache.stored` with the
    cache's host-side `weights` (a copy, or a forecast from the layer's history).
    """
    st = engine.state
    h, cache, block_level = hidden_states, st.cache, engine.cfg.granularity == "block"
    if st.row[layer] and cache.has(layer):
        st.executed[st.evaluation, layer] = True
        if cache.anchored:  # an INT8 history that forecasts, read through the (compiled) codec
            a = cache.read(layer)  # (B, T, C)
            return kernels.skip(h, a) if block_level else kernels.reuse(blk, h, timestep, class_labels, a)
        w = cache.weights(layer)
        stored = tuple(entry[0] for entry in cache.stored(layer, len(w)))
        if len(w) > 1:  # a forecast: weights enter the graph as a tensor, so new values never recompile
            weights = cache.weights_on(w, h.device)
            if block_level:
                return kernels.skip_forecast(h, stored, weights)
            return kernels.reuse_forecast(blk, h, timestep, class_labels, stored, weights)
        (cached,) = stored
        if isinstance(cached, QTensor):
            if block_level:
                return kernels.skip_q(h, cached.values, cached.scale, cached.mode)
            return kernels.reuse_q(blk, h, timestep, class_labels, cached.values, cached.scale, cached.mode)
        return kernels.skip(h, cached) if block_level else kernels.reuse(blk, h, timestep, class_labels, cached)
    full, full_q = (kernels.whole, kernels.whole_q) if block_level else (kernels.compute, kernels.compute_q)
    if engine.verifier is not None and layer == engine.verifier.probe:
        out, cached = full(blk, h, timestep, class_labels)  # (B, T, C) each: the block's output and residual (or attention)
        verify.observe(engine, layer, cached)  # may set the rest of this evaluation's row and stores
        if st.store[layer]:
            cache.put(layer, cached)
        return out
    if not st.store[layer]:
        return full(blk, h, timestep, class_labels)[0]
    (policy,) = cache.policies
    if not policy.int8 or cache.anchored:
        out, cached = full(blk, h, timestep, class_labels)
        cache.put(layer, cached)
        return out
    out, values, scale, error = full_q(blk, h, timestep, class_labels, policy.mode, policy.num_heads, cache.track_error)
    cache.put_encoded(layer, (QTensor(values=values, scale=scale, dtype=h.dtype, mode=policy.mode),), error)
    return out
