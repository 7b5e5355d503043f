"""Static-buffer reuse history for the graph executor: fixed tensors updated in place, bookkeeping on the host.

A captured or compiled whole-model graph cannot append to Python lists, so each layer's history is
a set of preallocated tensors (newest entry first, written in place by traceable functions) and the
host keeps what `LayerCache` keeps: each layer's entry count and forecast-axis positions, from
which it computes the forecast weights, the byte counts and the entry counts. Stored forms are the
shared ones: model dtype, INT8 from `quant.encode`, or the anchored INT8 history of `codec`.
Buffers are zeroed at each generation (finite values under zero weights) and kept across
generations of one shape, so their addresses stay fixed for captured graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dqar.engine.forecasters import Forecaster, as_forecaster, forecaster_of
from dqar.engine.cache import HostHistory
from dqar.engine.codec import combine, forecast_anchored, rebase
from dqar.engine.quant import dequantize_values, encode


@dataclass(frozen=True)
class Spec:
    """How every layer stores and reads (one per engine; a compile-time constant of the graphs)."""

    block: bool  # block granularity: the residual is stored, else attn1's output
    kind: str  # "model" | "int8" (a copy) | "anchored" (INT8 that forecasts)
    slots: int  # entries kept per layer: the forecaster's depth (forecast_order + 1 for "taylor")
    mode: str = "tensor"
    heads: int = 1
    track: bool = False  # accumulate the INT8 round-trip error


def make_spec(cfg, heads: int) -> Spec:
    int8, depth = cfg.cache_dtype == "int8", forecaster_of(cfg).depth
    kind = ("anchored" if depth > 1 else "int8") if int8 else "model"
    return Spec(block=cfg.granularity == "block", kind=kind, slots=depth, mode=cfg.quant_mode, heads=heads,
                track=int8 and cfg.track_quant_error)


def _allocate(spec: Spec, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One layer's buffers for outputs shaped like `like` (B, T, C); the last is the (slots,) finite flags."""
    flags = torch.ones(spec.slots, dtype=torch.bool, device=like.device)
    if spec.kind == "model":
        return torch.zeros((spec.slots, *like.shape), dtype=like.dtype, device=like.device), flags
    values, scale, _ = encode(torch.zeros_like(like), spec.mode, spec.heads, False)
    if spec.kind == "int8":
        return values, scale, flags
    stack = lambda t: torch.zeros((spec.slots, *t.shape), dtype=t.dtype, device=t.device)  # noqa: E731
    return values, scale, stack(values), stack(scale), flags


def _entry_bytes(spec: Spec, bufs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(bytes of one stored entry, bytes of the anchor) as `LayerCache` counts them."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    if spec.kind == "model":
        return size(bufs[0][0]), 0
    if spec.kind == "int8":
        return size(bufs[0]) + size(bufs[1]), 0
    return size(bufs[2][0]) + size(bufs[3][0]), size(bufs[0]) + size(bufs[1])


# ----- traceable reads and writes (inside the graphs) ---------------------------------------------
def read(spec: Spec, bufs: tuple[torch.Tensor, ...], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a reuse returns: a copy or `Σ w_k · y_k` over the slots (`weights` (slots,), zero on unused slots)."""
    if spec.kind == "model":
        hist = bufs[0]  # (K, B, T, C)
        return hist[0] if spec.slots == 1 else combine([hist[k] for k in range(spec.slots)], weights, dtype)
    if spec.kind == "int8":
        return dequantize_values(bufs[0], bufs[1], dtype, spec.mode)
    anchor_v, anchor_s, diff_v, diff_s, _ = bufs
    k = range(spec.slots)
    return forecast_anchored(anchor_v, anchor_s, tuple(diff_v[i] for i in k), tuple(diff_s[i] for i in k), spec.mode, weights, dtype)


def write(spec: Spec, bufs: tuple[torch.Tensor, ...], x: torch.Tensor, error_sum: torch.Tensor) -> None:
    """Store `x` (B, T, C) as the layer's newest entry, in place; the INT8 round-trip error adds to `error_sum` ()."""
    flags = bufs[-1]
    if spec.kind == "model":
        hist = bufs[0]
        if spec.slots > 1:
            hist[1:].copy_(hist[:-1].clone())
            flags[1:].copy_(flags[:-1].clone())
        hist[0].copy_(x.detach())
        flags[0].copy_(torch.isfinite(x).all())
        return
    if spec.kind == "int8":
        values, scale, error = encode(x, spec.mode, spec.heads, spec.track)
        bufs[0].copy_(values), bufs[1].copy_(scale)
        flags[0].copy_(torch.isfinite(scale).all())
    else:
        anchor_v, anchor_s, diff_v, diff_s, _ = bufs
        kept = tuple((diff_v[i], diff_s[i]) for i in range(spec.slots - 1))
        values, scale, diffs, scales, error = rebase(x, (anchor_v, anchor_s), kept, spec.mode, spec.heads, spec.track)
        anchor_v.copy_(values), anchor_s.copy_(scale), diff_v.copy_(torch.stack(diffs)), diff_s.copy_(torch.stack(scales))
        flags[0].copy_(torch.stack([torch.isfinite(s).all() for s in (scale, *scales)]).all())
    if error is not None:
        error_sum.add_(error.sum())


def count_nonfinite(bufs: tuple[torch.Tensor, ...], bad: torch.Tensor) -> None:
    """A reuse of a history holding NaN/Inf adds one to `bad` () on the device."""
    bad.add_((~bufs[-1].all()).to(bad.dtype))


# ----- the host side ------------------------------------------------------------------------------
class StaticHistory(HostHistory):
    """The graph executor's cache: device buffers for one (shape, dtype) and the host bookkeeping of one generation.

    Offers what the engine's summary reads of a `LayerCache` (the shared `HostHistory`): bytes, entries, forecasts,
    error, non-finite count.
    """

    def __init__(self, spec: Spec, num_layers: int, order: "int | Forecaster"):
        self.spec, self.num_layers = spec, num_layers
        super().__init__(num_layers, order)
        self.buffers: dict[tuple, tuple] = {}  # (shape, dtype, device) -> (per-layer buffers, error_sum, bad)
        self.current: tuple | None = None
        self._weights: dict[torch.device, torch.Tensor] = {}  # device -> static (L, slots) weights
        self.begin()

    def begin(self) -> None:
        """A new generation: empty histories on the host; device buffers are zeroed when first used."""
        HostHistory.__init__(self, self.num_layers, self.forecaster)
        self.stores = 0
        self._zeroed: set[tuple] = set()

    def use(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple:
        """The buffers for outputs of `shape` (B, T, C), zeroed once per generation (no host sync)."""
        key = (tuple(shape), dtype, device)
        if key not in self.buffers:
            with torch.inference_mode(False):  # plain tensors: inference ones break in-place updates (and recompile) outside it
                like = torch.zeros(shape, dtype=dtype, device=device)
                layers = tuple(_allocate(self.spec, like) for _ in range(self.num_layers))
                error_sum = torch.zeros((), dtype=torch.float32, device=device)
                bad = torch.zeros((), dtype=torch.int64, device=device)
            for t in (*(b for layer in layers for b in layer), error_sum, bad):
                torch._dynamo.mark_static_address(t)  # fixed addresses: captured graphs update them in place
            self.buffers[key] = (layers, error_sum, bad)
            self._zeroed.add(key)
        elif key not in self._zeroed:
            layers, error_sum, bad = self.buffers[key]
            for layer in layers:
                for t in layer[:-1]:
                    t.zero_()
                layer[-1].fill_(True)
            error_sum.zero_(), bad.zero_()
            self._zeroed.add(key)
        self.current = self.buffers[key]
        self._entry, self._anchor = _entry_bytes(self.spec, self.current[0][0])
        return self.current

    def weight_buffer(self, device: torch.device) -> torch.Tensor:
        """The static (L, slots) forecast weights a graph reads, one per device (filled by device-side copies)."""
        if device not in self._weights:
            with torch.inference_mode(False):
                self._weights[device] = torch.zeros((self.num_layers, self.spec.slots), dtype=torch.float32, device=device)
            torch._dynamo.mark_static_address(self._weights[device])
        return self._weights[device]

    def step(self, row: tuple[bool, ...], store: tuple[bool, ...]) -> list[list[float]]:
        """Host bookkeeping of one evaluation: (L, slots) weights of each reusing layer (zeros elsewhere); stores recorded."""
        out = row_weights(self.where, row, self.position, self.forecaster, self.spec.slots)
        self.forecasts += sum(bool(r) and self.order > 0 and len(self.where[i]) > 1 for i, r in enumerate(row))  # len(w) > 1
        for layer, (reuse, keep) in enumerate(zip(row, store)):
            if not reuse and keep:
                self._record_store(layer)
        return out

    def _record_store(self, layer: int) -> None:
        where = self.where[layer]
        before = len(where)
        push(where, self.position, self.spec.slots)
        self.stores += 1
        self.account(len(where) - before, (len(where) - before) * self._entry + (self._anchor if before == 0 else 0))

    def mean_error(self) -> float | None:
        """Mean INT8 round-trip error of the stores (one host read, after a generation)."""
        if not self.spec.track or not self.stores or self.current is None:
            return None
        return float(self.current[1]) / self.stores

    def nonfinite_count(self) -> int:
        return 0 if self.current is None else int(self.current[2])


def row_weights(where: list[list[float]], row, position: float, order: "int | Forecaster", slots: int) -> list[list[float]]:
    """(L, slots) weights of one evaluation from each layer's stored positions `where` (newest first); zeros off reuses.

    `order`: a `Forecaster`, or a plain order (the "taylor" kind)."""
    forecaster = as_forecaster(order)
    out = [[0.0] * slots for _ in where]
    for layer, reuse in enumerate(row):
        if reuse:
            w = forecaster.weights(where[layer], position) if forecaster.extrapolates else (1.0,)
            out[layer][: len(w)] = w
    return out


def weight_table(num_layers: int, order: "int | Forecaster", slots: int, rows, stores, positions) -> list[list[list[float]]]:
    """(E, L, slots) weights of a whole generation, simulating `step`'s bookkeeping over known rows (exact for plans).

    A layer reuses only once it has stored (as the engine's `row & has`); `stores` are the rows of what computing layers keep.
    """
    where: list[list[float]] = [[] for _ in range(num_layers)]
    table = []
    for row, store, position in zip(rows, stores, positions):
        row = tuple(bool(r) and bool(where[i]) for i, r in enumerate(row))
        table.append(row_weights(where, row, float(position), order, slots))
        for layer, (reuse, keep) in enumerate(zip(row, store)):
            if not reuse and keep:
                push(where[layer], float(position), slots)
    return table


def push(where: list[float], position: float, slots: int) -> None:
    """Record a store at `position` in one layer's positions (newest first), keeping at most `slots`."""
    where.insert(0, position)
    del where[slots:]
