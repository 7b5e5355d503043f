"""The learned reuse policy: traces, training, checkpoints, and the decider while sampling (tiny models)."""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import dqar
from dqar.engine.config import ReuseConfig
from dqar.errors import DqarError
from dqar.engine.plan import build_plan, max_run_staleness
from dqar.engine.features import FEATURES
from dqar.engine.policy_net import PolicyCheckpoint
from dqar.engine.policy_net import load_policy
from dqar.engine.policy_net import save_policy
from dqar.tuning.collect import CollectSettings, collect_traces, load_traces, save_traces
from dqar.tuning.train import TrainSettings, train_policy

from conftest import E, CountSyncs, constant_checkpoint, drive, make_tiny_transformer, tiny_loaded

SCHEDULE = dict(schedule="constant", warmup_frac=0.1, refresh_interval=4, max_staleness=3)


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=4)


def constant_policy(log_error: float, num_layers: int = 4) -> PolicyCheckpoint:
    """A policy predicting the same relative error, exp(log_error), everywhere."""
    return constant_checkpoint(log_error, FEATURES, {"num_layers": num_layers, "entropy_rows": 4})


@pytest.fixture(scope="module")
def traces():
    return collect_traces(tiny_loaded(), CollectSettings(generations=4, batch=1, steps=6, max_age=3, entropy_rows=4), progress=False)


@pytest.fixture(scope="module")
def trained(traces):
    return train_policy(traces, TrainSettings(hidden=(16, 16), epochs=15, batch_size=64), progress=False)


def saved(ckpt, tmp_path, name="policy.safetensors") -> str:
    path = tmp_path / name
    save_policy(ckpt, path)
    return str(path)


def run(model, cfg, guard=None):
    with dqar.enable(model, cfg) as h:
        outs = drive(model, h, guard=guard)
        return outs, h.stats


# ----- the decider ---------------------------------------------------------------------------------
@pytest.mark.parametrize("forecast_order", [0, 2])
def test_always_reuse_policy_is_the_static_plan_bit_for_bit(model, tmp_path, forecast_order):
    for cache in ("model", "int8"):
        cfg = ReuseConfig(**SCHEDULE, cache_dtype=cache, forecast_order=forecast_order)
        plan_outs, plan_stats = run(model, cfg)
        outs, stats = run(model, replace(cfg, policy=saved(constant_policy(-9.0), tmp_path), policy_threshold=0.5))
        assert np.array_equal(np.array(stats.reuse_mask, bool), build_plan(cfg, E, 4).mask) and stats.reused > 0
        assert stats.reuse_mask == plan_stats.reuse_mask
        assert all(torch.equal(a, b) for a, b in zip(outs, plan_outs)), cache
        assert stats.forecasts == plan_stats.forecasts == (stats.reused if forecast_order else 0)


def test_always_compute_policy_is_the_baseline_bit_for_bit(model, tmp_path):
    ref = drive(model)
    outs, stats = run(model, ReuseConfig(**SCHEDULE, policy=saved(constant_policy(3.0), tmp_path), policy_threshold=1.0))
    assert stats.reused == 0
    assert all(torch.equal(a, b) for a, b in zip(outs, ref))


def test_policy_makes_at_most_one_host_sync_per_evaluation(trained, tmp_path):
    model = make_tiny_transformer(num_layers=3)  # the layer count the policy was trained for
    counter = CountSyncs()
    cfg = ReuseConfig(**SCHEDULE, policy=saved(trained.checkpoint, tmp_path), policy_threshold=1.0)
    with dqar.enable(model, cfg) as h:
        drive(model, h, guard=counter)
        stats = h.stats
        predictions = len(h.engine.decider.predictions)
    assert 0 < counter.count <= E - 1  # evaluation 0 always computes: nothing to read
    assert stats.host_syncs == counter.count == predictions  # one read per deciding evaluation, features included
    assert max_run_staleness(np.array(stats.reuse_mask, bool)) <= 3


def test_threshold_and_budget_move_decisions(model, tmp_path):
    from dqar.engine.policy import PolicyDecider

    path = saved(_ramp_policy(), tmp_path)
    counts = []
    for tau in (0.0, 0.05, 0.2, 0.6, 1.0):
        _, stats = run(model, ReuseConfig(**SCHEDULE, policy=path, policy_threshold=tau))
        counts.append(stats.reused)
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] > counts[1], counts
    per_eval = []
    for budget in (1.0, 0.5, 0.25, 0.0):
        _, stats = run(model, ReuseConfig(**SCHEDULE, policy=path, policy_threshold=1.0, policy_budget=budget))
        per_eval.append(max(stats.per_evaluation_reused))
        assert max(stats.per_evaluation_reused) <= int(budget * 4)
    assert per_eval == sorted(per_eval, reverse=True) and per_eval[0] > per_eval[1]
    assert isinstance(dqar.engine.api.make_decider(ReuseConfig(policy=path)), PolicyDecider)


def _ramp_policy() -> PolicyCheckpoint:
    """Predicted error grows with the layer index: exp(-4 + 3.5 * layer_fraction), 2% .. 61%."""
    ckpt = constant_policy(-4.0)
    with torch.no_grad():
        net = ckpt.net.layers
        net[0].weight[0, FEATURES.index("layer_fraction")] = 1.0
        net[0].bias[0] = 10.0  # keep the SiLU in its linear range
        net[-1].weight[0, 0] = 3.5
        net[-1].bias.fill_(-4.0 - 35.0)
    return ckpt


def test_policy_refuses_another_model(tmp_path):
    path = saved(constant_policy(-9.0, num_layers=6), tmp_path)
    with pytest.raises(DqarError, match="6-layer"):
        run(make_tiny_transformer(num_layers=2), ReuseConfig(**SCHEDULE, policy=path))


def test_policy_refuses_a_run_at_another_forecast_order(tmp_path):
    ckpt = constant_policy(-9.0, num_layers=2)
    ckpt.meta["forecast_order"] = 2
    path = saved(ckpt, tmp_path)
    with pytest.raises(DqarError, match="order-2 forecast labels") as exc:
        run(make_tiny_transformer(num_layers=2), ReuseConfig(**SCHEDULE, policy=path))
    assert "\n" not in str(exc.value) and "forecast_order = 2" in exc.value.fix
    run(make_tiny_transformer(num_layers=2), ReuseConfig(**SCHEDULE, policy=path, forecast_order=2))


def test_shipped_order2_policy_is_for_order_2():
    from dqar.embedded import EMBEDDED_DIR
    from dqar.engine.policy_net import load_policy

    ckpt = load_policy(str(Path(EMBEDDED_DIR) / "policy_order2.safetensors"))
    assert ckpt.meta["forecast_order"] == 2 and ckpt.meta["num_layers"] == 8


# ----- traces, training, checkpoints ---------------------------------------------------------------
def test_traces_hold_measured_labels_and_round_trip(traces, tmp_path):
    assert traces.features.shape == (len(traces), len(FEATURES)) and np.isfinite(traces.features).all()
    assert np.isfinite(traces.labels).all() and (traces.labels > 0).all()
    assert set(np.unique(traces.group)) == {0, 1, 2, 3} and set(np.unique(traces.age)) == {1, 2, 3}
    ages = traces.features[:, FEATURES.index("age")]
    assert np.array_equal(ages, traces.age)
    # at the same evaluations, a staler reuse is (on average) a worse one
    late = traces.evaluation >= 3
    assert traces.labels[late & (traces.age == 3)].mean() > traces.labels[late & (traces.age == 1)].mean()
    save_traces(traces, tmp_path / "t.npz")
    back = load_traces(tmp_path / "t.npz")
    assert np.array_equal(back.features, traces.features) and back.meta == traces.meta


def test_training_reduces_loss_and_splits_by_generation(trained):
    curve, split = trained.report["curve"], trained.report["split"]
    assert curve[-1]["train_loss"] < 0.7 * curve[0]["train_loss"]
    assert curve[-1]["heldout_loss"] < curve[0]["heldout_loss"]
    assert not set(split["train_generations"]) & set(split["heldout_generations"]) and split["heldout_generations"]
    assert 0 < trained.report["parameters"] < 500_000


def test_checkpoint_round_trip(trained, tmp_path):
    path = saved(trained.checkpoint, tmp_path)
    back = load_policy(path)
    x = torch.randn(50, len(FEATURES))
    assert torch.equal(back.predict(x), trained.checkpoint.predict(x))
    assert back.meta == trained.checkpoint.meta and back.meta["num_layers"] == 3


def test_bad_checkpoints_are_one_line_errors(trained, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "noise.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    (tmp_path / "plan.json").write_text('{"format": "dqar-plan/1", "rows": []}')
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    good = (tmp_path / "good.safetensors")
    save_policy(trained.checkpoint, good)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    for name, match in [("missing.safetensors", "does not exist"), ("noise.safetensors", "not a safetensors"),
                        ("plan.json", "not a safetensors"), ("foreign.safetensors", "format"), ("cut.safetensors", "not a")]:
        with pytest.raises(DqarError, match=match) as err:
            load_policy(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(DqarError, match="does not exist"):
        dqar.enable(make_tiny_transformer(num_layers=2), ReuseConfig(policy=str(tmp_path / "missing.safetensors")))


@pytest.mark.parametrize("bad, match", [
    ({"policy_threshold": 1.5}, "policy_threshold"),
    ({"policy_budget": -0.1}, "policy_budget"),
    ({"policy": "p.safetensors", "gate": True}, "exclusive"),
    ({"policy": "p.safetensors", "plan_file": "p.json"}, "exclusive"),
    ({"policy": "p.safetensors", "target": "kv"}, "attention"),
])
def test_policy_config_is_validated(bad, match):
    with pytest.raises(DqarError, match=match):
        ReuseConfig(**bad)


def test_cli_train_writes_checkpoint_and_report(traces, tmp_path, capsys):
    import json

    from dqar.cli import main

    save_traces(traces, tmp_path / "t.npz")
    out = tmp_path / "p.safetensors"
    assert main(["policy", "train", "--traces", str(tmp_path / "t.npz"), "--out", str(out), "--epochs", "3", "--hidden", "8",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    assert f"{report['parameters']} parameters" in printed and len(report["curve"]) == 4
    assert load_policy(out).meta["hidden"] == [8]
    assert main(["policy", "train", "--traces", str(tmp_path / "none.npz"), "--out", str(out)]) == 2


def test_distilled_plan_repeats_the_policy_without_syncs(tmp_path):
    from dqar.engine.config import RunConfig, SampleConfig
    from dqar.generate import generate
    from dqar.engine.plan import load_plan, save_plan
    from dqar.tuning.distill import distill_plan

    loaded = tiny_loaded()
    reuse = ReuseConfig(**SCHEDULE, policy=saved(_ramp_policy_for(3), tmp_path), policy_threshold=0.2)
    run = RunConfig(reuse=reuse, sample=SampleConfig(steps=8, cfg=4.0, seed=3))
    online = generate(loaded, [1, 2], run).stats
    plan = distill_plan(loaded, [1, 2], run)
    assert plan.mask.tolist() == np.array(online.reuse_mask, bool).tolist() and 0 < plan.reuse_fraction < 1
    assert plan.key["model"] == "tiny" and plan.key["steps"] == 8
    save_plan(plan, tmp_path / "plan.json")
    frozen = generate(loaded, [5, 6], replace(run, reuse=replace(reuse, policy="", plan_file=str(tmp_path / "plan.json"))))
    assert frozen.stats.reuse_mask == online.reuse_mask and frozen.stats.host_syncs == 0 < online.host_syncs
    assert np.array_equal(load_plan(tmp_path / "plan.json").mask, plan.mask)


def _ramp_policy_for(num_layers: int) -> PolicyCheckpoint:
    ckpt = _ramp_policy()
    ckpt.meta["num_layers"] = num_layers
    return ckpt


def test_knob_search_and_verdict():
    from dqar.studies.fidelity.policy_eval import Knob, search, verdict

    knob = Knob("policy", 1e-4, 1.0, "log", lambda v: ReuseConfig(policy_threshold=v), str)
    reuse_of = lambda cfg: min(1.0, 0.1 * (4 + np.log10(cfg.policy_threshold)) ** 1.5)  # noqa: E731  monotone in the knob
    value, got = search(knob, 0.45, reuse_of, iterations=12)
    assert abs(got - 0.45) < 0.01 and abs(reuse_of(ReuseConfig(policy_threshold=value)) - got) < 1e-12
    row = lambda fam, reuse, db: {"family": fam, "reuse": reuse, "attention_skipped": reuse, "psnr_db": db}  # noqa: E731
    rows = [row("policy", 0.3, 40.0), row("policy", 0.6, 34.0), row("calibrated", 0.3, 38.0), row("calibrated", 0.6, 35.0),
            row("static", 0.45, 30.0), row("policy_plan", 0.45, 99.0)]
    v = verdict(rows, (0.3, 0.45, 0.6))
    at = {t["target"]: t for t in v["per_target"]}
    assert at[0.3]["best_other"] == "calibrated" and at[0.3]["policy_minus_best_db"] == pytest.approx(2.0) and at[0.3]["met"]
    assert at[0.45]["psnr_at"]["policy"] == pytest.approx(37.0) and at[0.45]["met"]  # interpolated; the plan row is not an "other"
    assert not at[0.6]["met"] and not v["met"]


def test_cli_distill_without_a_policy_is_a_usage_error(tmp_path, capsys):
    from dqar.cli import main

    assert main(["policy", "distill", "--steps", "2", "--samples", "1", "--out", str(tmp_path / "p.json"), "--quiet"]) == 2
    assert "needs a policy" in capsys.readouterr().err


def test_shipped_policy_loads_and_is_small():
    from dqar.studies.fidelity.policy_eval import shipped_policy
    from dqar.engine.policy_net import num_parameters

    path = shipped_policy()
    ckpt = load_policy(path)
    assert path.stat().st_size < 64_000 and num_parameters(ckpt.net) < 500_000
    assert ckpt.meta["model"] == "embedded" and ckpt.meta["num_layers"] == 8 and ckpt.meta["max_age"] == 3


def test_policy_study_at_a_forecast_order_runs_every_method_at_that_order(tmp_path, single_thread):
    from dqar.studies.fidelity.policy_eval import EvaluateSettings, run_policy_study
    from dqar.studies.fidelity.policy_report import write_policy_section

    def study(order):
        s = EvaluateSettings(samples=2, steps=6, targets=(0.3,), probe_samples=1, probe_iterations=1, calib_samples=1,
                             forecast_order=order, out_dir=str(tmp_path))
        with torch.no_grad():
            return run_policy_study(s, progress=False)

    quad = study(2)
    assert {r["config"]["forecast_order"] for r in quad["rows"]} == {2}  # policy, gate, calibrated and distilled plans, static
    assert {r["family"] for r in quad["rows"]} == {"policy", "policy_plan", "gate_snr", "gate_entropy", "calibrated", "static"}
    doc = write_policy_section(quad, tmp_path)
    assert "## Learned policy at forecast order 2" in doc.read_text() and (tmp_path / "fidelity_policy_order2.json").is_file()
    with pytest.raises(DqarError, match="forecast_order = 3"):
        EvaluateSettings(forecast_order=3)
