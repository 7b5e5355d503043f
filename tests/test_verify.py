"""Issue 24 item 1: the verifying decider (`decider = "verify"`), the `adaptive` preset and τ calibration.

A probe block's forecast error drives the refreshes: τ = 0 never reuses, a huge τ reuses up to the interval bound,
a different τ schedule changes the executed mask; the one scalar read per evaluation is counted; generations reset;
bad values are one-line errors (Flux: tests/test_verify_flow.py; the compiled and graph executors: tests/test_verify_compiled.py).
"""
from dataclasses import replace

import numpy as np
import pytest
import torch

import dqar
from dqar.engine import graph
from dqar.engine.api import compiled_takes, make_decider
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, from_dict, preset
from dqar.engine.verify import VerifyDecider, relative_l1, tau_schedule
from dqar.errors import DqarError

from conftest import E, TAU_HUGE as HUGE, TAU_ZERO as ZERO, CountSyncs, drive, make_tiny_transformer, tiny_loaded

L = 4
BASE = ReuseConfig(decider="verify", granularity="block", forecast_order=2, warmup_frac=0.2, cooldown_frac=0.0, cache_dtype="int8",
                   quant_mode="token", verify_max_interval=3)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return make_tiny_transformer(num_layers=L)


def run(model, cfg, guard=None):
    decider = make_decider(cfg)
    with dqar.enable(model, cfg, decider=decider, executor="patch") as h:
        outs = drive(model, h, guard=guard)
        return outs, h.stats, decider


def mask(stats) -> np.ndarray:
    return np.array(stats.reuse_mask, dtype=bool)  # (E, L)


def test_a_zero_threshold_never_reuses_and_reads_every_active_evaluation(model):
    _, stats, decider = run(model, replace(BASE, verify_tau=ZERO))
    start = int(np.ceil(0.2 * E))
    assert stats.reused == 0
    assert stats.host_syncs == E - start and np.isfinite(decider.errors[start:]).all() and (decider.errors[start:] > 0).all()


@pytest.mark.parametrize("max_interval", [1, 3])
def test_a_huge_threshold_reuses_up_to_max_interval(model, max_interval):
    _, stats, _ = run(model, replace(BASE, verify_tau=HUGE, verify_max_interval=max_interval))
    start, m = int(np.ceil(0.2 * E)), mask(stats)
    want = np.zeros((E, L), dtype=bool)
    for e in range(start, E):
        want[e, 1:] = (e - start) % (max_interval + 1) != max_interval  # max_interval reuses, then a refresh
    assert (m == want).all(), m.astype(int)
    refreshes = int((~want[start:, 1]).sum())
    assert stats.host_syncs == E - start - refreshes  # a refresh the bound forces reads nothing


def test_min_interval_forces_reuses_without_reading(model):
    _, stats, _ = run(model, replace(BASE, verify_tau=ZERO, verify_min_interval=2, verify_max_interval=2))
    start, m = int(np.ceil(0.2 * E)), mask(stats)
    assert m[start:, 1:].all(axis=1).sum() == 2 * (E - start) // 3 + ((E - start) % 3 > 0) * min((E - start) % 3, 2)
    assert stats.host_syncs == 0


def test_the_tau_schedule_changes_the_executed_mask(model):
    mid = median_error(model)
    masks = {}
    for name, knots in {"low": ((0.0, mid / 4), (1.0, mid / 4)), "mid": ((0.0, mid), (1.0, mid)), "high": ((0.0, 4 * mid), (1.0, 4 * mid)),
                        "rising": ((0.0, 0.0), (1.0, 4 * mid))}.items():
        masks[name] = mask(run(model, replace(BASE, verify_tau=knots))[1])
    assert masks["low"].sum() < masks["mid"].sum() <= masks["high"].sum()
    assert len({m.tobytes() for m in masks.values()}) >= 3
    assert not masks["rising"][:6].any() or masks["rising"][:6].sum() < masks["high"][:6].sum()
    assert not (mask(run(model, replace(BASE, verify_tau=((0.0, mid),), verify_scale=0.25))[1]) != masks["low"]).any()


def test_host_syncs_are_counted_honestly(model):
    counter, mid = CountSyncs(), median_error(model)
    _, stats, _ = run(model, replace(BASE, verify_tau=((0.0, mid), (1.0, 2 * mid))), guard=counter)
    assert stats.host_syncs == counter.count > 0


def median_error(model) -> float:
    return float(np.nanmedian(run(model, replace(BASE, verify_tau=ZERO))[2].errors))


def test_two_generations_give_identical_results(model):
    mid = median_error(model)
    cfg = replace(BASE, verify_tau=((0.0, mid), (1.0, 2 * mid)))
    decider = make_decider(cfg)
    with dqar.enable(model, cfg, decider=decider, executor="patch") as h:
        first, s1, e1 = drive(model, h), h.stats, decider.errors.copy()
        second, s2, e2 = drive(model, h), h.stats, decider.errors.copy()
    assert s1.to_dict() == s2.to_dict() and 0 < s1.reused
    np.testing.assert_array_equal(e1, e2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_probe_last_decides_the_next_evaluation(model):
    _, stats, decider = run(model, replace(BASE, verify_probe="last", verify_tau=ZERO))
    start, m = int(np.ceil(0.2 * E)), mask(stats)
    assert not m[:, L - 1].any() and not m[:start].any()  # the probe always computes
    assert (m[start:, : L - 1].all(axis=1) == [(e - start) % 2 == 0 for e in range(start, E)]).all()  # unchecked after a refresh
    assert stats.host_syncs == (E - start) // 2  # read only after a checked reuse


def test_a_middle_probe_splits_its_decisions(model):
    _, stats, _ = run(model, replace(BASE, verify_probe=2, verify_tau=HUGE))
    m = mask(stats)
    assert not m[:, 2].any() and m[:, :2].any() and m[:, 3].any()


def test_the_relative_l1_error():
    fresh, forecast = torch.tensor([1.0, -2.0, 3.0, -4.0]), torch.tensor([1.0, -1.0, 3.0, -5.0])
    assert float(relative_l1(fresh, forecast)) == pytest.approx(2 / 10)
    assert tau_schedule(((0.0, 0.1), (0.5, 0.3)), 2.0, 5).tolist() == pytest.approx([0.2, 0.4, 0.6, 0.6, 0.6])


# ----- bad values, executors, families ----------------------------------------------------------
@pytest.mark.parametrize("values,match", [
    (dict(decider="verfy"), "did you mean 'verify'"),
    (dict(verify_probe="middle"), "verify_probe = 'middle'"), (dict(verify_probe=-1), "verify_probe = -1"),
    (dict(verify_probe=True), "verify_probe = True"),
    (dict(verify_tau=((0.5, 0.1), (0.2, 0.1))), "progress points"), (dict(verify_tau=((0.0, -0.1),)), "thresholds"),
    (dict(verify_tau=()), "progress points"), (dict(verify_tau=(0.1, 0.2)), "pairs"), (dict(verify_tau=((1.5, 0.1),)), "progress"),
    (dict(verify_scale=-1.0), "verify_scale"), (dict(verify_max_interval=0), "verify_max_interval"),
    (dict(verify_min_interval=3, verify_max_interval=2), "above verify_max_interval"),
    (dict(decider="verify", gate=True), "gate, policy"), (dict(decider="verify", plan_file="p.json"), "plan_file"),
    (dict(decider="verify", target="kv", granularity="attention"), "not K/V"),
])
def test_bad_verify_config_is_one_line(values, match):
    with pytest.raises(DqarError, match=match) as exc:
        ReuseConfig(**values)
    assert "\n" not in str(exc.value)


def test_a_probe_outside_the_model_is_refused_in_one_line(model):
    with dqar.enable(model, replace(BASE, verify_probe=9), executor="patch") as h:
        with pytest.raises(DqarError, match=r"verify_probe = 9 does not exist in a 4-layer model") as exc:
            drive(model, h)
    assert "\n" not in str(exc.value)


def test_auto_runs_it_on_patch_on_the_cpu_and_would_pick_compiled_on_cuda(model, monkeypatch):
    import dqar.engine.api as api

    with dqar.enable(model, BASE) as h:
        assert h.executor == "patch" and isinstance(h.engine.decider, VerifyDecider)
    graph.check_graph_supported(BASE, make_decider(BASE), model)  # graph runs it (tests/test_verify_compiled.py)
    assert compiled_takes(BASE, make_decider(BASE), model)
    monkeypatch.setattr(api, "on_cuda", lambda t: True)
    assert api.resolve_executor(model, BASE, make_decider(BASE))[0] == "compiled"  # graph's split is not measured on CUDA


def test_flux_runs_it_on_patch_and_refuses_other_executors_in_one_line():
    from families import flux

    pipe, _ = flux()
    with dqar.enable(pipe.transformer, "adaptive") as h:  # tests/test_verify_flow.py runs it
        assert h.executor == "patch" and isinstance(h.engine.decider, VerifyDecider)
    with pytest.raises(DqarError, match="'patch'") as exc:
        dqar.enable(pipe.transformer, "adaptive", executor="compiled")
    assert "\n" not in str(exc.value)


# ----- the preset and calibration ------------------------------------------------------------------
def test_the_adaptive_preset_loads_from_toml_shapes_and_runs_on_the_embedded_model():
    from dqar.generate import generate
    from dqar.models import load_model

    cfg = preset("adaptive")
    assert cfg.decider == "verify" and not cfg.plan_file
    assert from_dict({"preset": "adaptive", "reuse": {"verify_tau": [[0.0, 0.02], [1.0, 0.05]]}}).reuse.verify_tau == ((0.0, 0.02), (1.0, 0.05))
    g = generate(load_model("embedded"), [1, 2], RunConfig(reuse=cfg, sample=SampleConfig(steps=12)))
    assert g.executor == "patch" and g.stats.reused > 0 and 0 < g.stats.host_syncs <= 12 and g.stats.forecasts > 0


def test_tau_calibration_hits_a_target_work():
    from dqar.tuning.verify_tau import calibrate_tau

    run = RunConfig(reuse=replace(BASE, verify_max_interval=4), sample=SampleConfig(steps=10, cfg=4.0))
    result = calibrate_tau(tiny_loaded(), [[1, 2]], run, target=0.3, steps=6)
    assert result.config.verify_scale == result.scale and abs(result.skipped - 0.3) < 0.04, result.trials  # 30 cells: coarse steps
    assert result.trials[0][1] >= result.skipped  # the largest scale skips most
    with pytest.raises(DqarError, match="verifying decider"):
        calibrate_tau(tiny_loaded(), [[1]], replace(run, reuse=preset("full_dqar")), target=0.3)
