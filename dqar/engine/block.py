"""A DiT block (diffusers `BasicTransformerBlock`, norm_type ada_norm_zero) as pure functions.

Written so that `torch.compile` turns each function into one graph shared by every block
of a model: the reuse decision stays outside, and a reused attention output (INT8 values
and scales, or model-dtype tensor) enters the graph, where dequantization fuses with the
gate multiply. Outputs match the stock block (tests check allclose).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dqar.errors import DqarError
from dqar.engine.quant import QMAX


def check_block(block) -> None:
    """Only DiT's ada_norm_zero self-attention blocks are supported by the functional path."""
    if getattr(block, "norm_type", None) != "ada_norm_zero" or getattr(block, "attn2", None) is not None:
        raise DqarError(f"compiled reuse supports DiT ada_norm_zero blocks, got norm_type={getattr(block, 'norm_type', None)!r}",
                        "use compile=False for this model")


def self_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """diffusers' SDPA attention processor for plain self-attention: (B, T, C) → (B, T, C)."""
    b, t, _ = x.shape
    q, k, v = (lin(x).view(b, t, attn.heads, -1).transpose(1, 2) for lin in (attn.to_q, attn.to_k, attn.to_v))  # (B, H, T, D)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (B, H, T, D)
    return attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, t, -1).to(q.dtype)))


def _modulation(block, h, timestep, labels):
    norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, timestep, labels, hidden_dtype=h.dtype)
    return norm, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _mlp_half(block, h, shift_mlp, scale_mlp, gate_mlp):
    n = block.norm3(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]  # (B, T, C)
    return h + gate_mlp.unsqueeze(1) * block.ff(n)


def dequant(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """INT8 values × float32 scales → `dtype`, flattening a (…, H, D) head layout back to (…, C)."""
    x = values.float() * scale
    if values.ndim == 4:
        x = x.flatten(-2)
    return x.to(dtype)


def quant(x: torch.Tensor, mode: str, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same rule as `dqar.engine.quant.quantize`, traceable: returns (int8 values, float32 scales)."""
    src = x.float()
    if mode == "head":
        src = src.unflatten(-1, (heads, -1))  # (B, T, H, D)
        amax = src.abs().amax(dim=(0, 1, 3), keepdim=True)
    elif mode == "token":
        amax = src.abs().amax(dim=-1, keepdim=True)
    elif mode == "channel":
        amax = src.abs().amax(dim=(0, 1), keepdim=True)
    else:
        amax = src.abs().amax().reshape(1, 1, 1)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / QMAX)
    return torch.clamp(torch.round(src / scale), -QMAX, QMAX).to(torch.int8), scale


def compute(block, h, timestep, labels):
    """Full block; also returns the attention output. (B, T, C) → ((B, T, C), (B, T, C))."""
    norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, h, timestep, labels)
    a = self_attention(block.attn1, norm)
    h = h + gate_msa.unsqueeze(1) * a
    return _mlp_half(block, h, shift_mlp, scale_mlp, gate_mlp), a


def compute_q(block, h, timestep, labels, mode: str):
    """Full block; the attention output leaves already quantized (quantize fused into the graph)."""
    out, a = compute(block, h, timestep, labels)
    values, scale = quant(a, mode, block.attn1.heads)
    return out, values, scale


def reuse(block, h, timestep, labels, a):
    """Block with the attention sublayer replaced by a cached output `a` (B, T, C)."""
    _, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, h, timestep, labels)
    h = h + gate_msa.unsqueeze(1) * a
    return _mlp_half(block, h, shift_mlp, scale_mlp, gate_mlp)


def reuse_q(block, h, timestep, labels, values, scale):
    """`reuse` from INT8: dequantization fuses with the gate multiply."""
    return reuse(block, h, timestep, labels, dequant(values, scale, h.dtype))


def whole(block, h, timestep, labels):
    """Full block; also returns its residual contribution (attention + MLP) for block-level reuse."""
    out, _ = compute(block, h, timestep, labels)
    return out, out - h


def whole_q(block, h, timestep, labels, mode: str):
    out, residual = whole(block, h, timestep, labels)
    values, scale = quant(residual, mode, block.attn1.heads)
    return out, values, scale


def skip(h, residual):
    """Block-level reuse: add the cached residual."""
    return h + residual


def skip_q(h, values, scale):
    return h + dequant(values, scale, h.dtype)
