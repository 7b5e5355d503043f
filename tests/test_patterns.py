"""Bounded patterns: plans limited to N distinct rows, every changed row only computing more."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqar.engine.config import ReuseConfig
from dqar.engine.plan import Plan, bound_patterns, build_plan, max_run_staleness
from dqar.errors import DqarError


def patterns(mask: np.ndarray) -> int:
    return Plan(mask=mask).num_patterns


@st.composite
def masks(draw):
    """(E, L) bool masks of any density, from few to many distinct rows."""
    e, l = draw(st.integers(1, 40)), draw(st.integers(1, 10))
    density = draw(st.sampled_from([0.1, 0.5, 0.9]))
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random((e, l)) < density


@settings(max_examples=300, deadline=None)
@given(masks(), st.integers(1, 20))
def test_bounded_masks_fit_and_only_compute_more(mask, bound):
    out = bound_patterns(mask, bound)
    assert out.shape == mask.shape and out.dtype == np.bool_
    assert patterns(out) <= bound
    assert not (out & ~mask).any()  # a cell reuses only where the input reuses
    assert max_run_staleness(out) <= max_run_staleness(mask)
    if patterns(mask) <= bound:
        assert np.array_equal(out, mask)


def test_an_intersection_can_serve_two_rows():
    """Rows 1110 and 0111 share 0110: with room for one reusing row both become it, keeping 2 of 3 reuses each."""
    mask = np.array([[0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]] * 4, dtype=bool)  # (12, 4), 3 patterns
    out = bound_patterns(mask, 2)
    assert patterns(out) == 2
    np.testing.assert_array_equal(out[1], [0, 1, 1, 0])
    np.testing.assert_array_equal(out[2], [0, 1, 1, 0])


def test_frequent_rows_are_kept_and_one_slot_means_all_compute():
    mask = np.zeros((10, 3), dtype=bool)  # (E, L)
    mask[1:8] = [1, 1, 0]  # frequent
    mask[8] = [1, 1, 1]  # rare superset: becomes the frequent row
    mask[9] = [0, 0, 1]  # rare, disjoint: computes
    out = bound_patterns(mask, 2)
    np.testing.assert_array_equal(out[1:9], np.tile([1, 1, 0], (8, 1)))
    assert not out[9].any()
    assert not bound_patterns(mask, 1).any()
    assert np.array_equal(bound_patterns(np.ones((4, 3), dtype=bool), 1), np.ones((4, 3), dtype=bool))  # one pattern fits


def test_a_linear_schedule_keeps_most_of_its_reuse():
    plan = build_plan(ReuseConfig(schedule="linear"), 50, 28)
    assert plan.num_patterns > 16
    out = bound_patterns(plan.mask, 16)
    assert patterns(out) <= 16 and out.sum() >= 0.9 * plan.mask.sum()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_bound_below_one_is_refused(bad):
    with pytest.raises(DqarError, match="max_patterns"):
        bound_patterns(np.zeros((3, 2), dtype=bool), bad)
