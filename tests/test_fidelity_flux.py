"""Every remaining study on embedded-flux: fidelity sections (engine, dynamic), calibrated plans, and DiT policies' refusal.

Fast CPU runs: embedded-flux at 2-3 steps on 1-2 samples (or one per class). Rows the Flux family cannot run are
refused rows with the engine's reason; the Flux sections are written beside the DiT's without touching them.
"""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dqar.cli import main
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.engine.plan import load_plan, save_plan
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.reporting.documents import replace_section

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = SampleConfig(steps=3, cfg=4.0, seed=0)



def _section(text: str, heading: str) -> str:
    lines = text.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end])


def _rc(argv: list[str]) -> int:
    """The CLI's exit code, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _docs(tmp_path: Path) -> Path:
    doc = tmp_path / "FIDELITY.md"
    doc.write_text((ROOT / "docs" / "FIDELITY.md").read_text())
    return doc


# ----- calibration ----------------------------------------------------------------------------------
def test_flux_trace_counts_steps_and_leaves_the_model_untouched(flux):
    from dqar.tuning.calibrate import record_trace

    run = RunConfig(reuse=ReuseConfig(), sample=SAMPLE)
    before = generate(flux, [1, 2], replace(run, reuse=preset("baseline"))).output.images
    trace = record_trace(flux, [1, 2], run)
    assert trace.change.shape == (3, 5)  # denoising steps x layers (1 dual- + 4 single-stream), both CFG branches in one row
    assert np.isnan(trace.change[0]).all() and np.isfinite(trace.change[1:]).all() and (trace.change[1:] > 0).all()
    assert np.isnan(trace.entropy).all() and np.isfinite(trace.snr_scheduler).all()
    assert not any(m._forward_hooks for m in flux.transformer.modules())
    assert torch.equal(generate(flux, [1, 2], replace(run, reuse=preset("baseline"))).output.images, before)
    quad = record_trace(flux, [1, 2], replace(run, reuse=ReuseConfig(forecast_order=2, granularity="block"))).change
    assert quad.shape == (3, 5) and np.isfinite(quad[1:]).all()


def test_flux_calibrated_plan_runs_and_plans_refuse_the_other_model(flux, dit, tmp_path):
    from dqar.tuning.calibrate import calibrate

    run = RunConfig(reuse=ReuseConfig(), sample=SAMPLE)
    cal = calibrate(flux, [0], run, target_fraction=0.5, max_staleness=2)
    assert cal.plan.mask.shape == (3, 5) and cal.plan.key["model"] == "embedded-flux"
    save_plan(cal.plan, tmp_path / "f.json")
    gen = generate(flux, [0, 3], replace(run, reuse=ReuseConfig(plan_file=str(tmp_path / "f.json"))))
    assert gen.stats.reuse_fraction == pytest.approx(cal.plan.reuse_fraction)
    other = calibrate(dit, [0], run, target_fraction=0.5, max_staleness=2).plan
    save_plan(other, tmp_path / "d.json")
    # refused at enable by the plan's stream layout (each model's own plans record theirs), before the model name is read
    with pytest.raises(DqarError, match=r"plan was made for 8 layers \(streams 1 x8\) but FluxTransformer2DModel"):
        generate(flux, [0], replace(run, reuse=ReuseConfig(plan_file=str(tmp_path / "d.json"))))
    with pytest.raises(DqarError, match=r"plan was made for 5 layers \(streams 2 x5\) but DiTTransformer2DModel"):
        generate(dit, [0], replace(run, reuse=ReuseConfig(plan_file=str(tmp_path / "f.json"))))


def test_cli_calibrate_on_flux_then_sample_with_it(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["calibrate", "--model", "embedded-flux", "--steps", "2", "--samples", "1", "--target", "0.4", "--out", str(out),
                 "--quiet", "--threads", "1"]) == 0
    plan = load_plan(out)
    assert plan.key["model"] == "embedded-flux" and plan.mask.shape == (2, 5)
    toml = tmp_path / "run.toml"
    toml.write_text(f'[reuse]\nplan_file = "{out}"\n[sample]\nsteps = 2\n')
    assert main(["sample", "--model", "embedded-flux", "--config", str(toml), "--classes", "0", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 0
    capsys.readouterr()
    rc = _rc(["sample", "--model", "embedded", "--config", str(toml), "--classes", "0", "--out", str(tmp_path / "s2"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "embedded-flux" in err


# ----- the policy -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit_policy(tmp_path_factory, single_thread):
    """A tiny policy trained on the embedded DiT (3 steps, 2 generations of 1 sample, 1 epoch)."""
    tmp = tmp_path_factory.mktemp("policy")
    assert main(["policy", "collect", "--generations", "2", "--batch", "1", "--steps", "3", "--out", str(tmp / "t.npz"), "--quiet"]) == 0
    assert main(["policy", "train", "--traces", str(tmp / "t.npz"), "--epochs", "1", "--hidden", "4", "--holdout", "0.5",
                 "--out", str(tmp / "p.safetensors"), "--quiet"]) == 0
    return tmp / "p.safetensors"


@pytest.mark.parametrize("argv, words", [
    ("policy collect --model embedded-flux --granularity attention --generations 1 --out {tmp}/x.npz", "DiT BasicTransformerBlocks only"),
    ("policy collect --model random-flux-tiny --granularity attention --generations 1 --out {tmp}/x.npz",
     "dqar policy collect --model random-flux-tiny --granularity block"),
    ("policy evaluate --model embedded-flux --policy {policy} --out {tmp}", "trained for model 'embedded'"),
    ("policy distill --model embedded-flux --policy {policy} --out {tmp}/p.json", "trained for model 'embedded'"),
])
def test_dit_policies_are_refused_on_flux_in_one_line(argv, words, dit_policy, tmp_path, capsys):
    rc = _rc(argv.format(tmp=tmp_path, policy=dit_policy).split())
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err and "Traceback" not in err


def test_a_dit_policy_is_refused_by_the_flux_engine_and_library(dit_policy, flux):
    from dqar.tuning.collect import check_policy_family
    from dqar.tuning.train import check_trained_for
    from dqar.engine.policy_net import load_policy

    with pytest.raises(DqarError, match="BasicTransformerBlock"):
        generate(flux, [0], RunConfig(reuse=ReuseConfig(policy=str(dit_policy)), sample=SAMPLE))
    with pytest.raises(DqarError, match="embedded-flux"):
        check_policy_family(flux)
    with pytest.raises(DqarError, match="trained for model 'embedded'"):
        check_trained_for(load_policy(dit_policy).meta, "embedded-flux")
    check_trained_for(load_policy(dit_policy).meta, None)  # the DiT it was trained on


# ----- the fidelity sections ------------------------------------------------------------------------
def test_engine_section_on_flux_refuses_the_gate_and_keeps_the_dit_section(tmp_path):
    from dqar.studies.fidelity.engine import EngineSettings, engine_cases, run_engine, write_engine

    cases = [c for c in engine_cases() if c[1] in ("gate", "full_dqar", "refresh 2, INT8 per token")]
    s = EngineSettings(samples_per_class=1, steps=2, cfg=4.0, out_dir=str(tmp_path), model="embedded-flux", machine="test CPU")
    result = run_engine(s, progress=False, cases=cases)
    rows = {r["name"]: r for r in result["rows"]}
    assert "BasicTransformerBlock" in rows["gate"]["refused"] and "refused" not in rows["full_dqar"]
    assert rows["full_dqar"]["reuse"] > 0 and rows["full_dqar"]["psnr_db"] > 0 and result["samples"] == 10
    doc = _docs(tmp_path)
    before = _section(doc.read_text(), "## Engine")
    write_engine(result, tmp_path)
    text = doc.read_text()
    assert _section(text, "## Engine") == before
    flux_part = _section(text, "## Engine (embedded-flux)")
    assert "refused: the entropy gate" in flux_part and "--model embedded-flux" in flux_part and "test CPU" in flux_part
    assert (tmp_path / "fidelity_engine_embedded-flux.json").is_file() and not (tmp_path / "fidelity_engine.json").exists()


def test_dynamic_section_on_flux_refuses_gate_and_cfg_share_and_calibrates(tmp_path):
    from dqar.studies.fidelity.evidence import DynamicSettings, default_cases, run_dynamic, summary_lines, write_dynamic

    by = {c.name: c for c in default_cases()}
    cases = [by[n] for n in ("constant, refresh 2", "gate preset (linear, τ 0.97, INT8)", "calibrated, target 40%, staleness ≤ 2",
                             "cond→uncond from 50%")]
    s = DynamicSettings(samples=2, steps=3, cfg=4.0, calib_samples=1, out_dir=str(tmp_path), model="embedded-flux", machine="test CPU")
    result = run_dynamic(s, cases=cases, progress=False)
    fams = {r["family"]: r for r in result["rows"]}
    assert "refused" in fams["gate"] and "cfg_share" in fams["cfg_share"]["refused"]
    assert fams["calibrated"]["reuse"] == pytest.approx(0.4, abs=0.1) and fams["static"]["psnr_db"] > 0
    assert result["targets"]["gate"]["refused"] and result["signals"]["spearman_entropy_vs_change"] is None
    doc = _docs(tmp_path)
    before = _section(doc.read_text(), "## Dynamic reuse")
    write_dynamic(result, tmp_path)
    text = doc.read_text()
    assert _section(text, "## Dynamic reuse") == before
    assert "refused: cfg_share" in _section(text, "## Dynamic reuse (embedded-flux)")
    assert (tmp_path / "fidelity_dynamic_embedded-flux.png").is_file() and any("refused" in line for line in summary_lines(result))


def test_cli_fidelity_takes_flux_defaults_and_refuses_other_models(tmp_path, capsys, monkeypatch):
    import dqar.studies.fidelity.engine as engine

    seen = {}
    monkeypatch.setattr(engine, "run_engine", lambda s, progress=True: seen.setdefault("s", s) and {"rows": [], "model": s.model})
    monkeypatch.setattr(engine, "write_engine", lambda result, out: tmp_path / "FIDELITY.md")
    assert main(["fidelity", "--section", "engine", "--model", "embedded-flux", "--out", str(tmp_path), "--quiet"]) == 0
    assert "Engine (embedded-flux)" in capsys.readouterr().out
    assert (seen["s"].steps, seen["s"].cfg, seen["s"].model) == (28, 4.0, "embedded-flux")
    assert _rc(["fidelity", "--section", "engine", "--model", "random-flux-tiny"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_replace_section_keeps_a_flux_heading_apart_from_the_dit_one():
    text = "# Fidelity\n\n## Engine\n\ndit\n\n## Engine (embedded-flux)\n\nold\n\n## Forecast\n\nf\n"
    out = replace_section(text, "Engine (embedded-flux)", "## Engine (embedded-flux)\n\nnew\n")
    assert "dit" in out and "new" in out and "old" not in out and out.index("new") < out.index("## Forecast")


def test_flux_trace_measures_the_runs_own_forecaster(flux):
    """The block trace forecasts as the engine would (`forecast_kind`), so full_dqar's bdf2_heun calibrates on Flux."""
    from dqar.tuning.calibrate import record_trace

    run = RunConfig(reuse=ReuseConfig(forecast_order=2, granularity="block"), sample=replace(SAMPLE, steps=5))
    taylor = record_trace(flux, [1], run).change
    bdf2 = record_trace(flux, [1], replace(run, reuse=replace(run.reuse, forecast_kind="bdf2_heun"))).change
    assert np.isfinite(bdf2[1:]).all()
    np.testing.assert_array_equal(bdf2[:3], taylor[:3])  # up to two stored outputs both forecast alike (copy, then line)
    assert not np.allclose(bdf2[3:], taylor[3:])  # with three, the BDF2/Heun weights differ from the quadratic's


def test_policy_collect_probe_feature_flag_records_the_probe_column(tmp_path, single_thread):
    from dqar.engine.features import FEATURES, PROBE_FEATURES
    from dqar.tuning.collect import load_traces

    args = ["policy", "collect", "--generations", "1", "--batch", "1", "--steps", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "plain.npz")]) == 0
    assert main([*args, "--probe-feature", "--out", str(tmp_path / "probe.npz")]) == 0
    plain, probe = load_traces(tmp_path / "plain.npz"), load_traces(tmp_path / "probe.npz")
    assert tuple(plain.meta["features"]) == tuple(FEATURES) and tuple(probe.meta["features"]) == tuple(PROBE_FEATURES)
    assert probe.features.shape[1] == plain.features.shape[1] + 1
