"""The per-layer reuse cache: a short history of stored values (model dtype or INT8), read back as a copy or a forecast.

Each layer keeps its newest `order + 1` stored values, newest first, each with its position on
the forecast axis (`dqar.engine.forecast`). A reuse reads a copy of the newest (order 0, or a
layer with one stored value) or `Σ w_i · y_i` over its history, with weights computed on the
host from those positions: no value is read back from the device. Every history entry is kept
in its stored form (INT8 values and float32 scales), and the byte counts include all of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dqar.engine import forecast
from dqar.engine.quant import QTensor, dequantize, dequantize_values, encode, nbytes


@dataclass(frozen=True)
class StorePolicy:
    """How one kind of cached tensor is stored."""

    int8: bool
    mode: str = "tensor"
    num_heads: int = 1


Entry = tuple  # tuple of torch.Tensor | QTensor, one per cached tensor (1 for outputs, 2 for K/V)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where a forecast is summed: float32, or the model dtype when it is wider."""
    return torch.promote_types(dtype, torch.float32)


def forecast_stored(values: Sequence[torch.Tensor], scales: Sequence[torch.Tensor] | None, mode: str, weights,
                    dtype: torch.dtype) -> torch.Tensor:
    """`Σ_i weights[i] · y_i` over stored values, newest first, returned in `dtype`; traceable.

    `values`: INT8 values with their float32 `scales` (dequantized straight into the accumulation dtype), or
    model-dtype tensors (`scales` None). `weights`: host floats (eager) or a (k,) tensor on the device
    (compiled graphs, so that new weights never recompile).
    """
    acc = accumulation_dtype(dtype)
    parts = [v.to(acc) for v in values] if scales is None else [dequantize_values(v, s, acc, mode) for v, s in zip(values, scales)]
    out = parts[0] * weights[0]
    for part, w in zip(parts[1:], weights[1:]):
        out = out + part * w
    return out.to(dtype)


def split_stored(entries: Sequence[torch.Tensor | QTensor]) -> tuple[tuple, tuple | None, str]:
    """(values, scales or None, mode) of stored single-tensor entries, for `forecast_stored`."""
    if isinstance(entries[0], QTensor):
        return tuple(q.values for q in entries), tuple(q.scale for q in entries), entries[0].mode
    return tuple(entries), None, ""


def device_weights(weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(k,) float32 weights on `device` without a host sync (pinned, non-blocking copy on CUDA)."""
    host = torch.tensor(weights, dtype=torch.float32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class LayerCache:
    """Per layer, the newest `order + 1` stored values with their positions; reads a copy or a forecast."""

    def __init__(self, num_layers: int, policies: tuple[StorePolicy, ...], track_error: bool, order: int = 0):
        self.policies = policies  # one per tensor of an entry
        self.order = order
        self.history: list[list[Entry]] = [[] for _ in range(num_layers)]  # newest first
        self.where: list[list[float]] = [[] for _ in range(num_layers)]  # forecast-axis position of each entry
        self._flags: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # 0-dim bool per entry: all finite
        self.position = 0.0  # the current evaluation's position on the forecast axis
        self.track_error = track_error and any(p.int8 for p in policies)
        self.bytes_now = 0
        self.bytes_peak = 0
        self.entries_now = 0
        self.entries_peak = 0
        self.forecasts = 0  # reuses read as an extrapolation of two or more stored values
        self.error_sum: torch.Tensor | None = None  # 0-dim float32 on the device, relative L2 error summed
        self.error_count = 0
        self.finite: list[torch.Tensor | None] = [None] * num_layers  # per layer: 0-dim bool, every stored value finite
        self.nonfinite_reused: torch.Tensor | None = None  # 0-dim int64 on the device: reuses of non-finite entries
        self._device_weights: dict[tuple, torch.Tensor] = {}

    def at(self, position: float) -> None:
        """The evaluation that begins lies at `position` on the forecast axis (host float)."""
        self.position = position

    def has(self, layer: int) -> bool:
        return bool(self.history[layer])

    def put(self, layer: int, *tensors: torch.Tensor) -> None:
        """Store `tensors` for `layer` as its newest entry."""
        encoded = [self._encode(t, p) for t, p in zip(tensors, self.policies)]
        errors = [err for _, err in encoded if err is not None]
        self.put_encoded(layer, tuple(v for v, _ in encoded), torch.stack(errors) if errors else None)

    def put_encoded(self, layer: int, entry: Entry, error: torch.Tensor | None = None) -> None:
        """Store values already in their stored form (e.g. quantized by `quant.encode` inside a compiled graph).

        `error`: the round-trip error of each INT8 tensor of the entry, () or (n,), on the device.
        """
        if error is not None:
            self.error_sum = error.sum() if self.error_sum is None else self.error_sum + error.sum()
            self.error_count += error.numel()
        hist, flags = self.history[layer], self._flags[layer]
        hist.insert(0, entry)
        self.where[layer].insert(0, self.position)
        flags.insert(0, _all_finite(entry))
        dropped = hist[self.order + 1:]
        del hist[self.order + 1:], self.where[layer][self.order + 1:], flags[self.order + 1:]
        self.finite[layer] = flags[0] if len(flags) == 1 else torch.stack(flags).all()
        self.bytes_now += _bytes(entry) - sum(_bytes(old) for old in dropped)
        self.entries_now += 1 - len(dropped)
        self.bytes_peak = max(self.bytes_peak, self.bytes_now)
        self.entries_peak = max(self.entries_peak, self.entries_now)

    def finite_flags(self, layers: list[int]) -> torch.Tensor:
        """(len(layers),) bool on the device: which of these layers' histories are all finite."""
        return torch.stack([self.finite[layer] for layer in layers])

    def count_nonfinite(self, layers: list[int]) -> None:
        """Add, on the device, how many of these layers' histories hold NaN/Inf (read after the generation)."""
        bad = (~self.finite_flags(layers)).sum()
        self.nonfinite_reused = bad if self.nonfinite_reused is None else self.nonfinite_reused + bad

    def nonfinite_count(self) -> int:
        return 0 if self.nonfinite_reused is None else int(self.nonfinite_reused)

    def stored(self, layer: int, count: int = 1) -> list[Entry]:
        """The newest `count` entries of `layer`, newest first, in their stored form (INT8 entries as `QTensor`)."""
        return self.history[layer][:count]

    def get(self, layer: int) -> tuple[torch.Tensor, ...]:
        """The newest stored tensors of `layer`, dequantized from what is actually stored."""
        return tuple(dequantize(v) if isinstance(v, QTensor) else v for v in self.history[layer][0])

    def weights(self, layer: int) -> tuple[float, ...]:
        """Host-side weights of reusing `layer` now, one per entry used (newest first); call once per reuse."""
        if self.order == 0:
            return (1.0,)
        w = forecast.weights(self.where[layer], self.position, self.order)
        self.forecasts += len(w) > 1
        return w

    def weights_on(self, weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
        """`weights` as a (k,) tensor on `device`, uploaded once per distinct value in this generation."""
        key = (weights, device)
        if key not in self._device_weights:
            self._device_weights[key] = device_weights(weights, device)
        return self._device_weights[key]

    def read(self, layer: int) -> torch.Tensor:
        """What a reuse of `layer` returns now: a copy of its newest output, or the forecast from its history."""
        w = self.weights(layer)
        if len(w) == 1:
            return self.get(layer)[0]
        entries = [entry[0] for entry in self.stored(layer, len(w))]
        return forecast_stored(*split_stored(entries), w, entries[0].dtype)

    def _encode(self, x: torch.Tensor, policy: StorePolicy) -> tuple[torch.Tensor | QTensor, torch.Tensor | None]:
        """The stored form of `x` and its round-trip error (None when not INT8 or not tracked)."""
        if not policy.int8:
            return x.detach(), None
        values, scale, error = encode(x, policy.mode, policy.num_heads, self.track_error)
        return QTensor(values=values, scale=scale, dtype=x.dtype, mode=policy.mode), error

    def mean_error(self) -> float | None:
        """Mean relative L2 round-trip error of INT8 stores (one host read, after a generation)."""
        if self.error_sum is None:
            return None
        return float(self.error_sum) / self.error_count


def _bytes(entry: Entry) -> int:
    return sum(nbytes(v) for v in entry)


def _all_finite(entry: Entry) -> torch.Tensor:
    """0-dim bool on the device; for INT8 the scales tell (a NaN/Inf input makes its group's scale non-finite)."""
    flags = [torch.isfinite(v.scale if isinstance(v, QTensor) else v).all() for v in entry]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()
