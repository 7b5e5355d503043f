"""The adaptive comparison (dqar/studies/fidelity/adaptive.py): static shares from plans, matched candidates, the run on a
tiny flow model (the verifying decider refused there, said so), and verdicts computed from the numbers."""
import copy

import numpy as np
import pytest

from dqar.engine.config import RunConfig, SampleConfig
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.models import load_model
from dqar.studies.fidelity import adaptive as A
from dqar.studies.fidelity.adaptive_section import section_body, verdicts


@pytest.fixture(scope="module")
def dit(single_thread):
    return load_model()


def test_static_share_from_the_plan_equals_the_measured_share(dit):
    run = RunConfig(sample=SampleConfig(steps=8, cfg=4.0))
    costs = A.layer_costs(dit, run)
    assert costs.shape == (8,) and np.allclose(costs, costs[0])  # the DiT's blocks are alike
    for cfg in (A.static_config("taylor", 3, 1, 8), A.static_config("hermite", 2, 0, 8)):
        measured = generate(dit, [0], RunConfig(reuse=cfg, sample=run.sample), executor="patch").stats.flops_skipped_fraction
        assert A.static_share(cfg, 8, costs) == pytest.approx(measured, abs=1e-9)


def test_static_candidates_hit_their_target_and_follow_it():
    costs = np.full(8, 0.9 / 8 / 20)  # per reused layer-evaluation
    low = A.static_candidates("taylor", 0.4, 20, costs, 0.02)
    high = A.static_candidates("taylor", 0.6, 20, costs, 0.02)
    assert low and high
    assert all(abs(share - 0.4) <= 0.02 for _, _, share in low) and all(abs(share - 0.6) <= 0.02 for _, _, share in high)
    assert {n for n, _, _ in low} != {n for n, _, _ in high}


def test_settings_refuse_bad_values():
    with pytest.raises(DqarError, match="forecast kinds"):
        A.AdaptiveSettings(kinds=("spline",))
    with pytest.raises(DqarError, match="targets"):
        A.AdaptiveSettings(targets=(1.2,))
    with pytest.raises(DqarError, match="probe samples"):
        A.AdaptiveSettings(probe_samples=1)


def test_tiny_flow_run_scores_static_kinds_and_the_calibrated_decider(single_thread):
    s = A.AdaptiveSettings(model="embedded-flux", samples=3, probe_samples=2, calib_samples=1, calib_steps=1,
                           targets=(0.5,), steps=6, kinds=("taylor", "bdf2_heun"), gate_kinds=("taylor",),
                           gate_schedules=("constant",))
    result = A.run_adaptive(s, progress=False)
    assert (result["evaluated"], result["probed"]) == (3, 2)  # the counts asked for, labels cycling over the classes
    comp = result["targets"][0]
    assert set(comp["static"]) <= {"taylor", "bdf2_heun"} and comp["best_static_kind"] in comp["static"]
    row = comp["verify"]["taylor"]
    assert row["calibration"]["max_interval"] >= 3 and row["host_syncs_per_evaluation"] > 0 and "delta_db" in row
    assert "| 50.0% |" in section_body(result, "cmd", "today", "here")
    gate = comp["gate"]["taylor/constant"]  # the probe-error gate runs on Flux blocks too (patch executor)
    assert gate["host_syncs_per_evaluation"] > 0 and "delta_db" in gate


def test_a_decider_the_engine_refuses_becomes_a_sentence(dit, monkeypatch):
    def refuse(*args, **kwargs):
        raise DqarError("decider = 'verify' is not run here", "use the patch executor")

    monkeypatch.setattr(A, "calibrated_verify", refuse)
    s = A.AdaptiveSettings(samples=2, probe_samples=2, calib_samples=1, calib_steps=1, targets=(0.5,), steps=6,
                           kinds=("taylor",))
    result = A.run_adaptive(s, progress=False)
    assert result["targets"][0]["verify"]["taylor"] is None
    assert "did not run on `embedded`: decider = 'verify' is not run here" in section_body(result, "cmd", "today", "here")


def _result(delta, ci, skipped=0.6, psnr=36.0):
    row = {"name": "verify taylor", "flops_skipped": skipped, "psnr_db": psnr, "delta_db": delta, "delta_ci": ci,
           "class_accuracy": 0.9, "fd": 1.0, "host_syncs_per_evaluation": 1.0}
    static = {**row, "name": "static", "delta_db": 0.0, "delta_ci": [0.0, 0.0], "host_syncs_per_evaluation": 0.0}
    comp = {"target": 0.6, "static": {"taylor": static}, "verify": {"taylor": row}, "best_static_kind": "taylor"}
    return {"settings": {"tolerance": 0.02, "samples": 100, "probe_samples": 20, "calib_samples": 10, "targets": [0.6]},
            "model": "embedded", "steps": 50, "cfg": 4.0, "reference": {"class_accuracy": 0.9},
            "shipped": {"full_dqar": copy.deepcopy(static), "adaptive": copy.deepcopy(row)},
            "at_full_dqar": copy.deepcopy(comp), "targets": [comp]}


@pytest.mark.parametrize("delta, ci, skipped, verdict", [
    (1.5, [0.3, 2.6], 0.6, "met"),
    (1.5, [-0.2, 2.6], 0.6, "missed"),  # the interval reaches 0
    (0.5, [0.2, 0.8], 0.6, "missed"),  # below +1 dB
    (1.5, [0.3, 2.6], 0.65, "missed"),  # not at matched work
])
def test_gain_verdict_is_computed_from_the_numbers(delta, ci, skipped, verdict):
    lines = verdicts(_result(delta, ci, skipped))
    assert f"**{verdict}**" in lines[0]


def test_frontier_verdict_reads_the_rows():
    r = _result(1.5, [0.3, 2.6], skipped=0.82, psnr=35.5)
    assert "target ≥ 80% **met**" in " ".join(verdicts(r))
    r = _result(1.5, [0.3, 2.6], skipped=0.82, psnr=34.0)
    assert "target ≥ 80% **missed**" in " ".join(verdicts(r))


def test_the_verifying_deciders_reuse_cap_grows_with_the_target():
    costs = np.full(8, 0.99 / 8 / 50)
    caps = [A.max_interval_for(t, 50, costs, 0.02) for t in (0.5, 0.7, 0.8)]
    assert caps == sorted(caps) and caps[0] < caps[-1] and caps[0] == A.MAX_INTERVALS[0]


@pytest.mark.parametrize("flags", [["--probe-samples", "1"], ["--calib-samples", "0"], ["--samples", "1"]])
def test_cli_refuses_bad_counts_in_one_line(flags, tmp_path, capsys):
    from dqar.cli.app import main

    assert main(["fidelity", "--section", "adaptive", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flags[0] in err[0]
    assert not (tmp_path / "FIDELITY.md").exists()


def test_section_is_written_under_the_models_own_heading(tmp_path):
    from dqar.studies.fidelity.adaptive_section import write_adaptive

    r = _result(1.5, [0.3, 2.6])
    write_adaptive(r, tmp_path, "dqar fidelity --section adaptive", "test machine")
    write_adaptive({**r, "model": "embedded-flux"}, tmp_path, "dqar fidelity --section adaptive", "test machine")
    text = (tmp_path / "FIDELITY.md").read_text()
    assert "## Adaptive\n" in text and "## Adaptive (embedded-flux)\n" in text
    assert (tmp_path / "fidelity_adaptive.json").is_file() and (tmp_path / "fidelity_adaptive_embedded-flux.json").is_file()


def test_a_partial_run_says_so():
    r = _result(1.5, [0.3, 2.6])
    r["settings"]["targets"] = [0.6, 0.7]
    assert "**Partial run**: 1 of the 2 targets (70% not yet measured)" in section_body(r, "cmd", "today", "here")
    r["settings"]["targets"] = [0.6]
    assert "Partial" not in section_body(r, "cmd", "today", "here")


def test_a_shipped_row_of_a_preset_that_changed_since_says_what_changed():
    import json as _json
    from dataclasses import asdict as _asdict

    from dqar.engine.config import preset as _preset
    from dqar.studies.fidelity.adaptive_section import stale_presets

    now = _json.loads(_json.dumps(_asdict(_preset("full_dqar"))))
    assert stale_presets({"shipped": {"full_dqar": {"config": now}}}) == []
    assert stale_presets({"shipped": {"adaptive": {"config": _asdict(_preset("adaptive"))}}}) == []  # in memory: tuples
    then = dict(now, forecast_kind="hermite")
    (line,) = stale_presets({"shipped": {"full_dqar": {"config": then}}})
    assert f"forecast_kind: hermite → {now['forecast_kind']}" in line
