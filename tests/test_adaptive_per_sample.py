"""Per-sample refresh rows of the adaptive comparison (dqar/studies/fidelity/adaptive_split.py): the extension of a saved
result, its pairings and refusals, and the verdicts computed from the numbers."""
import copy

import pytest

from dqar.errors import DqarError
from dqar.studies.fidelity import adaptive as A
from dqar.studies.fidelity.adaptive_section import per_sample_lines, section_body
from dqar.studies.fidelity.adaptive_split import extend_with_per_sample

from conftest import TINY_ADAPTIVE as TINY


@pytest.fixture(scope="module")
def saved(tiny_adaptive, single_thread):
    return tiny_adaptive


def test_extending_a_saved_result_adds_per_sample_rows(saved):
    s = A.AdaptiveSettings(**TINY)
    out = extend_with_per_sample(saved, s, kinds=("taylor",), progress=False)
    for comp in [out["at_full_dqar"], *out["targets"]]:
        row = comp["per_sample"]["taylor"]
        assert row["decider"] == "verify per sample" and row["config"]["verify_per_sample"] is True
        assert row["batch_psnr_db"] == pytest.approx(comp["verify"]["taylor"]["psnr_db"], abs=A.REMEASURE_DB)
        assert "delta_vs_batch_db" in row and "delta_db" in row and "psnr_per_sample" not in row
    assert "per_sample" not in saved["targets"][0]  # the saved result itself is untouched
    assert "**Per-sample refresh.**" in section_body(out, "cmd", "today", "here")
    tampered = copy.deepcopy(saved)
    tampered["targets"][0]["verify"]["taylor"]["psnr_db"] += 1.0
    with pytest.raises(DqarError, match="re-measures"):
        extend_with_per_sample(tampered, s, kinds=("taylor",), progress=False)


def _result(delta_vs_batch, ci, batch_skipped=0.6):
    row = {"name": "per-sample verify taylor", "flops_skipped": 0.6, "psnr_db": 36.0, "delta_db": -0.5, "delta_ci": [-0.9, -0.1],
           "class_accuracy": 0.9, "host_syncs_per_evaluation": 0.8, "batch_flops_skipped": batch_skipped, "batch_psnr_db": 35.0,
           "delta_vs_batch_db": delta_vs_batch, "delta_vs_batch_ci": ci}
    comp = {"target": 0.6, "static": {}, "verify": {}, "per_sample": {"taylor": row}}
    return {"settings": {"tolerance": 0.02}, "reference": {"class_accuracy": 0.91}, "targets": [comp],
            "at_full_dqar": {"target": 0.64, "static": {}, "verify": {}}}


@pytest.mark.parametrize("delta, ci, word", [(1.0, [0.4, 1.6], "beats"), (-1.0, [-1.6, -0.4], "loses to"),
                                             (0.1, [-0.3, 0.5], "is not distinguishable from")])
def test_the_verdict_is_computed_from_the_interval(delta, ci, word):
    last = per_sample_lines(_result(delta, ci))[-1]
    assert f"Per-sample refresh {word} the batch decider at 60.0%" in last
    assert "beats the best static plan at no target" in last and "Presets using it: none" in last


def test_unmatched_work_is_not_a_verdict():
    last = per_sample_lines(_result(1.0, [0.4, 1.6], batch_skipped=0.55))[-1]
    assert "was not compared at matched work" in last and "not matched within ±2% at 60.0%" in last
