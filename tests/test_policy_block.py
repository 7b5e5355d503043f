"""Block-feature policies (`features.BLOCK_FEATURES`): whole-block labels on any family (embedded-flux, the DiT), the
signals the engine reads while sampling them, one decision per denoising step across CFG branches, and refusals."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from dqar.cli import main
from dqar.engine import policy as policy_module
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.engine.features import BLOCK_FEATURES, BLOCK_PROBE_FEATURES, FEATURES, MISSING_CHANGE, PROBE_LAYER, feature_matrix
from dqar.engine.policy_net import save_policy
from dqar.engine.signals import relative_change
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.tuning.collect import CollectSettings, FullCompute, collect_traces, load_traces

from conftest import TINY_ADAPTIVE, constant_checkpoint

SAMPLE = SampleConfig(steps=5, cfg=4.0, seed=0)
BLOCK = dict(granularity="block", schedule="constant", warmup_frac=0.0, refresh_interval=4, max_staleness=3)


def constant_policy(log_error: float, meta: dict, names=BLOCK_FEATURES):
    """A block-feature policy (over `names`) predicting exp(log_error) everywhere, labelled like the shipped ones."""
    return constant_checkpoint(log_error, names, {"granularity": "block", "forecast_kind": "taylor", "forecast_order": 0, **meta},
                               hidden=4)


def block_residuals(model, layer: int, steps: int, labels, cfg: float):
    """Each forward's (image residual, text residual, image input, text input) of one block, by full compute."""
    from dqar.engine.adapter import describe, outputs

    layout = describe(model.transformer)
    block, spec, seen, inputs = layout.blocks[layer], layout.specs[layer], [], {}

    def pre(module, args, kwargs):
        inputs["x"] = layout.inputs(layer, args, kwargs)

    def post(module, args, out):
        h, e = outputs(spec, out)
        x, c = inputs["x"]
        seen.append((h.float() - x.float(), e.float() - c.float(), x.float(), c.float()))

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post)]
    try:
        generate(model, labels, RunConfig(reuse=ReuseConfig(enabled=False), sample=replace(SAMPLE, steps=steps, cfg=cfg)))
    finally:
        for h in handles:
            h.remove()
    return seen


# ----- features and traces --------------------------------------------------------------------------
def test_the_block_set_reads_no_dit_signal():
    shape = (3, 5)
    feats = feature_matrix(change=torch.full(shape, 0.5), gap=torch.ones(shape), x_rms=torch.full((3,), 2.0),
                           step_fraction=torch.tensor([0.0, 0.5, 1.0]), ages=torch.ones(shape), num_layers=5,
                           probe_error=torch.full((3,), 0.25), names=BLOCK_PROBE_FEATURES)  # no entropy, no SNR given
    assert feats.shape == (3, 5, len(BLOCK_PROBE_FEATURES))
    col = {n: feats[..., i] for i, n in enumerate(BLOCK_PROBE_FEATURES)}
    assert torch.allclose(col["log_x_rms"], torch.log(torch.tensor(2.0)).expand(shape))
    assert torch.allclose(col["log_probe_error"], torch.log(torch.tensor(0.25)).expand(shape))
    assert torch.allclose(col["layer_fraction"][0], torch.linspace(0, 1, 5))
    with pytest.raises(AttributeError):  # the DiT set needs its entropy
        feature_matrix(change=torch.ones(shape), gap=torch.ones(shape), x_rms=torch.ones(3), step_fraction=torch.zeros(3),
                       ages=torch.ones(shape), num_layers=5, names=FEATURES)


def test_flux_block_labels_are_the_residual_perturbation_of_a_copy(flux):
    """Order 0, one branch (CFG 1): label(e, l, age 1) = max over streams ‖r_(e−1) − r_e‖ / ‖h_e‖; the change feature is
    the image residual's relative change."""
    from dqar.tuning.block_labels import block_full_compute

    run = RunConfig(reuse=ReuseConfig(granularity="block"), sample=replace(SAMPLE, cfg=1.0))
    fc = FullCompute(*block_full_compute(flux, [3], run, max_age=2))
    seen = block_residuals(flux, 2, 5, [3], 1.0)
    assert fc.errors.shape == (5, 5, 2) and np.isnan(fc.errors[0]).all() and np.isfinite(fc.errors[1:, :, 0]).all()
    for e in range(1, 5):
        (r, t, x, c), (r0, t0, _, _) = seen[e], seen[e - 1]
        want = max(float((r0 - r).norm() / x.norm()), float((t0 - t).norm() / c.norm()))
        assert fc.errors[e, 2, 0] == pytest.approx(want, rel=1e-4)
        assert fc.change[e, 2, 0] == pytest.approx(float(relative_change(r, r0)), rel=1e-4)
    assert fc.x_rms.shape == (5,) and np.isfinite(fc.x_rms).all()


def test_true_cfg_labels_take_the_worse_branch(flux):
    from dqar.tuning.block_labels import block_full_compute

    run = RunConfig(reuse=ReuseConfig(granularity="block"), sample=SAMPLE)
    fc = FullCompute(*block_full_compute(flux, [3], run, max_age=1))
    seen = block_residuals(flux, 1, 5, [3], 4.0)  # forwards: cond, uncond per step
    for e in range(1, 5):
        per_branch = []
        for b in (0, 1):
            (r, t, x, c), (r0, t0, _, _) = seen[2 * e + b], seen[2 * (e - 1) + b]
            per_branch.append(max(float((r0 - r).norm() / x.norm()), float((t0 - t).norm() / c.norm())))
        assert fc.errors[e, 1, 0] == pytest.approx(max(per_branch), rel=1e-4)
        r, r0 = seen[2 * e][0], seen[2 * (e - 1)][0]
        assert fc.change[e, 1, 0] == pytest.approx(float(relative_change(r, r0)), rel=1e-4)  # the first (cond) branch


def test_collect_on_flux_defaults_to_blocks_and_its_steps(tmp_path, single_thread):
    out = tmp_path / "t.npz"
    assert main(["policy", "collect", "--model", "embedded-flux", "--generations", "2", "--batch", "1", "--steps", "4",
                 "--forecast-kind", "bdf2_heun", "--forecast-order", "2", "--out", str(out), "--quiet"]) == 0
    t = load_traces(out)
    assert tuple(t.meta["features"]) == BLOCK_FEATURES and t.features.shape[1] == len(BLOCK_FEATURES)
    assert t.meta["granularity"] == "block" and t.meta["forecast_kind"] == "bdf2_heun" and t.meta["num_layers"] == 5
    assert t.meta["sampler"] == "flow" and t.meta["steps"] == 4  # the sampler the model really runs
    assert np.isfinite(t.features).all() and (t.labels > 0).all()
    assert main(["policy", "collect", "--model", "embedded-flux", "--probe-feature", "--generations", "1", "--batch", "1",
                 "--steps", "3", "--out", str(tmp_path / "p.npz"), "--quiet"]) == 0
    assert tuple(load_traces(tmp_path / "p.npz").meta["features"]) == BLOCK_PROBE_FEATURES


def test_collect_takes_the_models_sampling_defaults(tmp_path, monkeypatch):
    import dqar.tuning.collect as collect

    seen = {}

    def fake(loaded, settings, progress=True):
        seen["settings"] = settings
        raise DqarError("stopped here", "nothing to fix")

    monkeypatch.setattr(collect, "collect_traces", fake)
    for model, steps in (("embedded-flux", 28), ("embedded", 50)):
        assert main(["policy", "collect", "--model", model, "--out", str(tmp_path / "t.npz"), "--quiet"]) == 2
        s = seen.pop("settings")
        assert s.steps == steps and s.cfg == 4.0 and s.granularity == ("block" if model == "embedded-flux" else "attention")


def test_a_block_policy_collects_on_the_dit_too(dit):
    traces = collect_traces(dit, CollectSettings(generations=1, batch=1, steps=4, granularity="block"), progress=False)
    assert tuple(traces.meta["features"]) == BLOCK_FEATURES and traces.meta["num_layers"] == 8
    assert np.isfinite(traces.labels).all()


def test_attention_labels_refuse_a_forecaster_they_do_not_measure():
    with pytest.raises(DqarError, match="taylor"):
        CollectSettings(forecast_kind="bdf2_heun")


# ----- sampling with a block policy -----------------------------------------------------------------
def test_flux_policy_reads_the_engines_block_signals_on_the_first_branch(flux, tmp_path, monkeypatch):
    path = tmp_path / "never.safetensors"
    save_policy(constant_policy(0.0, {"model": "embedded-flux", "num_layers": 5}, BLOCK_PROBE_FEATURES), path)  # never reuses
    seen = []
    build = policy_module.feature_matrix
    monkeypatch.setattr(policy_module, "feature_matrix", lambda **kw: (seen.append(kw), build(**kw))[1])
    residuals = block_residuals(flux, PROBE_LAYER, 5, [3], 4.0)
    gen = generate(flux, [3], RunConfig(reuse=ReuseConfig(**BLOCK, policy=str(path), policy_threshold=0.5), sample=SAMPLE))
    assert gen.stats.reused == 0 and len(seen) == 4  # one decision per step (evaluations 1..4), not one per forward
    assert float(seen[0]["probe_error"]) == MISSING_CHANGE
    for k, e in enumerate(range(2, 5), start=1):  # the probe's change measured at e − 1, on the cond branch
        r, r0 = residuals[2 * (e - 1)][0], residuals[2 * (e - 2)][0]
        assert float(seen[k]["probe_error"]) == pytest.approx(float(relative_change(r, r0)), rel=1e-4)
        assert "entropy" in seen[k] and seen[k]["entropy"] is None  # no DiT signal measured


def test_flux_threshold_acts_and_cfg_branches_share_each_decision(flux, tmp_path):
    path = tmp_path / "p.safetensors"
    save_policy(constant_policy(np.log(0.1), {"model": "embedded-flux", "num_layers": 5}, BLOCK_PROBE_FEATURES), path)
    run = lambda th: RunConfig(reuse=ReuseConfig(**BLOCK, policy=str(path), policy_threshold=th), sample=SAMPLE)  # noqa: E731
    low, high = generate(flux, [3], run(0.05)), generate(flux, [3], run(0.2))
    assert low.stats.reused == 0 and high.stats.reused > 0
    assert not torch.equal(low.output.images, high.output.images)
    assert 0 < high.stats.host_syncs <= SAMPLE.steps - 1  # at most one read per step: the uncond branch replays
    assert not np.array(high.stats.reuse_mask, dtype=bool)[:, PROBE_LAYER].any()  # the probe computes at every step


@pytest.mark.parametrize("meta, reuse, words", [
    ({"model": "embedded-flux", "num_layers": 5}, {"granularity": "attention"}, "granularity = 'block'"),
    ({"model": "embedded-flux", "num_layers": 5, "forecast_order": 1}, {"forecast_kind": "hermite", "forecast_order": 1},
     "forecast_kind = 'taylor'"),
])
def test_a_block_policy_refuses_settings_it_was_not_labelled_on(flux, tmp_path, meta, reuse, words):
    path = tmp_path / "p.safetensors"
    save_policy(constant_policy(0.0, meta), path)
    cfg = ReuseConfig(**{**BLOCK, **reuse}, policy=str(path))
    with pytest.raises(DqarError, match=words):
        generate(flux, [3], RunConfig(reuse=cfg, sample=SAMPLE))


def test_a_flux_policy_is_refused_on_the_dit(tmp_path, capsys):
    path = tmp_path / "p.safetensors"
    save_policy(constant_policy(0.0, {"model": "embedded-flux", "num_layers": 5}), path)
    assert main(["policy", "evaluate", "--policy", str(path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trained for model 'embedded-flux'" in err


def test_flux_policy_study_runs_its_methods_and_writes_its_own_section(tmp_path, single_thread):
    from dqar.studies.fidelity.policy_eval import EvaluateSettings, run_policy_study
    from dqar.studies.fidelity.policy_report import write_policy_section

    path = tmp_path / "p.safetensors"
    save_policy(constant_policy(np.log(0.1), {"model": "embedded-flux", "num_layers": 5}), path)
    (tmp_path / "FIDELITY.md").write_text("## Learned policy\n\nthe DiT's\n")
    s = EvaluateSettings(policy=str(path), model="embedded-flux", samples=2, steps=4, targets=(0.3,), probe_samples=1,
                         probe_iterations=1, calib_samples=1, out_dir=str(tmp_path), granularity="block")
    with torch.no_grad():
        result = run_policy_study(s, progress=False)
    assert {r["family"] for r in result["rows"]} == {"policy", "policy_plan", "gate_probe", "calibrated", "static"}
    assert {r["config"]["granularity"] for r in result["rows"]} == {"block"}
    text = write_policy_section(result, tmp_path).read_text()
    assert "## Learned policy (embedded-flux)" in text and "the DiT's" in text and "gate (probe error)" in text
    assert "gate (entropy τ)" not in text and (tmp_path / "fidelity_policy_embedded-flux.json").is_file()


# ----- block policies at the adaptive targets (`adaptive_policy.extend_with_policy`) -----------------------
def test_block_policies_extend_a_saved_adaptive_result(dit, tiny_adaptive, tmp_path, single_thread):
    from dqar.studies.fidelity import adaptive as A
    from dqar.studies.fidelity.adaptive_policy import extend_with_policy
    from dqar.studies.fidelity.adaptive_section import block_policy_lines, section_body

    s, saved = A.AdaptiveSettings(**TINY_ADAPTIVE), tiny_adaptive
    meta = {"model": "embedded", "num_layers": 8, "max_age": 3, "forecast_kind": "taylor", "forecast_order": 0}
    paths = {}
    for name, log_error in (("cheap", np.log(1e-3)), ("dear", np.log(0.5))):
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_policy(constant_policy(log_error, meta), paths[name])
    out = extend_with_policy(saved, s, paths, progress=False)
    for comp in [out["at_full_dqar"], *out["targets"]]:
        rows = comp["policy"]
        assert set(rows) == {"cheap", "dear"} and "psnr_per_sample" not in rows["cheap"]
        assert rows["cheap"]["config"]["policy"] == paths["cheap"] and rows["cheap"]["config"]["granularity"] == "block"
        assert rows["cheap"]["config"]["max_staleness"] == 3 and "delta_ci" in rows["cheap"]
        assert comp["policy_between"]["first"] == "cheap" and "calibrated_share" in rows["cheap"]["calibration"]
    assert "policy" not in saved["targets"][0]
    lines = block_policy_lines(out)
    assert lines[-1].startswith("- A block-feature policy beats the best static plan at matched work at")
    assert "**Block-feature policies at matched work.**" in section_body(out, "cmd", "today", "here")
    save_policy(constant_policy(0.0, {**meta, "model": "embedded-flux"}), tmp_path / "other.safetensors")
    with pytest.raises(DqarError, match="trained for model 'embedded-flux'"):
        extend_with_policy(saved, s, {"other": str(tmp_path / "other.safetensors")}, progress=False)


def test_extend_policy_needs_a_policy_file(tmp_path, capsys):
    assert main(["fidelity", "--section", "adaptive", "--extend", "policy", "--policy", str(tmp_path / "none.safetensors"),
                 "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fidelity", "--section", "engine", "--policy", str(tmp_path / "x"), "--out", str(tmp_path)]) == 2
    assert "--extend policy" in capsys.readouterr().err


def test_the_shipped_block_policies_name_their_model_and_setting():
    from dqar.engine.policy_net import load_policy
    from dqar.studies.fidelity.policy_eval import shipped_block_policies, shipped_policy

    flux_path = shipped_policy("embedded-flux")
    assert flux_path.name == "policy_flux.safetensors" and set(shipped_block_policies("embedded-flux")) == {"policy_flux"}
    assert set(shipped_block_policies(None)) == {"policy_block"} and shipped_policy(None).name == "policy.safetensors"
    for path, model, layers in ((flux_path, "embedded-flux", 5), (shipped_block_policies(None)["policy_block"], "embedded", 8)):
        ckpt = load_policy(path)
        assert ckpt.meta["model"] == model and ckpt.meta["num_layers"] == layers and ckpt.meta["granularity"] == "block"
        assert tuple(ckpt.meta["features"]) == BLOCK_FEATURES and ckpt.meta["forecast_kind"] == "bdf2_heun"


@pytest.mark.parametrize("second_share, words", [(0.60, "policy `b` beats policy `a`"), (0.52, "ran at different work")])
def test_between_two_policies_a_verdict_only_at_matched_work(second_share, words):
    from dqar.studies.fidelity.adaptive_section import block_policy_lines

    def row(name, share, delta, ci):
        return {"name": name, "flops_skipped": share, "psnr_db": 30.0, "delta_db": delta, "delta_ci": ci, "class_accuracy": 0.9,
                "fd": 100.0, "host_syncs_per_evaluation": 0.9, "calibration": {"reached": True, "calibrated_share": share}}

    static = row("static", 0.6, 0.0, [0.0, 0.0])
    comp = {"target": 0.6, "best_static_kind": "taylor", "static": {"taylor": static}, "policy_base_psnr_db": 30.0,
            "policy": {"a": row("policy a", 0.6, -2.0, [-3.0, -1.0]), "b": row("policy b", second_share, -1.0, [-1.5, -0.5])},
            "policy_between": {"first": "a", "second": "b", "delta_db": 1.0, "delta_ci": [0.5, 1.5]}}
    result = {"settings": {"tolerance": 0.02}, "reference": {"class_accuracy": 0.9}, "targets": [comp],
              "at_full_dqar": {"target": 0.64, "static": {}}, "block_policies": {}}
    lines = block_policy_lines(result)
    assert any(words in line for line in lines)
    assert lines[-1].endswith("at no target; presets using a learned policy: none.")
