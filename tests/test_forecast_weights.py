"""dqar.engine.forecast: extrapolation weights reproduce polynomials of their order, drop order when history is short."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqar.engine.forecast import positions, table, weights
from dqar.errors import DqarError

coef = st.floats(-3, 3, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(a=coef, b=coef, c=coef, start=st.integers(0, 30), gaps=st.lists(st.integers(1, 5), min_size=2, max_size=2),
       ahead=st.integers(1, 6), order=st.sampled_from([0, 1, 2]))
def test_order_k_reproduces_a_polynomial_of_degree_k(a, b, c, start, gaps, ahead, order):
    """Outputs that are polynomials of degree <= order in the position are forecast exactly at any age."""
    xs = [start + sum(gaps[:i]) for i in range(3)][::-1]  # newest first
    at = xs[0] + ahead
    poly = [lambda x: a, lambda x: a + b * x, lambda x: a + b * x + c * x * x][order]
    w = weights(xs, at, order)
    assert len(w) == order + 1
    assert np.isclose(sum(wi * poly(x) for wi, x in zip(w, xs)), poly(at), atol=1e-6 * (1 + abs(poly(at))))


def test_first_order_is_the_two_point_line():
    # r(e) = r(e0) + (e - e0) (r(e0) - r(e1)) / (e0 - e1): positions 6 and 4, forecast at 7
    assert weights([6, 4], 7, 1) == pytest.approx((1.5, -0.5))
    assert weights([6, 4], 7, 0) == (1.0,)


def test_a_quadratic_is_not_reproduced_by_first_order():
    xs, at = [4.0, 3.0, 2.0], 6.0
    y = [x * x for x in xs]
    lin = sum(w * v for w, v in zip(weights(xs, at, 1), y))
    quad = sum(w * v for w, v in zip(weights(xs, at, 2), y))
    assert quad == pytest.approx(36.0) and abs(lin - 36.0) > 1.0


def test_short_history_uses_the_order_it_has():
    assert weights([3.0], 5.0, 2) == (1.0,)
    assert len(weights([3.0, 1.0], 5.0, 2)) == 2


@pytest.mark.parametrize("bad", [3, -1, 1.5])
def test_unsupported_order_is_refused(bad):
    with pytest.raises(DqarError, match="forecast_order"):
        weights([1.0, 0.0], 2.0, bad)


def test_positions_follow_the_axis():
    assert positions("evaluation", 3, [999, 500, 1]).tolist() == [0.0, 1.0, 2.0]
    assert positions("timestep", 3, [999, 500, 1]).tolist() == [999.0, 500.0, 1.0]
    with pytest.raises(DqarError, match="forecast_axis"):
        positions("steps", 3)


def test_table_gives_weights_only_on_reuse_cells_from_the_layers_own_history():
    mask = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [1, 0]], dtype=bool)  # (E=5, L=2)
    w = table(mask, np.arange(5.0), order=1)
    assert w.shape == (5, 2, 2)
    assert not w[~mask].any()
    assert w[1, 0].tolist() == [1.0, 0.0]  # only one computed output yet: a copy
    assert w[3, 0] == pytest.approx([1.5, -0.5])  # from evaluations 2 and 0, one evaluation ahead
    assert w[4, 0] == pytest.approx([2.0, -1.0])  # two ahead
    assert w[2, 1] == pytest.approx([2.0, -1.0])  # layer 1 computed at 1 and 0
