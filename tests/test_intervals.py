"""Intervals: bootstrap speedup intervals cover the true ratio, Wilson intervals, simultaneous levels; timing order."""
import numpy as np
import pytest

from dqar.studies.measure import intervals as I
from dqar.studies.ablation import records as REC
from dqar.studies.measure.timing import Timing, round_robin


class NoisyClock:
    """Each case takes its true time, times independent noise in [1 - noise, 1 + noise] (log-uniform)."""

    name = description = "simulated"

    def __init__(self, rng, noise=0.3):
        self.rng, self.noise = rng, noise

    def measure(self, fn):
        t = fn() * float(np.exp(self.rng.uniform(np.log(1 - self.noise), np.log(1 + self.noise))))
        return None, Timing(t, t)


def test_speedup_intervals_cover_the_true_ratio_over_200_simulated_studies():
    """The measured path (round-robin rounds, then the record's measurements) with ±30% noise and 5 repeats."""
    rng = np.random.default_rng(0)
    covered, simultaneous = 0, 0
    for study in range(200):
        true = float(rng.uniform(0.8, 1.6))  # the configuration's true speedup
        cases = {"baseline": lambda: 1.0, "config": lambda true=true: 1.0 / true}
        runs = round_robin(cases, NoisyClock(rng), 5, keep=lambda name, out: True)
        m = REC.measurements(runs["config"], runs["baseline"], 10, executor="patch", note=None, baseline_executor="patch",
                             flops_skipped=0.0)
        lo, hi = m["speedup_ci"]
        covered += lo <= true <= hi
        simultaneous += lo <= m["speedup"] <= hi
    assert covered / 200 >= 0.90, covered
    assert simultaneous == 200  # the point estimate always lies in its interval


def test_round_robin_starts_each_round_one_case_later():
    order = []
    cases = {n: (lambda n=n: order.append(n) or 1.0) for n in "abc"}
    runs = round_robin(cases, NoisyClock(np.random.default_rng(0), 0.01), 3)
    assert order == list("abc" "bca" "cab") and all(len(r) == 3 for r in runs.values())


def test_identical_repeats_give_a_point_interval_and_too_few_give_none():
    assert I.ratio_ci([2.0, 2.0, 2.0], [1.0, 1.0, 1.0]) == [2.0, 2.0]
    assert I.ratio_ci([2.0], [1.0]) is None


def test_simultaneous_intervals_are_wider():
    rng = np.random.default_rng(1)
    b, c = rng.uniform(0.9, 1.1, 5), rng.uniform(0.8, 1.0, 5)
    lo, hi = I.ratio_ci(b, c)
    slo, shi = I.ratio_ci(b, c, I.simultaneous_level(40))
    assert slo <= lo and hi <= shi and I.simultaneous_level(40) == pytest.approx(1 - 0.05 / 40)


def test_wilson_interval():
    lo, hi = I.wilson(9, 10)
    assert lo == pytest.approx(0.5958, abs=1e-3) and hi == pytest.approx(0.9821, abs=1e-3)  # the textbook 9/10 interval
    assert I.wilson(10, 10)[1] == pytest.approx(1.0) and I.wilson(0, 0) is None


def test_fd_delta_interval_contains_zero_for_the_same_features_and_not_for_shifted_ones():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 4))
    stats = {"mu": np.zeros(4), "sigma": np.eye(4)}
    assert I.fd_delta_ci(feats, feats, stats) == [0.0, 0.0]
    lo, hi = I.fd_delta_ci(feats + 1.0, feats, stats)
    assert lo > 0.0
