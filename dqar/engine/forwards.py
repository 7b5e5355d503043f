"""The patch executor's forwards (hot path): each layer's attention or whole block, deciding from the engine's host row.

Each function is bound to (engine, layer, module) and called by a `dqar.engine.hooks.LayerHook`
as `forward(original, *args, **kwargs)`, `original` being the forward it replaces. A layer's
output streams live in consecutive cache slots from `engine.slots[layer]` (`dqar.engine.adapter`).
Nothing here reads a device value back to the host.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from dqar.engine import verify, verify_rows
from dqar.engine.adapter import form_of, outputs, pack
from dqar.engine.attention import attend
from dqar.engine.block import cfg_half
from dqar.engine.signals import attention_entropy, attention_with_entropy, relative_change


def attention(engine, layer: int, attn, original: Callable, *args, **kwargs) -> Any:
    """Self/joint attention: the cached output (or its forecast) where the row says reuse, else computed (and stored
    where the store row says). A joint attention's (image, text) outputs are kept per stream."""
    st, slot = engine.state, engine.slots[layer]
    if st.row[layer] and st.cache.has(slot):
        st.executed[st.evaluation, layer] = True
        if not engine.forms.get(layer):
            return st.cache.read(slot)  # (B, T, C) a copy or a forecast
        return tuple(_read(st, slot + i, i) for i in range(engine.forms[layer]))
    out = attention_compute(engine, layer, attn, original, *args, **kwargs)  # (B, T, C), or a tuple of streams
    if torch.is_tensor(out):
        if st.signals is not None and st.signals.needs.change and st.cache.has(slot):
            st.signals.put_change(layer, relative_change(out, cached(st, slot)))
        if engine.verifier is not None and layer == engine.verifier.probe:
            verify.observe(engine, layer, out)  # may set the rest of this evaluation's row and stores
        if st.store[layer]:
            st.cache.put(slot, out)
        return out
    engine.forms[layer] = len(out)
    if engine.verifier is not None and layer == engine.verifier.probe:
        verify.observe(engine, layer, *out[: engine.layout.specs[layer].streams])  # (image, text) joint attention outputs
    if st.store[layer]:
        for i, stream in enumerate(out):
            if stream is not None:
                st.cache.put(slot + i, stream)
    return out


def _read(st, slot: int, stream: int) -> torch.Tensor | None:
    """One stream of a reuse: its forecast (counted once per layer), or None where the block outputs nothing there."""
    return st.cache.read(slot, count=stream == 0) if st.cache.has(slot) else None


def cached(st, slot: int) -> torch.Tensor:
    """What the change of a computed output is measured against: the cached output, or what a reuse would read now."""
    return st.cache.read(slot, count=False) if st.signals.needs.change_of_reuse else st.cache.get(slot)[0]  # (B, T, C)


def attention_compute(engine, layer: int, attn, original: Callable, *args, **kwargs) -> Any:
    """Attention computed: on one CFG half when sharing (copied to the other), measuring entropy when needed (DiT attn1)."""
    st = engine.state
    if not st.sharing and st.signals is None:
        return original(*args, **kwargs)
    x, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())  # (B, T, C)
    if st.sharing:
        x = cfg_half(x, engine.cfg.cfg_share)  # (B/2, T, C)
        st.shared[st.evaluation, layer] = True
    sig = st.signals
    if sig is not None and sig.needs.entropy:
        out, entropy = attention_with_entropy(attn, x, sig.rows(x.shape[1], x.device))
        sig.put_entropy(layer, entropy)
    else:
        out = original(x, *rest, **kwargs)
    return torch.cat([out, out]) if st.sharing else out


def block(engine, layer: int, original: Callable, *args, **kwargs) -> Any:
    """A whole block: its inputs plus the cached residual (attention + MLP) of each output stream where the row says reuse."""
    st, slot, spec = engine.state, engine.slots[layer], engine.layout.specs[layer]
    hidden, encoder = engine.layout.inputs(layer, args, kwargs)  # (B, T, C), (B, S, C) or None
    if st.row[layer] and st.cache.has(slot):
        if st.split is not None and (encoder is None or st.cache.has(slot + 1)):  # per-sample refresh: some rows compute
            return verify_rows.split_block(engine, layer, original, args, kwargs, hidden, encoder)
        st.executed[st.evaluation, layer] = True
        h = hidden + st.cache.read(slot)  # (B, T, C) residual of attention + MLP, a copy or a forecast
        if not engine.forms.get(layer):
            return h
        e = encoder + st.cache.read(slot + 1, count=False) if encoder is not None and st.cache.has(slot + 1) else None
        return pack(spec, engine.forms[layer], h, e)
    out = original(*args, **kwargs)
    h, e = outputs(spec, out)
    engine.forms[layer] = form_of(out)
    probe = engine.verifier is not None and layer == engine.verifier.probe
    change = st.signals is not None and st.signals.needs.change and st.cache.has(slot)
    if not (probe or change or st.store[layer]):
        return out  # nothing reads its residuals
    residual = h - hidden  # (B, T, C)
    text = e - encoder if e is not None and encoder is not None else None  # (B, S, C) the text stream's residual
    if change:
        st.signals.put_change(layer, relative_change(residual, cached(st, slot)))
    if probe:  # may set the rest of this evaluation's row and stores (per sample: the split)
        (verify_rows.observe if getattr(engine.verifier, "per_sample", False) else verify.observe)(engine, layer, residual, text)
    if st.store[layer]:  # at a split evaluation (per-sample refresh) the refreshing rows only
        verify_rows.store(st, slot, residual)
        if text is not None:
            verify_rows.store(st, slot + 1, text)
    return out


def kv(engine, layer: int, attn, original: Callable, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
       **kwargs) -> torch.Tensor:
    """Self-attention with fresh Q against cached (or fresh) K and V; `original` is not called (same SDPA math)."""
    st = engine.state
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
