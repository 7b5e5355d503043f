"""Symmetric absmax INT8 quantization with per-tensor/channel/head/token scales.

`x_q = clip(round(x / s), -127, 127)`, `s = max|x| / 127` over the scale's group,
so every element's round-trip error is at most `s / 2` of its group. Scales are kept
in float32. A group that is all zeros gets `s = 1` (no division by zero; it
dequantizes to exact zeros). Non-finite input gives a non-finite scale for its group;
`quantize(..., check=True)` raises instead, and `is_finite(q)` tells on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dqar.engine.config import QUANT_MODES
from dqar.engine.signals import relative_change
from dqar.errors import DqarError

QMAX = 127


@dataclass(frozen=True)
class QTensor:
    """An INT8 tensor and the float32 scales that dequantize it."""

    values: torch.Tensor  # int8, shape of the original tensor
    scale: torch.Tensor  # float32, broadcastable to `values`
    dtype: torch.dtype  # dtype to dequantize to
    mode: str

    @property
    def nbytes(self) -> int:
        """True storage: INT8 values plus float32 scales."""
        return self.values.numel() * self.values.element_size() + self.scale.numel() * self.scale.element_size()


def _absmax(x: torch.Tensor, mode: str, num_heads: int) -> torch.Tensor:
    """Per-group max |x| in float32, shaped to broadcast against `x` (or its head view for mode 'head')."""
    a = x.detach().float().abs()
    if mode == "tensor":
        return a.amax().reshape([1] * x.ndim)
    if mode == "channel":
        return a.amax(dim=tuple(range(x.ndim - 1)), keepdim=True)  # (1, ..., 1, C)
    if mode == "token":
        return a.amax(dim=-1, keepdim=True)  # (..., 1)
    if mode == "head":
        h = a.unflatten(-1, (num_heads, -1))  # (..., H, D)
        return h.amax(dim=tuple(range(h.ndim - 2)) + (h.ndim - 1,), keepdim=True)  # (1, ..., 1, H, 1)
    raise DqarError(f"unknown quant mode '{mode}'", f"choose one of: {', '.join(QUANT_MODES)}")


def quantize_values(x: torch.Tensor, mode: str, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 values and float32 scales of `x` (..., C): traceable, so compiled graphs quantize with the same rule."""
    amax = _absmax(x, mode, num_heads)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / QMAX)  # NaN/Inf stay non-finite
    src = x.detach().float()
    if mode == "head":
        src = src.unflatten(-1, (num_heads, -1))  # (..., H, D)
    return torch.clamp(torch.round(src / scale), -QMAX, QMAX).to(torch.int8), scale


def quantize(x: torch.Tensor, mode: str = "tensor", num_heads: int = 1, check: bool = False) -> QTensor:
    """Quantize `x` (..., C) to INT8 with scales per `mode`; 'head' splits C into `num_heads` groups."""
    if mode == "head" and (num_heads < 1 or x.shape[-1] % num_heads):
        raise DqarError(f"cannot split {x.shape[-1]} channels into {num_heads} heads", "use a head count that divides the channel count")
    values, scale = quantize_values(x, mode, num_heads)
    if check and not bool(torch.isfinite(scale).all()):
        raise DqarError("cannot quantize a tensor holding NaN or Inf", "recompute the value instead of caching it")
    return QTensor(values=values, scale=scale, dtype=x.dtype, mode=mode)


def dequantize_values(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, mode: str) -> torch.Tensor:
    """INT8 values × float32 scales → `dtype`, a 'head' layout (..., H, D) flattened back to (..., C); traceable."""
    x = values.float() * scale
    if mode == "head":
        x = x.flatten(-2)  # (..., H, D) -> (..., C)
    return x.to(dtype)


def dequantize(q: QTensor) -> torch.Tensor:
    """Back to the original dtype and shape."""
    return dequantize_values(q.values, q.scale, q.dtype, q.mode)


def round_trip_error(x: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, mode: str) -> torch.Tensor:
    """Relative L2 error of storing `x` as (`values`, `scale`): () float32 on the device; traceable."""
    return relative_change(dequantize_values(values, scale, x.dtype, mode), x.detach())


def encode(x: torch.Tensor, mode: str, num_heads: int, track: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What a cache stores for `x`: INT8 values, float32 scales and, when `track`, the round-trip error; traceable."""
    values, scale = quantize_values(x, mode, num_heads)
    return values, scale, (round_trip_error(x, values, scale, mode) if track else None)


def is_finite(q: QTensor) -> torch.Tensor:
    """0-dim bool tensor on the device: True when every scale is finite (no host sync)."""
    return torch.isfinite(q.scale).all()


def error_bound(q: QTensor) -> torch.Tensor:
    """Largest round-trip error each element may have: half its group's scale, broadcast to the values."""
    bound = (q.scale / 2).expand_as(q.values)
    return bound.flatten(-2) if q.mode == "head" else bound


def nbytes(x: torch.Tensor | QTensor) -> int:
    """Bytes a cached value really occupies."""
    if isinstance(x, QTensor):
        return x.nbytes
    return x.numel() * x.element_size()
