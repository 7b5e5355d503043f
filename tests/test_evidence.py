"""Dynamic-reuse evidence: section replacement, the static frontier and targets, a tiny end-to-end run; CLI."""
import json

import numpy as np
import pytest

from dqar.cli import main
from dqar.engine.config import ReuseConfig
from dqar.reporting.documents import replace_section
from dqar.studies.core import frontier, x_at, y_at
from dqar.studies.fidelity.evidence import Case, DynamicSettings, default_cases, run_dynamic, targets, write_dynamic
from dqar.engine.plan import load_plan


def test_replace_section_keeps_other_sections():
    doc = "# Fidelity\n\nintro\n\n## Other\n\nkept\n\n## Dynamic reuse\n\nold\n\n## Later\n\nalso kept\n"
    new = replace_section(doc, "Dynamic reuse", "## Dynamic reuse\n\nnew\n")
    assert new == "# Fidelity\n\nintro\n\n## Other\n\nkept\n\n## Dynamic reuse\n\nnew\n\n## Later\n\nalso kept\n"
    assert replace_section("", "Dynamic reuse", "## Dynamic reuse\n\nx\n") == "# Fidelity\n\n## Dynamic reuse\n\nx\n"
    assert replace_section("# F\n\n## A\n\na\n", "Dynamic reuse", "## Dynamic reuse\n\nx\n") == "# F\n\n## A\n\na\n\n## Dynamic reuse\n\nx\n"


def row(family, skip, db, acc=0.9):
    return {"family": family, "name": f"{family} {skip}", "attention_skipped": skip, "psnr_db": db, "class_accuracy": acc}


def test_frontier_and_targets():
    static = [row("static", 0.2, 40), row("static", 0.4, 30), row("static", 0.35, 28), row("static", 0.5, 25)]
    f = frontier(static, "attention_skipped")
    assert f[0].tolist() == [0.2, 0.4, 0.5]  # the dominated point is dropped
    assert y_at(f, 0.3) == pytest.approx(35) and np.isnan(y_at(f, 0.6))
    assert x_at(f, 35) == pytest.approx(0.3) and np.isnan(x_at(f, 20))
    rows = [*static, row("gate", 0.3, 35.5), row("calibrated", 0.5, 33, acc=0.9), row("cfg_share", 0.45, 20)]
    t = targets({"class_accuracy": 0.9}, rows)
    assert not t["gate"]["met"] and t["gate"]["best_psnr_gain_db"][0] == pytest.approx(0.5)
    assert t["calibrated"]["met"] and t["calibrated"]["best_psnr_gain_db"][0] == pytest.approx(8)
    assert not t["cfg_share"]["met"]
    assert t["half_reuse"]["met"] and t["half_reuse"]["psnr_db"] == 33


def test_default_cases_cover_every_family():
    families = {c.family for c in default_cases()}
    assert families == {"static", "gate", "calibrated", "cfg_share"}


def test_tiny_end_to_end_run_writes_the_section(tmp_path):
    cases = [Case("static", "constant", ReuseConfig(schedule="constant", warmup_frac=0.3)),
             Case("gate", "open gate", ReuseConfig(gate=True, schedule="constant", entropy_tau=1.0, warmup_frac=0.3)),
             Case("calibrated", "cal 40%", ReuseConfig(), {"target_fraction": 0.4, "max_staleness": 2}),
             Case("cfg_share", "share", ReuseConfig(warmup_frac=1.0, cfg_share="cond_to_uncond", cfg_share_from=0.5))]
    result = run_dynamic(DynamicSettings(samples=2, steps=4, calib_samples=1), cases, progress=False)
    (tmp_path / "FIDELITY.md").write_text("# Fidelity\n\n## Speed\n\nkept\n")
    write_dynamic(result, tmp_path)
    doc = (tmp_path / "FIDELITY.md").read_text()
    assert "## Speed\n\nkept" in doc and "## Dynamic reuse" in doc and "| calibrated plan | cal 40% |" in doc
    assert (tmp_path / "fidelity_dynamic.png").stat().st_size > 1000
    data = json.loads((tmp_path / "fidelity_dynamic.json").read_text())
    by = {r["name"]: r for r in data["rows"]}
    assert by["cal 40%"]["reuse"] == pytest.approx(0.40, abs=0.02) and by["cal 40%"]["host_syncs_per_evaluation"] == 0
    assert by["share"]["reuse"] == 0 and by["share"]["attention_skipped"] == pytest.approx(0.25)
    assert 0 < by["open gate"]["host_syncs_per_evaluation"] <= 1


def test_cli_calibrate_writes_a_keyed_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--samples", "2", "--steps", "4", "--target", "0.3", "--out", str(out),
                 "--trace", str(tmp_path / "trace.json"), "--quiet"]) == 0
    plan = load_plan(out)
    assert plan.key == {"model": "embedded", "sampler": "ddim", "steps": 4, "granularity": "attention", "forecast_order": 0,
                        "forecast_axis": "evaluation", "forecast_kind": "taylor", "streams": [1] * 8, "structure": "cells"} \
        and plan.reuse_fraction > 0
    assert json.loads((tmp_path / "trace.json").read_text())["shape"] == [4, plan.num_layers]
    assert "reuse" in capsys.readouterr().out


def test_cli_calibrate_needs_a_goal(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--steps", "4"])
    assert exc.value.code == 2 and "--target" in capsys.readouterr().err
