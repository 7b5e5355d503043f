"""A layer cache whose rows keep their own histories: per-sample refresh (`verify_per_sample`, `dqar.engine.verify_rows`).

`LayerCache` keeps one list of forecast positions per layer for the whole batch. Under per-sample refresh some rows
store at an evaluation and others do not, so here each row has its own positions: (K, B) per slot, NaN where a row
holds fewer entries. A store of the whole batch (`put`) pushes every row, as `LayerCache` does. A split store
(`put_rows`) pushes only the refreshing rows: the slot's history is decoded, each refreshing row shifted by one entry
with its fresh value newest, the other rows left as they were, and the history encoded again in its stored form (model
dtype, INT8, or the anchored INT8 history, one quantization per entry). A read where every row has the same positions is
`LayerCache`'s; otherwise each row gets its own forecast weights, (K, B) uploaded once per distinct table in a generation,
so each sample forecasts from exactly what it would hold if sampled alone.
"""
from __future__ import annotations

import numpy as np
import torch

from dqar.engine.cache import LayerCache, _all_finite
from dqar.engine.codec import accumulation_dtype, combine, decode, encode_history
from dqar.engine.quant import QTensor, dequantize


class RowCache(LayerCache):
    """`LayerCache` with per-row positions (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_where: list[np.ndarray | None] = [None] * len(self.history)  # slot → (K, B) positions, NaN: no entry

    def put(self, layer: int, *tensors: torch.Tensor) -> None:
        super().put(layer, *tensors)
        self._push(layer, np.ones(tensors[0].shape[0], dtype=bool))

    def _push(self, layer: int, rows: np.ndarray) -> None:
        """Record a store at the current position for `rows` (B,) bool; the other rows keep their positions."""
        old = self.rows_where[layer]
        b = len(rows)
        old = np.full((0, b), np.nan) if old is None else old
        shifted = np.vstack([np.full((1, b), self.position), old])[: self.order + 1]  # (K', B) every row pushed
        kept = np.vstack([old, np.full((1, b), np.nan)])[: len(shifted)]  # the same rows not pushed
        self.rows_where[layer] = np.where(rows[None, :], shifted, kept)

    def put_rows(self, layer: int, x: torch.Tensor, rows: np.ndarray) -> None:
        """Store `x` (B, T, C) for the rows where `rows` (B,) is True; the other rows keep their history."""
        if rows.all() or not self.has(layer):
            self.put(layer, x)
            return
        if not rows.any():
            return
        old = self._decoded(layer, x.dtype)  # K × (B, T, C), newest first
        push = torch.as_tensor(rows, device=x.device).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, …)
        pushed = [x.detach(), *old][: self.order + 1]
        kept = old + [old[-1]] * (len(pushed) - len(old))  # a row not pushed pads with its oldest entry (weight 0)
        self._rewrite(layer, [torch.where(push, p, k) for p, k in zip(pushed, kept)])
        self._push(layer, rows)

    def _decoded(self, layer: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Every entry of `layer`'s history in `dtype`, newest first."""
        if self.anchored:
            anchor = self.anchors[layer]
            diffs = [(q.values, q.scale) for (q,) in self.history[layer]]
            return [y.to(dtype) for y in decode((anchor.values, anchor.scale), diffs, anchor.mode, accumulation_dtype(dtype))]
        return [dequantize(v) if isinstance(v, QTensor) else v for (v,) in self.history[layer]]

    def _rewrite(self, layer: int, entries: list[torch.Tensor]) -> None:
        """Replace `layer`'s history by `entries` (newest first), in its stored form, bytes accounted."""
        before, count = self.held_bytes(layer), len(self.history[layer])
        policy = self.policies[0]
        if self.anchored:
            self.set_anchored(layer, encode_history(entries, policy.mode, policy.num_heads, self.track_error), entries[0].dtype)
        else:
            coded = [self._encode(y, policy) for y in entries]
            self.history[layer] = [(v,) for v, _ in coded]
            self._flags[layer] = [_all_finite(entry) for entry in self.history[layer]]
            self.finite[layer] = torch.stack(self._flags[layer]).all()
            error = coded[0][1]  # the newest entry's round-trip error (None: not INT8 or not tracked)
            if error is not None:
                self.error_sum = error if self.error_sum is None else self.error_sum + error
                self.error_count += 1
        self.where[layer] = [self.position, *self.where[layer]][: len(entries)]
        self.account(len(entries) - count, self.held_bytes(layer) - before)

    def read(self, layer: int, count: bool = True) -> torch.Tensor:
        table = self._row_weights(layer)
        if table is None:
            return super().read(layer, count)
        self.forecasts += count and table.shape[0] > 1
        entries = self._decoded(layer, self._dtype(layer))
        w = self.weights_on(tuple(map(tuple, table.tolist())), entries[0].device)  # (K, B)
        shape = (w.shape[0], w.shape[1], *([1] * (entries[0].dim() - 1)))
        return combine(entries, w.view(shape), entries[0].dtype)  # (B, T, C)

    def _dtype(self, layer: int) -> torch.dtype:
        """The dtype `layer`'s entries decode to (a `QTensor` and a tensor both name it)."""
        return (self.anchors[layer] if self.anchored else self.history[layer][0][0]).dtype

    def _row_weights(self, layer: int) -> np.ndarray | None:
        """(K, B) forecast weights of each row from its own positions; None where every row has the same positions."""
        where = self.rows_where[layer]
        if where is None or self.order == 0 or all(np.array_equal(where[:, 0], where[:, i], equal_nan=True)
                                                   for i in range(1, where.shape[1])):
            return None
        table = np.zeros(where.shape)
        for i in range(where.shape[1]):
            col = where[:, i]
            w = self.forecaster.weights([float(p) for p in col[~np.isnan(col)]], self.position)
            table[: len(w), i] = w
        return table
