"""How a layer's history is written and read back: copies, forecasts, and the anchored INT8 history (all traceable).

A forecast is `Σ_i w_i · y_i` over the layer's newest stored outputs (weights from
`dqar.engine.forecast`). Extrapolation weights are large and of both signs (e.g. 15/8, -5/4, 3/8),
so independent INT8 errors of the entries would add up to more than a copy's error. The INT8
history is therefore *anchored*: one INT8 anchor `A` (the newest output, quantized) and every
entry stored as an INT8 difference from the decoded anchor, `y_i ≈ Â + d̂_i`. The newest entry's
difference is the anchor's own rounding error (a second INT8 pass), the older entries'
differences are small: each decoded entry is off by a fraction of its distance from the newest,
and the anchor's error cancels. Each store re-encodes the kept entries against the new anchor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dqar.engine.quant import dequantize_values, quantize_values
from dqar.engine.signals import relative_change


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where a forecast is summed: float32, or the model dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def combine(parts: Sequence[torch.Tensor], weights, dtype: torch.dtype) -> torch.Tensor:
    """`Σ_i weights[i] · parts[i]` (newest first), summed in the accumulation dtype, returned in `dtype`.

    `weights`: host floats (eager) or a (k,) tensor on the device (compiled graphs, so that new weights never
    recompile).
    """
    acc = accumulation_dtype(dtype)
    out = parts[0].to(acc) * weights[0]
    for part, w in zip(parts[1:], weights[1:]):
        out = out + part.to(acc) * w
    return out.to(dtype)


def decode(anchor: tuple[torch.Tensor, torch.Tensor], deltas: Sequence[tuple[torch.Tensor, torch.Tensor]], mode: str,
           acc: torch.dtype) -> list[torch.Tensor]:
    """The entries of an anchored history, `Â + d̂_i` (newest first), in `acc`."""
    base = dequantize_values(anchor[0], anchor[1], acc, mode)
    return [base + dequantize_values(v, s, acc, mode) for v, s in deltas]


def encode_history(entries: Sequence[torch.Tensor], mode: str, heads: int, track: bool):
    """An anchored history of decoded `entries` (newest first): the newest quantized as the anchor, every entry as an INT8
    difference from the decoded anchor. Returns (anchor values, anchor scale, difference values, difference scales, the
    newest entry's round-trip error or None)."""
    src = entries[0].detach()
    acc = accumulation_dtype(src.dtype)
    anchor_values, anchor_scale = quantize_values(src, mode, heads)
    base = dequantize_values(anchor_values, anchor_scale, acc, mode)
    coded = [quantize_values(y.to(acc) - base, mode, heads) for y in [src, *entries[1:]]]
    values, scales = tuple(c[0] for c in coded), tuple(c[1] for c in coded)
    error = relative_change(base + dequantize_values(values[0], scales[0], acc, mode), src) if track else None
    return anchor_values, anchor_scale, values, scales, error


def rebase(x: torch.Tensor, anchor: tuple | None, kept: tuple, mode: str, heads: int, track: bool):
    """An anchored history with `x` newest: x quantized as the new anchor, then INT8 differences from the decoded
    anchor of x and of each kept older entry (decoded from the old `anchor` and its differences `kept`).

    `anchor`: (values, scale) or None (no history yet); `kept`: ((values, scale), …) newest first.
    Returns (anchor values, anchor scale, difference values, difference scales, x's round-trip error or None).
    """
    older = decode(anchor, kept, mode, accumulation_dtype(x.dtype)) if anchor is not None else []
    return encode_history([x, *older], mode, heads, track)


def forecast_anchored(anchor_values: torch.Tensor, anchor_scale: torch.Tensor, values: tuple, scales: tuple, mode: str, weights,
                      dtype: torch.dtype) -> torch.Tensor:
    """`Σ_i weights[i] · (Â + d̂_i)` over the newest len(weights) entries of an anchored history, in `dtype`."""
    return combine(decode((anchor_values, anchor_scale), list(zip(values, scales)), mode, accumulation_dtype(dtype)), weights, dtype)


@dataclass(frozen=True)
class Codec:
    """The anchored history's write and read: eager, or compiled by the compiled executor (weights then as tensors)."""

    rebase: Callable = rebase
    forecast: Callable = forecast_anchored
    tensor_weights: bool = False
