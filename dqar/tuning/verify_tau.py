"""Calibrate the verifying decider's threshold to a target work: bisect `verify_scale` on probe seeds.

The τ schedule's shape (`verify_tau`) is kept; one scale multiplies it. Each trial generates the probe labels with
seeds offset by `seed_offset` (1000, as `dqar.studies.core.SEED_OFFSET`: other noise than the evaluated samples)
and reads the FLOPs skipped. A larger scale reuses more, so the search bisects log(scale) for the smallest
skipped fraction at or above the target. What is skipped is a whole batch's (decisions are per generation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from dqar.engine.config import ReuseConfig, RunConfig
from dqar.errors import DqarError
from dqar.generate import generate

SCALE_RANGE = (1e-3, 1e3)  # the scales searched (τ × scale)


@dataclass(frozen=True)
class TauCalibration:
    """The calibrated config (`verify_scale` set) and every trial, (scale, FLOPs skipped fraction)."""

    config: ReuseConfig
    scale: float
    skipped: float  # mean FLOPs skipped fraction over the probe batches at `scale`
    target: float
    trials: list[tuple[float, float]] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        """Whether the target is within 0.02 (the study's matched-work tolerance)."""
        return abs(self.skipped - self.target) <= 0.02


def reads_verify_scale(cfg: ReuseConfig) -> bool:
    """Whether `cfg`'s decider compares a probe error with τ × `verify_scale`: the verifying decider, the probe-error gate."""
    return cfg.decider == "verify" or (cfg.gate and cfg.gate_signal == "probe_error")


def skipped_at(loaded, batches: Sequence[Sequence[int]], run: RunConfig, scale: float, seed_offset: int) -> float:
    """Mean FLOPs skipped fraction of the verifying decider at `scale` over `batches` of probe labels."""
    reuse = replace(run.reuse, verify_scale=scale)
    fractions = []
    for i, labels in enumerate(batches):
        sample = replace(run.sample, seed=run.sample.seed + seed_offset + 100 * i)
        fractions.append(generate(loaded, labels, RunConfig(reuse=reuse, sample=sample), executor="patch").stats.flops_skipped_fraction)
    return sum(fractions) / len(fractions)


def calibrate_tau(loaded, batches: Sequence[Sequence[int]], run: RunConfig, target: float, *, steps: int = 8,
                  seed_offset: int = 1000) -> TauCalibration:
    """`run.reuse` (the verifying decider or the probe-error gate) with `verify_scale` bisected so the probe batches skip `target` of the FLOPs.

    `batches`: lists of class labels, one generation each; `steps`: bisection steps on log(scale). Where even the
    largest scale skips less than the target (the interval bounds cap it), the largest is returned (`reached` False).
    """
    if not reads_verify_scale(run.reuse):
        raise DqarError("τ calibration tunes the verifying decider or the probe-error gate",
                        "use a config with decider = 'verify' (e.g. preset 'adaptive') or gate = true, gate_signal = 'probe_error'")
    if not 0.0 < target < 1.0:
        raise DqarError(f"target = {target} is out of range", "use a fraction of FLOPs skipped in (0, 1)")
    if not batches or not all(batches):
        raise DqarError("τ calibration needs at least one non-empty batch of probe labels", "pass e.g. [[0, 1, 2, 3]]")
    trials: list[tuple[float, float]] = []

    def trial(scale: float) -> float:
        trials.append((scale, skipped_at(loaded, batches, run, scale, seed_offset)))
        return trials[-1][1]

    lo, hi = math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])
    if trial(math.exp(hi)) < target:
        best = trials[-1]
    else:
        for _ in range(steps):
            mid = (lo + hi) / 2
            if trial(math.exp(mid)) >= target:
                hi = mid
            else:
                lo = mid
        above = [t for t in trials if t[1] >= target]
        best = min(above, key=lambda t: (t[1], t[0]))
        closest = min(trials, key=lambda t: abs(t[1] - target))
        best = closest if abs(closest[1] - target) < abs(best[1] - target) else best
    return TauCalibration(replace(run.reuse, verify_scale=best[0]), best[0], best[1], target, trials)
