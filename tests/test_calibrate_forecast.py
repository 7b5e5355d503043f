"""Calibration and policy labels at a forecast order: they measure the reuse the engine will perform (tiny models)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dqar.cli import main
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.engine.plan import apply_refresh, load_plan
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.models import load_model
from dqar.tuning.calibrate import derive_plan, record_trace
from dqar.tuning.collect import CollectSettings, collect_traces

from conftest import tiny_loaded

STEPS = 8
# Lagrange weights of the value one evaluation after consecutive outputs (newest first), written out by hand
AGE1 = {0: [(1.0,)] * 3, 1: [(1.0,), (2.0, -1.0), (2.0, -1.0)], 2: [(1.0,), (2.0, -1.0), (3.0, -3.0, 1.0)]}


def attention_outputs(loaded, labels, run) -> list[list[torch.Tensor]]:
    """attn1 outputs per layer and evaluation of a plain (no reuse) generation: [layer][evaluation] (B, T, C)."""
    outs = [[] for _ in loaded.transformer.transformer_blocks]
    hooks = [b.attn1.register_forward_hook(lambda m, a, o, l=l: outs[l].append(o.detach().float()))
             for l, b in enumerate(loaded.transformer.transformer_blocks)]
    try:
        generate(loaded, labels, run)
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("order", [0, 1, 2])
def test_trace_records_the_error_of_the_engines_forecast(order):
    loaded, labels = tiny_loaded(), [3, 7]
    sample = SampleConfig(steps=STEPS, cfg=1.0)
    trace = record_trace(loaded, labels, RunConfig(reuse=ReuseConfig(forecast_order=order), sample=sample))
    outs = attention_outputs(loaded, labels, RunConfig(reuse=ReuseConfig(enabled=False), sample=sample))
    assert np.isnan(trace.change[0]).all()
    for l, per_eval in enumerate(outs):
        for e in range(1, STEPS):
            w = AGE1[order][min(e, 3) - 1]
            forecast = sum(wi * per_eval[e - 1 - i] for i, wi in enumerate(w))
            expected = float((per_eval[e] - forecast).norm() / forecast.norm())
            assert trace.change[e, l] == pytest.approx(expected, rel=2e-3, abs=1e-6), (order, e, l)


def test_forecast_errors_differ_from_plain_changes():
    loaded, sample = tiny_loaded(), SampleConfig(steps=STEPS, cfg=1.0)
    copy = record_trace(loaded, [3], RunConfig(reuse=ReuseConfig(), sample=sample)).change
    quad = record_trace(loaded, [3], RunConfig(reuse=ReuseConfig(forecast_order=2), sample=sample)).change
    np.testing.assert_allclose(quad[1], copy[1], rtol=1e-6)  # one computed output: the forecast is a copy
    assert not np.allclose(quad[2:], copy[2:], rtol=1e-2)


def test_calibrate_cli_writes_an_order_2_plan_that_runs(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["calibrate", "--preset", "full_dqar", "--forecast-order", "2", "--target", "0.4", "--samples", "1",
               "--steps", "10", "--out", str(out), "--quiet", "--threads", "1"])
    assert rc == 0
    assert "forecast_order = 2" in capsys.readouterr().out
    plan = load_plan(out)
    assert plan.key["forecast_order"] == 2 and plan.key["granularity"] == "block"
    assert json.loads(out.read_text())["key"]["forecast_order"] == 2
    cfg = replace(preset("full_dqar"), plan_file=str(out))
    stats = generate(load_model("embedded"), [1], RunConfig(reuse=cfg, sample=SampleConfig(steps=10))).stats
    assert stats.reuse_fraction == pytest.approx(plan.reuse_fraction)
    assert stats.forecasts > 0


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


@pytest.mark.parametrize("argv", [["calibrate", "--target", "0.5", "--forecast-order", "3"],
                                  ["calibrate", "--target", "0.5", "--structure", "rows"],
                                  ["calibrate", "--budget", "0.1", "--structure", "layers"],
                                  ["calibrate", "--target", "0.5", "--first-evaluation", "0"],
                                  ["policy", "collect", "--forecast-order", "3"]])
def test_bad_forecast_calibration_input_is_one_line_exit_2_before_work(argv, tmp_path, capsys, monkeypatch):
    import dqar.models

    monkeypatch.setattr(dqar.models, "load_model", _no_work)
    rc = main([*argv, "--out", str(tmp_path / "out.json")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "Traceback" not in err[0], err


def test_collect_labels_the_forecast_at_the_configured_order():
    settings = dict(generations=1, batch=1, steps=6, max_age=2, entropy_rows=4)
    copy = collect_traces(tiny_loaded(), CollectSettings(**settings), progress=False)
    quad = collect_traces(tiny_loaded(), CollectSettings(**settings, forecast_order=2), progress=False)
    assert quad.meta["forecast_order"] == 2 and copy.meta["forecast_order"] == 0 and quad.meta["label"] != copy.meta["label"]
    np.testing.assert_array_equal(quad.features, copy.features)  # same features, other labels
    single = quad.evaluation - quad.age == 0  # reuse of the first output: nothing to extrapolate from
    np.testing.assert_allclose(quad.labels[single], copy.labels[single], rtol=1e-6)
    assert not np.allclose(quad.labels[~single], copy.labels[~single], rtol=1e-2)
    with pytest.raises(DqarError, match="forecast_order"):
        CollectSettings(forecast_order=3)


def test_layer_plans_are_static_plans_with_per_layer_intervals():
    e_count, l_count = 30, 4
    even = np.full((e_count, l_count), 0.01)
    eligible = np.zeros((e_count, 1), dtype=bool)
    eligible[2: e_count - 1] = True
    static = apply_refresh(eligible, 3, 2)[:, 0]
    target = static.sum() / e_count
    plan = derive_plan(even, target_fraction=target, max_staleness=2, first_evaluation=2, structure="layers", order=2)
    assert plan.key["intervals"] == [3] * l_count
    np.testing.assert_array_equal(plan.mask, np.stack([static] * l_count, axis=1))
    uneven = even.copy()
    uneven[:, 1] = 1.0  # layer 1's forecast is poor: it recomputes more often than the others
    plan = derive_plan(uneven, target_fraction=target * 0.75, max_staleness=3, first_evaluation=2, structure="layers", order=2)
    assert plan.key["intervals"][1] < min(k for i, k in enumerate(plan.key["intervals"]) if i != 1)
    assert plan.reuse_fraction >= target * 0.75


def test_a_pattern_bound_still_reaches_the_target():
    """Bounding the greedy plan alone loses most of its reuse; derive_plan searches a higher internal target instead."""
    from dqar.engine.plan import bound_patterns, max_run_staleness
    from dqar.tuning.calibrate import estimated_error

    rng = np.random.default_rng(0)
    change = rng.uniform(0.01, 0.1, size=(30, 6))  # (E, L)
    change[0] = np.nan
    free = derive_plan(change, target_fraction=0.3, max_staleness=2)
    assert free.num_patterns > 4 and bound_patterns(free.mask, 4).mean() < 0.2
    plan = derive_plan(change, target_fraction=0.3, max_staleness=2, max_patterns=4, key={"steps": 30})
    assert plan.num_patterns <= 4 and plan.reuse_fraction >= 0.3 and max_run_staleness(plan.mask) <= 2
    assert plan.key == {"steps": 30, "max_patterns": 4} and not plan.mask[0].any()
    assert np.array_equal(derive_plan(change, target_fraction=0.3, max_staleness=2, max_patterns=100).mask, free.mask)
    budget = derive_plan(change, error_budget=0.12, max_staleness=3, max_patterns=3)  # bounded only: errors never grow
    assert budget.num_patterns <= 3 and 0 < budget.mask.sum() and estimated_error(change, budget.mask).max() <= 0.12
    layers = derive_plan(change, target_fraction=0.3, max_staleness=3, first_evaluation=2, structure="layers", order=2, max_patterns=1)
    assert layers.num_patterns == 1 and not layers.mask.any()  # one row: all-compute
    with pytest.raises(DqarError, match="max_patterns"):
        derive_plan(change, target_fraction=0.3, max_patterns=0)


def test_calibrate_max_patterns_on_a_tiny_trace_and_the_cli(tmp_path, capsys):
    from dqar.tuning.calibrate import calibrate

    run = RunConfig(sample=SampleConfig(steps=STEPS, cfg=1.0))
    free = calibrate(tiny_loaded(), [3], run, target_fraction=0.5, max_staleness=2).plan
    cal = calibrate(tiny_loaded(), [3], run, target_fraction=0.5, max_staleness=2, max_patterns=2)
    assert free.num_patterns > 2 and cal.plan.num_patterns <= 2 and cal.plan.key["max_patterns"] == 2
    out = tmp_path / "plan.json"
    rc = main(["calibrate", "--target", "0.4", "--samples", "1", "--steps", "10", "--max-patterns", "3", "--out", str(out),
               "--quiet", "--threads", "1"])
    assert rc == 0 and load_plan(out).num_patterns <= 3
    assert f"{load_plan(out).num_patterns} distinct rows (at most 3)" in capsys.readouterr().out
