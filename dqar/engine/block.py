"""A DiT block (diffusers `BasicTransformerBlock`, norm_type ada_norm_zero) as pure functions.

Written so that `torch.compile` turns each function into one graph shared by every block
of a model: the reuse decision stays outside, and a reused attention output (INT8 values
and scales, or model-dtype tensor) enters the graph, where dequantization fuses with the
gate multiply. Outputs match the stock block (tests check allclose).
"""
from __future__ import annotations

import torch

from dqar.engine.attention import self_attention
from dqar.engine.codec import combine
from dqar.engine.quant import dequantize_values, encode
from dqar.errors import DqarError


def check_block(block) -> None:
    """Only DiT's ada_norm_zero self-attention blocks are supported by the functional path."""
    if getattr(block, "norm_type", None) != "ada_norm_zero" or getattr(block, "attn2", None) is not None:
        raise DqarError(f"compiled reuse supports DiT ada_norm_zero blocks, got norm_type={getattr(block, 'norm_type', None)!r}",
                        "use compile=False for this model")


def _modulation(block, h, timestep, labels):
    norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(h, timestep, labels, hidden_dtype=h.dtype)
    return norm, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _mlp_half(block, h, shift_mlp, scale_mlp, gate_mlp):
    n = block.norm3(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]  # (B, T, C)
    return h + gate_mlp.unsqueeze(1) * block.ff(n)


def cfg_half(x, share: str):
    """The CFG half attn1 computes when sharing: (B, T, C) [conditional; unconditional] → (B/2, T, C)."""
    half = x.shape[0] // 2
    return x[:half] if share == "cond_to_uncond" else x[half:]


def compute(block, h, timestep, labels, share: str = "none"):
    """Full block; also returns the attention output. (B, T, C) → ((B, T, C), (B, T, C)).

    `share` ("cond_to_uncond" | "uncond_to_cond"): attn1 runs on one CFG half, its output copied to both.
    """
    norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, h, timestep, labels)
    if share == "none":
        a = self_attention(block.attn1, norm)
    else:
        a = self_attention(block.attn1, cfg_half(norm, share))  # (B/2, T, C)
        a = torch.cat([a, a])  # (B, T, C)
    h = h + gate_msa.unsqueeze(1) * a
    return _mlp_half(block, h, shift_mlp, scale_mlp, gate_mlp), a


def compute_q(block, h, timestep, labels, mode: str, heads: int, track: bool):
    """Full block; the attention output leaves already quantized (quantize fused into the graph)."""
    out, a = compute(block, h, timestep, labels)
    return (out, *encode(a, mode, heads, track))


def reuse(block, h, timestep, labels, a):
    """Block with the attention sublayer replaced by a cached output `a` (B, T, C)."""
    _, gate_msa, shift_mlp, scale_mlp, gate_mlp = _modulation(block, h, timestep, labels)
    h = h + gate_msa.unsqueeze(1) * a
    return _mlp_half(block, h, shift_mlp, scale_mlp, gate_mlp)


def reuse_q(block, h, timestep, labels, values, scale, mode: str):
    """`reuse` from INT8: dequantization fuses with the gate multiply."""
    return reuse(block, h, timestep, labels, dequantize_values(values, scale, h.dtype, mode))


def reuse_forecast(block, h, timestep, labels, stored, weights):
    """`reuse` with the attention output forecast from stored model-dtype outputs (`dqar.engine.codec.combine`)."""
    return reuse(block, h, timestep, labels, combine(stored, weights, h.dtype))


def whole(block, h, timestep, labels, share: str = "none"):
    """Full block; also returns its residual contribution (attention + MLP) for block-level reuse."""
    out, _ = compute(block, h, timestep, labels, share)
    return out, out - h


def whole_q(block, h, timestep, labels, mode: str, heads: int, track: bool):
    out, residual = whole(block, h, timestep, labels)
    return (out, *encode(residual, mode, heads, track))


def skip(h, residual):
    """Block-level reuse: add the cached residual."""
    return h + residual


def skip_q(h, values, scale, mode: str):
    return h + dequantize_values(values, scale, h.dtype, mode)


def skip_forecast(h, stored, weights):
    """Block-level reuse of a residual forecast from stored model-dtype residuals."""
    return h + combine(stored, weights, h.dtype)
