"""The per-layer reuse cache: a short history of stored values (model dtype or INT8), read back as a copy or a forecast.

Each layer keeps its newest stored values (the forecaster's `depth`, `order + 1` for "taylor"), newest first, each with its
position on the forecast axis (`dqar.engine.forecasters`). A reuse reads a copy of the newest (order 0, or a
layer with one stored value) or `Σ w_i · y_i` over its history, with weights computed on the
host from those positions: no value is read back from the device. Every history entry is kept
in its stored form (INT8 values and float32 scales), and the byte counts include all of them;
an INT8 history that forecasts is anchored (`dqar.engine.codec`): one more INT8 tensor per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dqar.engine.forecasters import Forecaster, as_forecaster
from dqar.engine.codec import Codec, combine
from dqar.engine.quant import QTensor, dequantize, encode, nbytes


@dataclass(frozen=True)
class StorePolicy:
    """How one kind of cached tensor is stored."""

    int8: bool
    mode: str = "tensor"
    num_heads: int = 1


Entry = tuple  # tuple of torch.Tensor | QTensor, one per cached tensor (1 for outputs, 2 for K/V)


def device_weights(weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(k,) float32 weights on `device` without a host sync (pinned, non-blocking copy on CUDA)."""
    host = torch.tensor(weights, dtype=torch.float32)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class HostHistory:
    """The host side of a reuse history, shared by `LayerCache` and the graph executor's `StaticHistory`.

    Per slot (a layer's output stream), the forecast-axis positions of its stored entries, newest first;
    the current evaluation's position; bytes and entries held (now and peak) and reuses that forecast.
    Nothing here touches a device tensor.
    """

    def __init__(self, num_slots: int, order: "int | Forecaster"):
        self.forecaster = as_forecaster(order)  # a plain order is the "taylor" kind
        self.order = self.forecaster.depth - 1  # entries kept per slot, minus one
        self.where: list[list[float]] = [[] for _ in range(num_slots)]  # forecast-axis position of each entry
        self.position = 0.0  # the current evaluation's position on the forecast axis
        self.bytes_now = self.bytes_peak = self.entries_now = self.entries_peak = 0
        self.forecasts = 0  # reuses read as an extrapolation of two or more stored values

    def at(self, position: float) -> None:
        """The evaluation that begins lies at `position` on the forecast axis (host float)."""
        self.position = position

    def has(self, slot: int) -> bool:
        return bool(self.where[slot])

    def account(self, entries: int, nbytes: int) -> None:
        """Entries and bytes added (negative: dropped) by one store."""
        self.entries_now += entries
        self.bytes_now += nbytes
        self.bytes_peak = max(self.bytes_peak, self.bytes_now)
        self.entries_peak = max(self.entries_peak, self.entries_now)


class LayerCache(HostHistory):
    """Per layer, the newest `depth` stored values with their positions; reads a copy or a forecast."""

    def __init__(self, num_layers: int, policies: tuple[StorePolicy, ...], track_error: bool, order: "int | Forecaster" = 0,
                 codec: Codec = Codec()):
        super().__init__(num_layers, order)
        self.policies = policies  # one per tensor of an entry
        self.codec = codec
        self.anchored = self.order > 0 and len(policies) == 1 and policies[0].int8  # INT8 entries as differences from an anchor
        self.anchors: list[QTensor | None] = [None] * num_layers
        self.history: list[list[Entry]] = [[] for _ in range(num_layers)]  # newest first
        self._flags: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # 0-dim bool per entry: all finite
        self.track_error = track_error and any(p.int8 for p in policies)
        self.error_sum: torch.Tensor | None = None  # 0-dim float32 on the device, relative L2 error summed
        self.error_count = 0
        self.finite: list[torch.Tensor | None] = [None] * num_layers  # per layer: 0-dim bool, every stored value finite
        self.nonfinite_reused: torch.Tensor | None = None  # 0-dim int64 on the device: reuses of non-finite entries
        self._device_weights: dict[tuple, torch.Tensor] = {}

    def put(self, layer: int, *tensors: torch.Tensor) -> None:
        """Store `tensors` for `layer` as its newest entry."""
        if self.anchored:
            self._put_anchored(layer, *tensors)
            return
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
        self.account(1 - len(dropped), _bytes(entry) - sum(_bytes(old) for old in dropped))

    def _put_anchored(self, layer: int, x: torch.Tensor) -> None:
        """The anchored INT8 history: x quantized as the new anchor, x and the kept entries as differences from it."""
        policy, old = self.policies[0], self.anchors[layer]
        kept = tuple((q.values, q.scale) for (q,) in self.history[layer][: self.order])
        coded = self.codec.rebase(x, None if old is None else (old.values, old.scale), kept, policy.mode, policy.num_heads,
                                  self.track_error)
        before, count = self.held_bytes(layer), len(self.history[layer])
        self.set_anchored(layer, coded, x.dtype)
        self.where[layer] = [self.position, *self.where[layer][: self.order]]
        self.account(len(self.history[layer]) - count, self.held_bytes(layer) - before)

    def set_anchored(self, layer: int, coded: tuple, dtype: torch.dtype) -> None:
        """`layer`'s anchored history from `codec.rebase` / `codec.encode_history`'s (anchor values, anchor scale,
        difference values, difference scales, round-trip error or None); the error is accumulated."""
        values, scale, diffs, diff_scales, error = coded
        mode = self.policies[0].mode
        if error is not None:
            self.error_sum = error if self.error_sum is None else self.error_sum + error
            self.error_count += 1
        self.anchors[layer] = QTensor(values=values, scale=scale, dtype=dtype, mode=mode)
        self.history[layer] = [(QTensor(values=v, scale=s, dtype=dtype, mode=mode),) for v, s in zip(diffs, diff_scales)]
        self.finite[layer] = torch.stack([torch.isfinite(s).all() for s in (scale, *diff_scales)]).all()

    def held_bytes(self, layer: int) -> int:
        """Bytes `layer`'s history holds: its entries, and the anchor of an anchored history."""
        anchor = self.anchors[layer]
        return _bytes(self.history[layer]) + (anchor.nbytes if anchor is not None else 0)

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
        if self.anchored:
            return (self._forecast(layer, (1.0,)),)
        return tuple(dequantize(v) if isinstance(v, QTensor) else v for v in self.history[layer][0])

    def weights(self, layer: int, count: bool = True) -> tuple[float, ...]:
        """Host-side weights of reusing `layer` now, one per entry used (newest first); `count`: a reuse (counted as a forecast)."""
        if self.order == 0:
            return (1.0,)
        w = self.forecaster.weights(self.where[layer], self.position)
        self.forecasts += count and len(w) > 1
        return w

    def weights_on(self, weights: tuple[float, ...], device: torch.device) -> torch.Tensor:
        """`weights` as a (k,) tensor on `device`, uploaded once per distinct value in this generation."""
        key = (weights, device)
        if key not in self._device_weights:
            self._device_weights[key] = device_weights(weights, device)
        return self._device_weights[key]

    def read(self, layer: int, count: bool = True) -> torch.Tensor:
        """What a reuse of `layer` returns now: a copy of its newest output, or the forecast from its history.

        `count = False`: a measurement of what a reuse would return (signal traces), not a reuse.
        """
        w = self.weights(layer, count)
        if self.anchored:
            return self._forecast(layer, w)
        if len(w) == 1:
            return self.get(layer)[0]
        entries = [entry[0] for entry in self.stored(layer, len(w))]  # model-dtype tensors (INT8 forecasts are anchored)
        return combine(entries, w, entries[0].dtype)

    def _forecast(self, layer: int, w: tuple[float, ...]) -> torch.Tensor:
        """`Σ w_i · (Â + d̂_i)` from an anchored history, with the codec (weights as a tensor when it is compiled)."""
        anchor, diffs = self.anchors[layer], [entry[0] for entry in self.stored(layer, len(w))]
        weights = self.weights_on(w, anchor.values.device) if self.codec.tensor_weights else w
        return self.codec.forecast(anchor.values, anchor.scale, tuple(d.values for d in diffs), tuple(d.scale for d in diffs),
                                   anchor.mode, weights, anchor.dtype)

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


def _bytes(entry) -> int:
    """Bytes of an entry, or of a list of entries."""
    return sum(_bytes(v) if isinstance(v, (tuple, list)) else nbytes(v) for v in entry)


def _all_finite(entry: Entry) -> torch.Tensor:
    """0-dim bool on the device; for INT8 the scales tell (a NaN/Inf input makes its group's scale non-finite)."""
    flags = [torch.isfinite(v.scale if isinstance(v, QTensor) else v).all() for v in entry]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()
