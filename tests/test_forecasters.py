"""Issue 24 item 2: forecast kinds (`forecast_kind`: taylor, hermite, bdf2_heun) as host-side weights over the history.

Each kind against known trajectories (polynomials, exp decay, sin, a noisy line), the history depth each declares,
its one-line config errors, and that each acts on the executors (patch, fused, the graph's code run eagerly) with an
INT8 history and on the embedded model.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch

import dqar
import dqar.engine.graph as graph
import dqar.engine.variants as variants
from dqar.engine import history as H
from dqar.engine.cache import LayerCache, StorePolicy
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.engine.forecast import weights as lagrange
from dqar.engine.forecasters import FORECAST_KINDS, Forecaster
from dqar.errors import DqarError

from conftest import drive, make_tiny_transformer

KINDS = [Forecaster("taylor", 2), Forecaster("hermite", 2), Forecaster("hermite", 1, 5), Forecaster("bdf2_heun", 2)]


def predict(f: Forecaster, fn, xs, at) -> float:
    w = f.weights(xs, at)
    return sum(wi * fn(x) for wi, x in zip(w, xs))


@pytest.mark.parametrize("f", KINDS, ids=lambda f: f"{f.kind}{f.order}p{f.points}")
@pytest.mark.parametrize("xs,at", [([0.0, -1.0, -2.0, -3.0, -4.0], 1.0), ([30.0, 50.0, 90.0, 100.0, 140.0], 10.0)])
def test_every_kind_sums_to_one_and_reproduces_a_line(f, xs, at):
    w = f.weights(xs, at)
    assert len(w) == min(f.depth, len(xs)) and sum(w) == pytest.approx(1.0, abs=1e-12)
    assert predict(f, lambda x: 3.0 - 0.5 * x, xs, at) == pytest.approx(3.0 - 0.5 * at, abs=1e-9)


def test_taylor_is_the_lagrange_weights_bit_for_bit():
    for order in (0, 1, 2):
        for xs in ([5.0], [5.0, 3.0], [5.0, 3.0, 2.5], [0.0, 20.0, 60.0]):
            assert Forecaster("taylor", order).weights(xs, 7.0) == lagrange(xs, 7.0, order)


@pytest.mark.parametrize("points", [3, 4, 6])
def test_hermite_reproduces_polynomials_of_its_degree_over_any_points(points):
    xs = [0.0, -1.5, -2.0, -4.0, -4.5, -7.0][:points]
    quad = lambda x: 2.0 - x + 0.25 * x * x  # noqa: E731
    assert predict(Forecaster("hermite", 2, points), quad, xs, 1.0) == pytest.approx(quad(1.0), abs=1e-9)


def test_hermite_with_more_points_smooths_a_noisy_line():
    rng = np.random.default_rng(0)
    xs = [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
    err = {"taylor": [], "hermite": []}
    for _ in range(200):
        noise = dict(zip(xs, rng.normal(0.0, 0.1, len(xs))))
        fn = lambda x: 1.0 + 0.3 * x + noise[x]  # noqa: E731
        err["taylor"].append(abs(predict(Forecaster("taylor", 1), fn, xs, 1.0) - 1.3))
        err["hermite"].append(abs(predict(Forecaster("hermite", 1, 6), fn, xs, 1.0) - 1.3))
    assert np.mean(err["hermite"]) < 0.5 * np.mean(err["taylor"])


def test_bdf2_heun_weights_on_uniform_steps_and_its_second_order_convergence():
    assert Forecaster("bdf2_heun", 2).weights([0.0, -1.0, -2.0], 1.0) == pytest.approx((2.5, -2.0, 0.5))
    for fn in (lambda x: np.exp(-x), np.sin):
        errs = []
        for h in (0.2, 0.1, 0.05):
            xs = [1.0, 1.0 - h, 1.0 - 2 * h]
            errs.append(abs(predict(Forecaster("bdf2_heun", 2), fn, xs, 1.0 + 2 * h) - fn(1.0 + 2 * h)))
            linear = abs(predict(Forecaster("taylor", 1), fn, xs, 1.0 + 2 * h) - fn(1.0 + 2 * h))
            assert errs[-1] < linear  # a step of 2h (a reuse two evaluations on) beats linear extrapolation
        assert 3.0 < errs[0] / errs[1] < 5.0 and 3.0 < errs[1] / errs[2] < 5.0  # O(h²): a quarter per halving


def test_bdf2_heun_steps_on_falling_timesteps_as_on_rising_indices():
    assert Forecaster("bdf2_heun", 2).weights([300.0, 320.0, 340.0], 280.0) == pytest.approx((2.5, -2.0, 0.5))


@pytest.mark.parametrize("f,depth", [(Forecaster("taylor", 0), 1), (Forecaster("taylor", 2), 3), (Forecaster("hermite", 1), 3),
                                     (Forecaster("hermite", 2, 6), 6), (Forecaster("bdf2_heun", 2), 3)])
def test_each_kind_declares_its_depth_and_the_cache_keeps_it(f, depth):
    assert f.depth == depth
    cache = LayerCache(1, (StorePolicy(int8=True, mode="token"),), False, f)
    for e in range(8):
        cache.at(float(e))
        cache.put(0, torch.full((1, 2, 4), float(e)))
    assert len(cache.history[0]) == depth and cache.where[0] == [7.0 - i for i in range(depth)]
    cache.at(8.0)
    assert cache.read(0).shape == (1, 2, 4)


@pytest.mark.parametrize("values,match", [
    (dict(forecast_kind="chebyshev"), "unknown forecast_kind 'chebyshev'.*taylor, hermite, bdf2_heun"),
    (dict(forecast_kind="hermite", forecast_order=0), "degree forecast_order"),
    (dict(forecast_kind="bdf2_heun", forecast_order=1), "forecast_order = 2 with bdf2_heun"),
    (dict(forecast_kind="hermite", forecast_order=2, forecast_points=2), "forecast_points = 2 cannot fit"),
    (dict(forecast_kind="hermite", forecast_order=2, forecast_points=9), "forecast_points = 9 cannot fit"),
    (dict(forecast_kind="taylor", forecast_order=2, forecast_points=4), "applies to forecast_kind 'hermite' only"),
    (dict(forecast_points=-1), "forecast_points = -1"),
])
def test_bad_forecast_kinds_are_one_line(values, match):
    with pytest.raises(DqarError, match=match) as exc:
        ReuseConfig(**values)
    assert "\n" not in str(exc.value)
    assert FORECAST_KINDS == ("taylor", "hermite", "bdf2_heun")


# ----- on executors --------------------------------------------------------------------------------
CFG = ReuseConfig(schedule="constant", granularity="block", refresh_interval=3, max_staleness=2, warmup_frac=0.25, forecast_order=2,
                  cache_dtype="int8", quant_mode="token")
VARIANTS = [dict(forecast_kind="taylor"), dict(forecast_kind="hermite", forecast_points=4), dict(forecast_kind="bdf2_heun")]


@pytest.fixture(scope="module")
def dit():
    torch.set_num_threads(1)
    return make_tiny_transformer(num_layers=3)


@pytest.fixture
def eager(monkeypatch):
    """The graph executor's code uncompiled (as tests/test_graph_auto.py runs it)."""
    copy = lambda fn, name, mode=None: variants.own_code(fn, name)  # noqa: E731
    monkeypatch.setattr(graph, "compiled_copy", copy)
    monkeypatch.setattr(variants, "compiled_copy", copy)


def test_the_default_kind_is_taylor_and_each_kind_acts(dit):
    assert ReuseConfig().forecast_kind == "taylor"
    outs, stats = [], []
    for extra in VARIANTS:
        with dqar.enable(dit, replace(CFG, **extra), executor="patch") as h:
            outs.append(drive(dit, h)[-1])
            stats.append(h.stats)
    assert all(s.reuse_mask == stats[0].reuse_mask and s.forecasts == s.reused > 0 for s in stats)
    assert [s.cache_entries_peak for s in stats] == [9, 12, 9]  # 3 layers x depth
    for i in range(3):
        for j in range(i):
            assert not torch.equal(outs[i], outs[j])


@pytest.mark.parametrize("extra", VARIANTS[1:], ids=["hermite", "bdf2_heun"])
@pytest.mark.parametrize("executor", ["fused", "graph"])
def test_executors_agree_on_each_kind_with_an_int8_history(dit, eager, extra, executor):
    cfg = replace(CFG, **extra)
    with dqar.enable(dit, cfg, executor="patch") as h:
        ref, ref_stats = drive(dit, h), h.stats
    with dqar.enable(dit, cfg, executor=executor) as h:
        out, stats = drive(dit, h), h.stats
    assert stats.reuse_mask == ref_stats.reuse_mask and stats.forecasts == ref_stats.forecasts > 0
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)


def test_the_graph_weight_table_follows_the_kind():
    f = Forecaster("hermite", 1, 4)
    rows = [(False,), (False,), (False,), (False,), (True,), (True,)]
    table = H.weight_table(1, f, 4, rows, [(True,)] * 6, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert table[4][0] == pytest.approx(list(f.weights([3.0, 2.0, 1.0, 0.0], 4.0)))
    assert table[5][0] == pytest.approx(list(f.weights([3.0, 2.0, 1.0, 0.0], 5.0)))


def test_each_kind_changes_the_embedded_model_under_full_dqar():
    from dqar.generate import generate
    from dqar.models import load_model

    loaded, sample = load_model("embedded"), SampleConfig(steps=16, cfg=4.0)  # hermite fits 4 points from e = 10 on
    images = {}
    for extra in VARIANTS:
        run = RunConfig(reuse=replace(preset("full_dqar"), **extra), sample=sample)
        g = generate(loaded, [3], run, executor="patch")
        assert g.stats.forecasts > 0
        images[extra["forecast_kind"]] = g.output.images
    kinds = list(images)
    for i in range(len(kinds)):
        for j in range(i):
            assert not torch.equal(images[kinds[i]], images[kinds[j]]), (kinds[i], kinds[j])
