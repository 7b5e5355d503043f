"""The patch executor's forwards (hot path): each layer's `attn1` or whole block, deciding from the engine's host row.

Each function is bound to (engine, layer, module) and called by a `dqar.engine.hooks.LayerHook`
as `forward(original, *args, **kwargs)`, `original` being the forward it replaces. Nothing
here reads a device value back to the host.
"""
from __future__ import annotations

from typing import Callable

import torch

from dqar.engine.attention import attend
from dqar.engine.block import cfg_half
from dqar.engine.signals import attention_entropy, attention_with_entropy, relative_change


def attention(engine, layer: int, attn, original: Callable, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`attn1`: the cached output (or its forecast) where the row says reuse, else computed (and stored where the store row says)."""
    st = engine.state
    if st.row[layer] and st.cache.has(layer):
        st.executed[st.evaluation, layer] = True
        return st.cache.read(layer)  # (B, T, C) a copy or a forecast
    out = attention_compute(engine, layer, attn, original, hidden_states, *args, **kwargs)  # (B, T, C)
    if st.signals is not None and st.signals.needs.change and st.cache.has(layer):
        st.signals.put_change(layer, relative_change(out, cached(st, layer)))
    if st.store[layer]:
        st.cache.put(layer, out)
    return out


def cached(st, layer: int) -> torch.Tensor:
    """What the change of a computed output is measured against: the cached output, or what a reuse would read now."""
    return st.cache.read(layer, count=False) if st.signals.needs.change_of_reuse else st.cache.get(layer)[0]  # (B, T, C)


def attention_compute(engine, layer: int, attn, original: Callable, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """attn1 computed: on one CFG half when sharing (copied to the other), measuring entropy when needed."""
    st = engine.state
    x = hidden_states  # (B, T, C)
    if st.sharing:
        x = cfg_half(x, engine.cfg.cfg_share)  # (B/2, T, C)
        st.shared[st.evaluation, layer] = True
    sig = st.signals
    if sig is not None and sig.needs.entropy:
        out, entropy = attention_with_entropy(attn, x, sig.rows(x.shape[1], x.device))
        sig.put_entropy(layer, entropy)
    else:
        out = original(x, *args, **kwargs)
    return torch.cat([out, out]) if st.sharing else out


def block(engine, layer: int, original: Callable, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A whole block: its input plus the cached residual (attention + MLP) where the row says reuse."""
    st = engine.state
    if st.row[layer] and st.cache.has(layer):
        st.executed[st.evaluation, layer] = True
        return hidden_states + st.cache.read(layer)  # (B, T, C) residual of attention + MLP, a copy or a forecast
    out = original(hidden_states, *args, **kwargs)
    if st.signals is not None and st.signals.needs.change and st.cache.has(layer):
        st.signals.put_change(layer, relative_change(out - hidden_states, cached(st, layer)))
    if st.store[layer]:
        st.cache.put(layer, out - hidden_states)
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
