"""Intervals: bootstrap CIs of speedups and of ΔFD (`scipy.stats.bootstrap`), Wilson intervals of class accuracy.

Speedup = median(baseline times) / median(configuration times). The i-th baseline and configuration
runs are timed in the same round (dqar.studies.measure.timing.round_robin), so the bootstrap resamples rounds
(paired). Percentile intervals: with few repeats they stay honest (≥ 90% coverage of the true ratio at
5 repeats and ±30% noise, tests/test_intervals.py). Every resampling is seeded, so the same
numbers always give the same interval.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 20_000  # enough for the far tails of simultaneous intervals
FD_RESAMPLES = 400  # each ΔFD resample computes two Fréchet distances
SEED = 0
METHOD = ("95% percentile-bootstrap interval of median(baseline) / median(configuration), resampling the rounds "
          f"(scipy.stats.bootstrap, paired, {RESAMPLES} resamples, seeded)")


def _ratio_of_medians(base, own, axis=-1):
    return np.median(base, axis=axis) / np.median(own, axis=axis)


def ratio_ci(base: Sequence[float], own: Sequence[float], level: float = LEVEL) -> list[float] | None:
    """Interval of median(base) / median(own) over paired repeats; None with fewer than two pairs."""
    base, own = np.asarray(base, dtype=float), np.asarray(own, dtype=float)
    if len(base) < 2 or len(base) != len(own):
        return None
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # identical repeats: a degenerate (zero-width) interval is the right answer
        res = stats.bootstrap((base, own), _ratio_of_medians, paired=True, vectorized=True, axis=-1, method="percentile",
                              confidence_level=level, n_resamples=RESAMPLES, rng=np.random.default_rng(SEED))
    lo, hi = res.confidence_interval
    point = float(_ratio_of_medians(base, own))
    if not (np.isfinite(lo) and np.isfinite(hi)):  # every resample equal
        return [point, point]
    return [float(min(lo, point)), float(max(hi, point))]


def simultaneous_level(comparisons: int, level: float = LEVEL) -> float:
    """Per-interval level that keeps `comparisons` intervals covering together with `level` (Bonferroni)."""
    return 1.0 - (1.0 - level) / max(1, comparisons)


def wilson(correct: int, n: int, level: float = LEVEL) -> list[float] | None:
    """Wilson score interval of a proportion `correct` / `n`; None for n = 0."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def fd_delta_ci(own: np.ndarray, base: np.ndarray, stats: dict, level: float = LEVEL) -> list[float]:
    """Interval of FD(own) − FD(base) against real-data `stats`, resampling images (paired: the same seeds).

    `own`, `base`: (N, D) classifier features of the configuration's and the baseline's images.
    """
    from scipy import stats as S

    from dqar.metrics import feature_stats, frechet_distance

    def delta(idx):
        idx = np.asarray(idx, dtype=int)
        fds = [frechet_distance(*feature_stats(f[idx]), stats["mu"], stats["sigma"]) for f in (own, base)]
        return fds[0] - fds[1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = S.bootstrap((np.arange(len(own)),), delta, vectorized=False, method="percentile", confidence_level=level,
                          n_resamples=FD_RESAMPLES, rng=np.random.default_rng(SEED))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def mean_ci(values: Sequence[float], level: float = LEVEL) -> list[float] | None:
    """Percentile-bootstrap interval of the mean of `values` (e.g. per-sample paired PSNR differences); None below 2 values."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    if np.all(values == values[0]):
        return [float(values[0])] * 2
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((values,), np.mean, vectorized=True, axis=-1, method="percentile", confidence_level=level,
                              n_resamples=RESAMPLES, rng=np.random.default_rng(SEED))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]
