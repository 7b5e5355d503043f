"""The online reuse gate: on top of the layer schedule, reuse only where entropy < τ and SNR ∈ [a, b].

Decisions are taken once per model evaluation, at its start: the entropy of each layer's
last computed attention and the evaluation's SNR are compared with the thresholds on the
device, packed into one integer and read back with a single host sync. Warmup, cooldown,
the layer schedule and the staleness cap (`min(interval - 1, max_staleness)` at each evaluation, the interval ramped with `refresh_interval_end`) are
host-side and cost nothing. With τ = 1 and an all-accepting SNR window the gate executes
exactly the schedule's plan.
"""
from __future__ import annotations

import numpy as np
import torch

from dqar.engine.config import ReuseConfig
from dqar.engine.decider import EligibleDecider
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


class GateDecider(EligibleDecider):
    """Per-evaluation decisions from the online gate; at most one host sync per evaluation."""

    name = "the gate"

    def __init__(self, cfg: ReuseConfig):
        super().__init__(cfg)
        self.needs = Needs(entropy=True, snr=(cfg.snr_source,), entropy_rows=cfg.entropy_rows)

    def accept(self, evaluation: int, candidate: np.ndarray) -> np.ndarray:
        return read_flags(gate_flags(self.signals, self.cfg, self.signals.device))
