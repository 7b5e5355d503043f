"""The probe-error gate rows of the adaptive comparison (dqar/studies/fidelity/adaptive.py): τ = ∞ shares from plans,
caps, the extension of a saved result, and the gate's verdicts computed from the numbers."""
import copy
from dataclasses import replace

import numpy as np
import pytest

from dqar.engine.config import RunConfig, SampleConfig
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.models import load_model
from dqar.studies.fidelity import adaptive as A
from dqar.studies.fidelity.adaptive_section import gate_verdicts, section_body

TINY = dict(samples=2, probe_samples=2, calib_samples=1, calib_steps=1, targets=(0.5,), steps=6, kinds=("taylor",))


@pytest.fixture(scope="module")
def dit(single_thread):
    return load_model()


def test_the_open_share_from_the_plan_equals_the_measured_share(dit):
    run = RunConfig(sample=SampleConfig(steps=8, cfg=4.0))
    costs = A.layer_costs(dit, run)
    for cap in (2, 3):
        cfg = A.gate_config("taylor", "constant", cap)
        open_cfg = RunConfig(reuse=replace(cfg, verify_scale=1e6), sample=run.sample)
        stats = generate(dit, [0], open_cfg, executor="patch").stats
        assert stats.flops_skipped_fraction == pytest.approx(A.gate_open_share(cfg, 8, costs), abs=1e-9)
        assert stats.host_syncs > 0


def test_the_cap_grows_with_the_target_and_is_none_where_unreachable():
    costs = np.full(8, 0.99 / 8 / 50)
    caps = [A.gate_cap_for("taylor", "constant", t, 50, costs, 0.02) for t in (0.5, 0.7, 0.8)]
    assert caps == sorted(caps) and caps[0] < caps[-1]
    assert A.gate_cap_for("taylor", "linear", 0.7, 50, costs, 0.02) is None  # half the layers eligible on average
    top = A.gate_open_share(A.gate_config("taylor", "constant", A.MAX_INTERVALS[-1]), 50, costs)
    assert A.gate_cap_for("taylor", "constant", top + 0.01, 50, costs, 0.02) == A.MAX_INTERVALS[-1]  # within tolerance
    assert A.gate_cap_for("taylor", "constant", top + 0.03, 50, costs, 0.02) is None


def test_settings_refuse_bad_gate_kinds_and_schedules():
    with pytest.raises(DqarError, match="gate kinds"):
        A.AdaptiveSettings(gate_kinds=("spline",))
    with pytest.raises(DqarError, match="gate schedules"):
        A.AdaptiveSettings(gate_schedules=("custom",))


def test_extending_a_saved_result_adds_the_gate_rows(dit, tiny_adaptive):
    saved = tiny_adaptive  # run_adaptive at TINY without gate kinds
    assert all(comp["gate"] == {} for comp in saved["targets"])
    s = A.AdaptiveSettings(**TINY, gate_kinds=("taylor",), gate_schedules=("constant", "linear"))
    out = A.extend_with_gate(saved, s, progress=False)
    for comp in [out["at_full_dqar"], *out["targets"]]:
        row = comp["gate"]["taylor/constant"]
        assert row["decider"] == "gate" and row["host_syncs_per_evaluation"] > 0 and "delta_db" in row
        assert row["config"]["gate_signal"] == "probe_error" and "psnr_per_sample" not in row
        assert comp["gate_base_psnr_db"] == pytest.approx(comp["static"][comp["best_static_kind"]]["psnr_db"], abs=A.REMEASURE_DB)
    assert saved["targets"][0]["gate"] == {}  # the saved result itself is untouched
    assert "gate ε taylor, constant" in section_body(out, "cmd", "today", "here")
    with pytest.raises(DqarError, match="other settings"):
        A.extend_with_gate(saved, A.AdaptiveSettings(**{**TINY, "samples": 3}), progress=False)
    tampered = copy.deepcopy(saved)
    comp = tampered["targets"][0]
    comp["static"][comp["best_static_kind"]]["psnr_db"] += 1.0
    with pytest.raises(DqarError, match="re-measures"):
        A.extend_with_gate(tampered, s, progress=False)


def _gate_result(delta, ci, skipped=0.6):
    row = {"name": "gate ε taylor", "flops_skipped": skipped, "psnr_db": 36.0, "delta_db": delta, "delta_ci": ci,
           "class_accuracy": 0.9, "fd": 1.0, "host_syncs_per_evaluation": 1.0, "calibration": {"max_interval": 3}}
    comp = {"target": 0.6, "static": {}, "verify": {"taylor": {**row, "psnr_db": 35.9}}, "gate": {"taylor/constant": row},
            "gate_unreachable": {"taylor/linear": 0.39}}
    return {"settings": {"tolerance": 0.02}, "at_full_dqar": {"target": 0.64, "static": {}, "verify": {}}, "targets": [comp]}


@pytest.mark.parametrize("delta, ci, skipped, word, wins", [
    (1.2, [0.4, 2.0], 0.6, "beats", "at 60.0%"),
    (-3.0, [-3.5, -2.5], 0.6, "loses to", "at no target"),
    (0.1, [-0.5, 0.7], 0.6, "is not distinguishable from", "at no target"),
    (1.2, [0.4, 2.0], 0.65, "beats", "at no target"),  # not at matched work: no win
])
def test_gate_verdicts_are_computed_from_the_numbers(delta, ci, skipped, word, wins):
    text = " ".join(gate_verdicts(_gate_result(delta, ci, skipped)))
    assert f") {word} the best static plan: {delta:+.2f} dB" in text
    assert f"beats the best static plan at matched work {wins}; presets using it: none." in text
    assert "(taylor, linear) cannot reach 60.0%: even at τ = ∞ with the largest cap it skips 39.0%" in text
    assert "their PSNR differs by at most 0.10 dB over 1 pairs" in text
    assert gate_verdicts({**_gate_result(delta, ci), "targets": []}) == []  # no gate rows: nothing said


def test_policy_rows_run_and_are_rendered_with_verdicts(dit):
    from dqar.studies.fidelity import adaptive_policy as P
    from dqar.studies.fidelity.policy_eval import shipped_policy

    s = A.AdaptiveSettings(**{**TINY, "steps": 8})
    path = str(shipped_policy())
    rows = P.run_policy_rows({"shipped": path, "same": path}, s, targets=(0.45,), progress=False)
    assert 0.3 < rows["attention_share"] < 0.45  # attention's share of the embedded DiT's FLOPs
    comp = rows["targets"][0]
    assert comp["share"] == pytest.approx(0.45 * rows["attention_share"]) and comp["static"]["decider"] == "static"
    assert {r["policy"] for r in comp["policy"].values()} == {"shipped", "same"}
    assert comp["between"]["delta_db"] == 0.0  # the same checkpoint, the same seeds: the same images
    assert all("delta_ci" in r and r["host_syncs_per_evaluation"] > 0 for r in comp["policy"].values())
    text = section_body({**_result_with_gate_free_rows(), "policy_rows": rows}, "cmd", "today", "here")
    assert "**Learned policies at matched work.**" in text and "Presets using a learned policy: none." in text
    assert "the same policy is not distinguishable from the shipped policy: +0.00 dB" in text


def _result_with_gate_free_rows():
    row = {"name": "static", "flops_skipped": 0.6, "psnr_db": 36.0, "delta_db": 0.0, "delta_ci": [0.0, 0.0],
           "class_accuracy": 0.9, "fd": 1.0, "host_syncs_per_evaluation": 0.0}
    comp = {"target": 0.6, "static": {"taylor": row}, "verify": {}, "best_static_kind": "taylor"}
    return {"settings": {"tolerance": 0.02, "samples": 2, "probe_samples": 2, "calib_samples": 1, "targets": [0.6]},
            "model": "embedded", "steps": 8, "cfg": 4.0, "reference": {"class_accuracy": 0.9},
            "shipped": {"full_dqar": copy.deepcopy(row)}, "at_full_dqar": copy.deepcopy(comp), "targets": [comp]}


@pytest.mark.parametrize("ci, word", [([0.2, 0.9], "beats"), ([-0.9, -0.2], "loses to"), ([-0.2, 0.3], "is not distinguishable from")])
def test_policy_verdicts_are_computed_from_the_numbers(ci, word):
    from dqar.studies.fidelity.adaptive_section import policy_lines

    row = {"name": "policy probe, threshold 0.01", "flops_skipped": 0.16, "psnr_db": 40.0, "delta_db": sum(ci) / 2,
           "delta_ci": ci, "class_accuracy": 0.9, "fd": 1.0, "host_syncs_per_evaluation": 0.9}
    static = {**row, "name": "static attention", "flops_skipped": 0.165, "host_syncs_per_evaluation": 0.0}
    pr = {"attention_share": 0.367, "targets": [{"target": 0.45, "share": 0.165, "static": static, "policy": {"probe": row}}]}
    text = " ".join(policy_lines({**_result_with_gate_free_rows(), "policy_rows": pr}))
    assert f"policy probe, threshold 0.01 (16.0% of the FLOPs) {word} the best static plan (static attention): {sum(ci) / 2:+.2f} dB" in text
    far = {**pr, "targets": [{**pr["targets"][0], "policy": {"probe": {**row, "flops_skipped": 0.10}}}]}
    assert "6.5 points from the static plan" in " ".join(policy_lines({**_result_with_gate_free_rows(), "policy_rows": far}))


@pytest.mark.parametrize("mse, word", [(0.02, "lowers"), (0.05, "does not lower")])
def test_the_policy_doc_section_is_computed_from_the_numbers(mse, word):
    from dqar.studies.fidelity.adaptive_section import POLICY_DOC_SECTION, policy_doc_body

    row = {"name": "policy probe-feature, threshold 0.01", "flops_skipped": 0.16, "psnr_db": 40.0, "delta_db": -0.5,
           "delta_ci": [-0.9, -0.1], "class_accuracy": 0.9, "fd": 1.0, "host_syncs_per_evaluation": 0.9}
    split, collect = {"heldout_generations": [1, 2]}, {"generations": 48, "batch": 2, "seed": 10000}
    training = {"heldout": {"r2_log": 0.98, "spearman": 0.99, "mse_log": mse}, "split": split, "collect": {**collect, "probe_feature": True},
                "parameters": 4865, "collect_wall_seconds": 75.0, "train_wall_seconds": 8.0}
    pr = {"attention_share": 0.367, "policies": {"shipped": "a", "probe-feature": "b"}, "training": training,
          "targets": [{"target": 0.45, "share": 0.165, "static": {**row, "name": "static"}, "policy": {"probe-feature": row}}]}
    shipped = {"heldout": {"r2_log": 0.97, "spearman": 0.989, "mse_log": 0.034}, "split": split, "collect": collect}
    text = policy_doc_body({**_result_with_gate_free_rows(), "policy_rows": pr}, shipped, "cmd")
    assert text.startswith(f"## {POLICY_DOC_SECTION}\n") and "held out on the same 2 generations" in text
    assert "the shipped policy's collect settings" in text
    other = policy_doc_body({**_result_with_gate_free_rows(), "policy_rows": pr}, {**shipped, "collect": {**collect, "seed": 1}}, "c")
    assert "collect settings other than the shipped policy's: seed" in other
    assert "| mse_log | 0.0340 | " in text and f"The probe feature {word} the held-out MSE" in text
    assert "loses to the best static plan (static): -0.50 dB [-0.90, -0.10]" in text
