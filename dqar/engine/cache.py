"""The per-layer reuse cache: stores in the model dtype or INT8, and reads the stored form back."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dqar.engine.quant import QTensor, dequantize, encode, nbytes


@dataclass(frozen=True)
class StorePolicy:
    """How one kind of cached tensor is stored."""

    int8: bool
    mode: str = "tensor"
    num_heads: int = 1


Entry = tuple  # tuple of torch.Tensor | QTensor, one per cached tensor (1 for outputs, 2 for K/V)


class LayerCache:
    """One slot per layer; each slot holds the last stored value(s) of that layer."""

    def __init__(self, num_layers: int, policies: tuple[StorePolicy, ...], track_error: bool):
        self.policies = policies  # one per tensor of an entry
        self.slots: list[Entry | None] = [None] * num_layers
        self.track_error = track_error and any(p.int8 for p in policies)
        self.bytes_now = 0
        self.bytes_peak = 0
        self.error_sum: torch.Tensor | None = None  # 0-dim float32 on the device, relative L2 error summed
        self.error_count = 0
        self.finite: list[torch.Tensor | None] = [None] * num_layers  # per layer: 0-dim bool, every stored value finite
        self.nonfinite_reused: torch.Tensor | None = None  # 0-dim int64 on the device: reuses of non-finite entries

    def has(self, layer: int) -> bool:
        return self.slots[layer] is not None

    def put(self, layer: int, *tensors: torch.Tensor) -> None:
        """Store `tensors` for `layer`, replacing what was there."""
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
        self.finite[layer] = _all_finite(entry)
        old = self.slots[layer]
        self.bytes_now += sum(nbytes(v) for v in entry) - (sum(nbytes(v) for v in old) if old else 0)
        self.bytes_peak = max(self.bytes_peak, self.bytes_now)
        self.slots[layer] = entry

    def finite_flags(self, layers: list[int]) -> torch.Tensor:
        """(len(layers),) bool on the device: which of these layers' entries are all finite."""
        return torch.stack([self.finite[layer] for layer in layers])

    def count_nonfinite(self, layers: list[int]) -> None:
        """Add, on the device, how many of these layers' entries hold NaN/Inf (read after the generation)."""
        bad = (~self.finite_flags(layers)).sum()
        self.nonfinite_reused = bad if self.nonfinite_reused is None else self.nonfinite_reused + bad

    def nonfinite_count(self) -> int:
        return 0 if self.nonfinite_reused is None else int(self.nonfinite_reused)

    def stored(self, layer: int) -> Entry:
        """What `layer` holds, in its stored form (INT8 entries as `QTensor`)."""
        return self.slots[layer]

    def get(self, layer: int) -> tuple[torch.Tensor, ...]:
        """The stored tensors of `layer`, dequantized from what is actually stored."""
        return tuple(dequantize(v) if isinstance(v, QTensor) else v for v in self.slots[layer])

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


def _all_finite(entry: Entry) -> torch.Tensor:
    """0-dim bool on the device; for INT8 the scales tell (a NaN/Inf input makes its group's scale non-finite)."""
    flags = [torch.isfinite(v.scale if isinstance(v, QTensor) else v).all() for v in entry]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()
