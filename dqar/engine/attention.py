"""diffusers' SDPA self-attention (`AttnProcessor2_0` on plain self-attention), written once for every executor.

Traceable: `torch.compile` turns it into part of one graph. Split in two so that callers can
bring their own K and V (a K/V cache) or read Q and K (the entropy of the attention map).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, C) → (B, H, T, D)."""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def project(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V projections of `x` (B, T, C), each (B, T, C)."""
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


def attend(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of projected (B, T, C) Q, K, V, then `attn`'s output projection: (B, T, C)."""
    b, t, _ = q.shape
    o = F.scaled_dot_product_attention(*(split_heads(z, attn.heads) for z in (q, k, v)), dropout_p=0.0, is_causal=False)  # (B, H, T, D)
    return attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, t, -1).to(q.dtype)))


def self_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The whole sublayer: (B, T, C) → (B, T, C)."""
    return attend(attn, *project(attn, x))
