"""The online reuse gate: on top of the layer schedule, reuse only where entropy < τ and SNR ∈ [a, b].

Decisions are taken once per model evaluation, at its start: the entropy of each layer's
last computed attention and the evaluation's SNR are compared with the thresholds on the
device, packed into one integer and read back with a single host sync. Warmup, cooldown,
the layer schedule and the staleness cap (`min(refresh_interval - 1, max_staleness)`) are
host-side and cost nothing. With τ = 1 and an all-accepting SNR window the gate executes
exactly the schedule's plan.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dqar.engine.config import ReuseConfig
from dqar.errors import DqarError
from dqar.engine.plan import eligibility, staleness_limit
from dqar.engine.signals import Needs, SignalRecorder

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


class GateDecider:
    """Per-evaluation decisions from the online gate; at most one host sync per evaluation."""

    def __init__(self, cfg: ReuseConfig):
        self.cfg = cfg
        self.needs = Needs(entropy=True, snr=(cfg.snr_source,), entropy_rows=cfg.entropy_rows)
        self.signals: SignalRecorder | None = None
        self.decisions = np.zeros((0, 0), dtype=bool)  # (E, L) rows decided in the current generation

    def begin(self, num_evaluations: int, num_layers: int, scheduler: Any = None, signals: SignalRecorder | None = None) -> None:
        if signals is None:
            raise DqarError("the gate needs the engine's signal recorder", "attach it with dqar.enable(model, config)")
        self.signals = signals
        e, l = num_evaluations, num_layers
        self.eligible = eligibility(self.cfg, e, l) if self.cfg.enabled else np.zeros((e, l), dtype=bool)  # (E, L)
        self.eligible[0] = False  # evaluation 0 always computes
        self.limit = staleness_limit(self.cfg.refresh_interval, self.cfg.max_staleness)
        # store a computed output whenever the next evaluation may reuse it
        self._store = [tuple(r) for r in np.concatenate([self.eligible[1:], np.zeros((1, l), dtype=bool)]).tolist()]
        self.staleness = np.zeros(l, dtype=np.int64)  # (L,) evaluations since the cached output was computed
        self.decisions = np.zeros((e, l), dtype=bool)

    def row(self, evaluation: int) -> tuple[bool, ...]:
        candidate = self.eligible[evaluation] & (self.staleness < self.limit)  # (L,)
        if candidate.any():
            flags = gate_flags(self.signals, self.cfg, self.signals.device)
            candidate = candidate & read_flags(flags)
            self.signals.host_syncs += 1
        self.staleness = np.where(candidate, self.staleness + 1, 0)
        self.decisions[evaluation] = candidate
        return tuple(candidate.tolist())

    def store_row(self, evaluation: int) -> tuple[bool, ...]:
        return self._store[evaluation]
