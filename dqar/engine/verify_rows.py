"""Per-sample refresh for the verifying decider (`verify_per_sample = true`): each sample refreshes on its own probe error.

The batch decider (`dqar.engine.verify`) refreshes the whole batch when the probe block's error over the batch exceeds
τ. Here each sample gets its own error and its own verdict, and the batch splits after the probe without copying the
model: each later block is called on the rows of the samples that refresh (`take_rows` slices every batched input),
and the other rows read their forecast. A sample's CFG rows decide together: with batched CFG ([cond; uncond], the
DiT sampler) rows r and r + N are one sample, judged by the relative L1 over both; with CFG as separate forwards
(Flux's true CFG) the first branch decides per row and the later branches replay its split. A batch whose CFG halves
the engine is not told of (a stock pipeline other than DiTPipeline that batches them, e.g. SD3's through `dqar.enable`)
decides per row.

History: each row keeps its own (`dqar.engine.row_cache.RowCache`). At a split evaluation the refreshing rows store
their fresh outputs and the reusing rows store nothing, as each would alone; a later forecast weighs each row's entries
by its own positions. So, with a model-dtype history, a batch samples as its samples do one by one (up to float
rounding; an INT8 history shares its quantization scales over the batch). A split store re-encodes the layer's
history: one more quantization of the kept entries per split, where the batch decider re-encodes them at every store.
`verify_min_interval` / `verify_max_interval` count per sample. FLOPs skipped count rows: a split layer-evaluation
skips the reusing rows' share of its work (`ReuseStats.flops_skipped`); the reuse mask marks it reused.

Cost: one device→host read per evaluation, of the (G,) errors, where the batch decider reads one scalar, and an
index upload (host→device) where the batch splits. Executor "patch" only: a compiled or captured graph would see a
new batch size at every split. Probe "first" only: the split then covers the rest of the same evaluation. Measured
(docs/BENCHMARKS.md, CPU, DiT batch 8): where it splits, 0.90 of the batch decider's speed (at 0.9 points fewer FLOPs
skipped); at matched work its PSNR is within about ±0.5 dB of the batch decider's on the DiT, +1.4 to −0.5 dB on
embedded-flux (docs/FIDELITY.md "Adaptive"), and it loses to the best static plan on both.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dqar.engine.adapter import form_of, outputs, pack
from dqar.engine.verify import VerifyDecider


@dataclass(frozen=True)
class Split:
    """One evaluation's split of the batch: the rows that compute the later blocks, and the share of rows that reuse."""

    rows: torch.Tensor  # (R,) int64 on the device, ascending
    share: float  # reusing rows / all rows
    mask: np.ndarray  # (G,) bool on the host: which samples reuse
    refresh: np.ndarray  # (B,) bool on the host: which rows compute and store


class SampleVerifyDecider(VerifyDecider):
    """The verifying decider with one verdict per sample (module docstring); probe "first"."""

    per_sample = True
    name = "the per-sample verifying decider"

    def begin(self, ctx) -> None:
        super().begin(ctx)
        self.since = np.zeros(0, dtype=np.int64)  # (G,) consecutive reuses of each sample's later layers
        self.masks: dict[int, np.ndarray] = {}  # evaluation → (G,) bool reuse, where the batch split
        self.sample_errors: dict[int, np.ndarray] = {}  # evaluation → (G,) ε read

    def verdict(self, evaluation: int, error: torch.Tensor | None):
        """The probe computed; `error` (G,) on the device (None: no history). Returns (row, store row, read, (G,) mask or None)."""
        e, l = evaluation, self.num_layers
        if error is None or l == 1:
            self.since = np.zeros(0, dtype=np.int64)
            row = self._set(e, False, False)
            return row, self._store, False, None
        if len(self.since) != error.shape[0]:
            self.since = np.zeros(error.shape[0], dtype=np.int64)
        forced_refresh = self.since >= self.cfg.verify_max_interval  # (G,)
        forced_reuse = self.since < self.cfg.verify_min_interval
        read = bool((~forced_refresh & ~forced_reuse).any())
        ok = np.zeros(len(self.since), dtype=bool)
        if read:
            errs = error.detach().float().cpu().numpy()  # the one device→host read of this evaluation
            self.sample_errors[e], self.errors[e] = errs, float(errs.max())
            ok = errs <= self.tau[e]
        reuse = np.where(forced_reuse, True, np.where(forced_refresh, False, ok))  # (G,)
        self.since = np.where(reuse, self.since + 1, 0)
        row = self._set(e, False, bool(reuse.any()))
        if reuse.all() or not reuse.any():
            return row, self._store, read, None
        self._store = (True,) * l  # a split evaluation: every layer stores, on the refreshing rows only
        self.stores[e] = self._store
        self.masks[e] = reuse
        return row, self._store, read, reuse


def sample_errors(pairs, guided: bool) -> torch.Tensor:
    """(G,) per-sample relative L1 of (fresh, forecast) pairs, max over streams; guided: rows r and r + N are one sample."""
    out = []
    for fresh, forecast in pairs:
        fresh = fresh.float()
        num = (fresh - forecast.float()).abs().flatten(1).sum(1)  # (B,)
        den = fresh.abs().flatten(1).sum(1)  # (B,)
        if guided:
            num, den = num.view(2, -1).sum(0), den.view(2, -1).sum(0)  # (N,)
        out.append(num / den.clamp_min(1e-12))
    return out[0] if len(out) == 1 else torch.stack(out).amax(0)


def _guided(st, batch: int) -> bool:
    return bool(st.guided) and batch % 2 == 0


def make_split(mask: np.ndarray, batch: int, guided: bool, device: torch.device) -> Split:
    """The rows of the refreshing samples (both CFG halves where guided) as a device index."""
    groups = np.flatnonzero(~mask)
    rows = np.sort(np.concatenate([groups, groups + len(mask)]) if guided else groups)
    refresh = np.zeros(batch, dtype=bool)
    refresh[rows] = True
    index = torch.as_tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    return Split(rows=index, share=float(mask.mean()), mask=mask, refresh=refresh)


def begin_evaluation(engine, hidden: torch.Tensor) -> None:
    """At each evaluation: no split yet, or the split this step's first CFG branch decided (a replaying branch)."""
    st, decider = engine.state, engine.verifier
    st.split = None
    mask = decider.masks.get(st.evaluation) if decider.replaying else None
    if mask is not None:
        st.split = make_split(mask, hidden.shape[0], _guided(st, hidden.shape[0]), hidden.device)


def observe(engine, layer: int, *fresh: torch.Tensor | None) -> None:
    """The probe computed `fresh` (one tensor per stream, (B, T, C) / (B, S, C) or None): per-sample verdicts, the split."""
    st, decider = engine.state, engine.verifier
    if decider.replaying or not decider.active[st.evaluation]:
        return
    slot, batch = engine.slots[layer], fresh[0].shape[0]
    pairs = [(f, st.cache.read(slot + i, count=False)) for i, f in enumerate(fresh) if f is not None and st.cache.has(slot + i)]
    error = sample_errors(pairs, _guided(st, batch)) if pairs and st.cache.has(slot) else None  # (G,)
    st.row, st.store, read, mask = decider.verdict(st.evaluation, error)
    st.host_syncs += read
    if mask is not None:
        st.split = make_split(mask, batch, _guided(st, batch), fresh[0].device)


def store(st, slot: int, x: torch.Tensor) -> None:
    """Store a computed stream (B, T, C): every row, or at a split evaluation the refreshing rows only."""
    if st.split is None:
        st.cache.put(slot, x)
    else:
        st.cache.put_rows(slot, x, st.split.refresh)


def take_rows(args: tuple, kwargs: dict, rows: torch.Tensor, batch: int) -> tuple[tuple, dict]:
    """`args` / `kwargs` with every tensor of `batch` leading rows cut to `rows` (others, e.g. rotary tuples, as they are)."""
    cut = lambda v: v.index_select(0, rows) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def split_block(engine, layer: int, original, args: tuple, kwargs: dict, hidden: torch.Tensor,
                encoder: torch.Tensor | None):
    """A later block of a split evaluation: called on the refreshing rows, the forecast residual on the others."""
    st, slot, spec, rows = engine.state, engine.slots[layer], engine.layout.specs[layer], engine.state.split.rows
    sub_args, sub_kwargs = take_rows(args, kwargs, rows, hidden.shape[0])
    out = original(*sub_args, **sub_kwargs)
    h_sub, e_sub = outputs(spec, out)  # (R, T, C), (R, S, C) or None
    engine.forms[layer] = form_of(out)
    residual = st.cache.read(slot).index_copy(0, rows, h_sub - hidden.index_select(0, rows))  # (B, T, C)
    text = None
    if e_sub is not None and encoder is not None:
        text = st.cache.read(slot + 1, count=False).index_copy(0, rows, e_sub - encoder.index_select(0, rows))  # (B, S, C)
    st.executed[st.evaluation, layer] = True
    st.row_share[st.evaluation, layer] = st.split.share
    if st.store[layer]:
        store(st, slot, residual)
        if text is not None:
            store(st, slot + 1, text)
    return pack(spec, engine.forms[layer], hidden + residual, None if text is None else encoder + text)
