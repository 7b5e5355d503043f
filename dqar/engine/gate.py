"""The online reuse gate: on top of the layer schedule, reuse only where entropy < τ and SNR ∈ [a, b].

Decisions are taken once per model evaluation, at its start: the entropy of each layer's
last computed attention and the evaluation's SNR are compared with the thresholds on the
device, packed into one integer and read back with a single host sync. Warmup, cooldown,
the layer schedule and the staleness cap (`min(interval - 1, max_staleness)` at each evaluation, the interval ramped with `refresh_interval_end`) are
host-side and cost nothing. With τ = 1 and an all-accepting SNR window the gate executes
exactly the schedule's plan.

`gate_signal = "probe_error"` (`ProbeGateDecider`): the gate reads the verifying decider's signal instead. The probe
block (`verify_probe`) is never a candidate and computes at every evaluation; its fresh output is compared with its
forecast inside the forward, `ε = mean|fresh − forecast| / mean|fresh|` (`dqar.engine.verify.stream_error`), and the
candidates after the probe reuse iff `ε <= τ(progress) · verify_scale` (`verify.tau_schedule` over `verify_tau`).
Candidates before the probe run before it: they follow the last verdict read. The schedule's eligibility and the
staleness cap still decide the candidates. The probe stores its output only where no layer reuses, so the forecast
it is checked against is as old as the others'. One host read (ε) per evaluation with candidates after the probe,
counted in `ReuseStats.host_syncs`; with τ = ∞ the other layers execute the schedule's plan. A later CFG branch of
a decided evaluation (separate forwards) replays its rows, as the verifying decider does.
"""
from __future__ import annotations

import numpy as np
import torch

from dqar.engine.config import ReuseConfig
from dqar.engine.decider import EligibleDecider
from dqar.engine.signals import Needs, SignalRecorder
from dqar.engine.verify import probe_index, tau_schedule

WORD_BITS = 62  # flags per int64 word read back with one `.item()`


def gate_flags(signals: SignalRecorder, cfg: ReuseConfig, device: torch.device) -> torch.Tensor:
    """(L,) bool on the device: the layer's latest entropy < τ and the current SNR inside [snr_min, snr_max]."""
    ok = signals.entropy_vector(device) < cfg.entropy_tau  # (L,)
    snr = signals.snr.get(cfg.snr_source)
    if snr is None:
        return torch.zeros_like(ok)
    return ok & (snr >= cfg.snr_min) & (snr <= cfg.snr_max)


def read_flags(flags: torch.Tensor) -> np.ndarray:
    """Bring (L,) bool flags to the host in one read: packed into one int64 (`.item()`) when L <= 62."""
    n = flags.numel()
    if n > WORD_BITS:
        return flags.cpu().numpy().astype(bool)  # one transfer
    weights = torch.ones((), dtype=torch.int64, device=flags.device) << torch.arange(n, device=flags.device)  # (L,)
    word = int((flags.to(torch.int64) * weights).sum().item())
    return np.array([(word >> i) & 1 for i in range(n)], dtype=bool)


class GateDecider(EligibleDecider):
    """Per-evaluation decisions from the online gate; at most one host sync per evaluation.

    `GateDecider(cfg)` with `cfg.gate_signal == "probe_error"` is a `ProbeGateDecider`.
    """

    name = "the gate"

    def __new__(cls, cfg: ReuseConfig):
        if cfg.gate_signal == "probe_error":
            return ProbeGateDecider(cfg)  # not a GateDecider: Python does not run GateDecider.__init__ on it
        return super().__new__(cls)

    def __init__(self, cfg: ReuseConfig):
        super().__init__(cfg)
        self.needs = Needs(entropy=True, snr=(cfg.snr_source,), entropy_rows=cfg.entropy_rows)

    def accept(self, evaluation: int, candidate: np.ndarray) -> np.ndarray:
        return read_flags(gate_flags(self.signals, self.cfg, self.signals.device))


class ProbeGateDecider(EligibleDecider):
    """The gate on the probe block's forecast error (module docstring): its verdict comes from `verify.observe`."""

    name = "the probe-error gate"
    verifies = True  # the engine calls `verify.observe` when the probe computes

    def __init__(self, cfg: ReuseConfig):
        super().__init__(cfg)
        self.needs = Needs()  # the engine measures the probe itself: no signal recorder
        self.probe = -1
        self.errors = np.zeros(0)  # (E,) ε read at each evaluation (NaN: not read), the last generation's

    def begin(self, ctx) -> None:
        super().begin(ctx)
        e, l = ctx.num_evaluations, ctx.num_layers
        self.probe = probe_index(self.cfg.verify_probe, l)
        self.eligible[:, self.probe] = False  # the probe computes at every evaluation
        self.tau = tau_schedule(self.cfg.verify_tau, self.cfg.verify_scale, e)  # (E,)
        self.errors = np.full(e, np.nan)
        self.active = np.zeros(e, dtype=bool)  # (E,) evaluations whose verdict waits on the probe (`observe` reads them)
        self.stores = np.ones((e, l), dtype=bool)  # (E, L) store rows as decided
        self.ok = False  # the last verdict read: the layers before the probe follow it
        self.last = -1  # the last evaluation decided: a later CFG branch of it replays
        self.replaying = False
        self._candidate = np.zeros(l, dtype=bool)
        self._row = self._store_now = ()

    def accept(self, evaluation: int, candidate: np.ndarray) -> np.ndarray:
        """(L,) at the start of an evaluation: the layers before the probe follow the last verdict; the later ones are
        accepted provisionally (`verdict` decides them before they run); the probe never."""
        ok = np.ones_like(candidate)
        ok[: self.probe] = self.ok
        ok[self.probe] = False
        return ok

    def _final(self, e: int, reuse: np.ndarray) -> tuple[bool, ...]:
        """Record evaluation e's reuse row (L,) and its store row (the probe stores only where nothing reuses)."""
        store = np.array(self._store[e], dtype=bool)  # (L,)
        store[self.probe] = not reuse.any()
        self.staleness = np.where(reuse, self.staleness + 1, 0)
        self.decisions[e], self.stores[e] = reuse, store
        self._row, self._store_now = tuple(reuse.tolist()), tuple(store.tolist())
        return self._row

    def row(self, evaluation: int) -> tuple[bool, ...]:
        e, p = evaluation, self.probe
        if e <= self.last:  # a later CFG branch of this evaluation: its rows again, nothing read
            self.replaying = True
            self._row, self._store_now = tuple(self.decisions[e].tolist()), tuple(self.stores[e].tolist())
            return self._row
        self.replaying, self.last = False, e
        candidate = self.eligible[e] & (self.staleness < self.limits[e])  # (L,)
        candidate &= self.accept(e, candidate)
        self._candidate = candidate
        self.active[e] = bool(candidate[p + 1:].any())
        if not self.active[e]:
            return self._final(e, candidate)
        reuse = candidate.copy()  # provisional after the probe: `verdict` decides before those layers run
        self._row = tuple(reuse.tolist())
        store = np.array(self._store[e], dtype=bool)
        store[p] = False
        self._store_now = tuple(store.tolist())
        return self._row

    def store_row(self, evaluation: int) -> tuple[bool, ...]:
        return self._store_now

    def verdict(self, evaluation: int, error) -> tuple[tuple[bool, ...], tuple[bool, ...], bool]:
        """The probe computed with forecast error `error` (() on the device; None: no history): (reuse row, store row,
        whether ε was read to the host)."""
        e, p = evaluation, self.probe
        read = error is not None
        if read:
            self.errors[e] = float(error)  # the one device→host read of this evaluation
        self.ok = read and bool(self.errors[e] <= self.tau[e])
        reuse = self._candidate.copy()
        reuse[p + 1:] &= self.ok
        return self._final(e, reuse), self._store_now, read
