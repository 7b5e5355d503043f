"""The study core: one generate for every caller, one scorer, study rows, other seeds, frontiers, cycled labels."""
import numpy as np
import pytest
import torch

from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.engine.decider import TracingDecider
from dqar.engine.plan import Plan
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.labels import cycle_labels
from dqar.metrics import pareto_front
from dqar.studies import core
from dqar.studies.fidelity.policy_eval import EvaluateSettings, measure

from conftest import tiny_loaded

RUN = RunConfig(reuse=ReuseConfig(enabled=False), sample=SampleConfig(steps=4, cfg=4.0, seed=7))


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


@pytest.fixture(scope="module")
def reference(loaded):
    return core.make_reference(loaded, [1, 2], RUN, None)


def test_cycle_labels():
    assert cycle_labels(3, 7) == [0, 1, 2, 0, 1, 2, 0]
    assert cycle_labels([5, 9], 3) == [5, 9, 5]
    assert cycle_labels(10, 3, stride=7) == [0, 7, 4]
    assert cycle_labels(4, 3, start=6) == [2, 3, 0]
    assert cycle_labels(np.int64(2), 3) == [0, 1, 0]
    with pytest.raises(DqarError, match="no classes"):
        cycle_labels([], 2)


def test_generate_attaches_for_a_given_plan_decider_or_executor_only(loaded):
    plain = generate(loaded, [1, 2], RUN)
    assert plain.stats is None
    mask = np.zeros((4, 3), dtype=bool)
    mask[2, 1] = mask[3, 0] = True
    planned = generate(loaded, [1, 2], RUN, plan=Plan(mask))  # the plan acts although the config is disabled
    assert np.array_equal(np.array(planned.stats.reuse_mask, bool), mask)
    assert not torch.equal(planned.output.images, plain.output.images)
    decider = TracingDecider(entropy_rows=4)
    traced = generate(loaded, [1, 2], RUN, decider=decider)
    assert traced.stats.reused == 0 and torch.equal(traced.output.images, plain.output.images)
    assert decider.trace().change.shape == (4, 3)
    fused = generate(loaded, [1, 2], RUN, executor="fused")
    assert fused.stats is not None and fused.stats.reused == 0
    torch.testing.assert_close(fused.output.images, plain.output.images, atol=1e-5, rtol=0)


def test_score_guards_ssim_on_small_images_and_scores_a_configuration(reference):
    own = core.score(reference.images, reference)
    assert reference.images.shape[-1] < 11 and own["ssim"] is None  # 8x8 images: below the SSIM window
    assert own["identical"] and own["psnr_db"] == 100.0 and own["max_abs"] == 0.0
    assert own["class_accuracy"] is None and own["fd"] is None  # no evaluator
    other = core.score((reference.images + 0.05).clamp(0, 1), reference)
    assert not other["identical"] and 0 < other["max_abs"] <= 0.05 + 1e-6 and other["psnr_db"] < 100
    big = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert core.score(big, core.Reference(big, [0, 1]))["ssim"] == pytest.approx(1.0)


def test_score_with_an_evaluator_reports_drops_against_the_reference():
    from dqar.embedded.classifier import FashionCNN

    torch.manual_seed(0)
    clf = FashionCNN().eval()
    images = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = clf.features(images * 2 - 1).double().numpy()
    ev = core.Evaluator(clf, {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}, "test CNN")
    labels = clf(images * 2 - 1).argmax(1).tolist()  # the reference is classified as its labels: accuracy 1
    ref = core.reference_of(generation_of(images), labels, ev)
    assert ref.accuracy == 1.0 and ref.fd == pytest.approx(0.0, abs=1e-6)
    s = core.score(images.flip(0), ref)
    assert s["class_accuracy"] < 1.0 and s["accuracy_drop_points"] == pytest.approx(100 * (1.0 - s["class_accuracy"]))
    assert s["fd_delta"] == pytest.approx(s["fd"] - ref.fd) and s["ssim"] is not None


def generation_of(images):
    from dqar.generate import Generation
    from dqar.sampling import SampleOutput

    return Generation(SampleOutput(images=images, latents=images, num_evaluations=1), None)


def test_rows_and_the_baseline_row(loaded, reference):
    cols = ("reuse", "attention_skipped", "flops_skipped", "cfg_shared", "host_syncs_per_evaluation", "quant_error", "psnr_db", "ssim")
    base = core.baseline_row({"name": "b"}, cols, reference)
    assert base == {"name": "b", **core.NO_REUSE, "psnr_db": 100.0, "ssim": None}
    unpaired = core.baseline_row({"name": "b"}, ("reuse", "psnr_db", "max_abs"), reference, self_paired=False)
    assert unpaired == {"name": "b", "reuse": 0.0, "psnr_db": None, "max_abs": None}
    study = core.Study(loaded, reference)
    gen, scores = study.measure(RunConfig(reuse=ReuseConfig(warmup_frac=1.0, cfg_share="cond_to_uncond", cfg_share_from=0.5),
                                          sample=RUN.sample))
    row = core.study_row({"name": "share"}, cols, gen.stats, scores, config="x")
    assert list(row) == ["name", *cols, "config"]
    assert row["reuse"] == 0 and row["attention_skipped"] == pytest.approx(0.25) and row["cfg_shared"] > 0
    with pytest.raises(ValueError, match="no plan folder"):
        study.save_plan(Plan(np.zeros((4, 3), dtype=bool)), "p")


def test_policy_rows_record_reuse_and_attention_skipped_apart(loaded, reference):
    """CFG sharing skips attention work without reusing a cell: the two shares differ and each is recorded as itself."""
    settings = EvaluateSettings(samples=2, seed=RUN.sample.seed, steps=4, cfg=4.0)
    row = measure(core.Study(loaded, reference), settings, "static", "share", ReuseConfig(warmup_frac=1.0, cfg_share="cond_to_uncond",
                                                                                          cfg_share_from=0.5), 0.3)
    assert row["reuse"] == 0.0 and row["attention_skipped"] == pytest.approx(0.25)


def test_other_seeds_and_baseline_run():
    moved = core.other_seeds(RunConfig(reuse=ReuseConfig(), sample=SampleConfig(seed=5)))
    assert moved.sample.seed == 5 + core.SEED_OFFSET and moved.reuse == ReuseConfig()
    assert core.baseline_run(moved) == RunConfig(reuse=ReuseConfig(enabled=False), sample=moved.sample)


def test_one_pareto_front_serves_plots_and_frontiers():
    pts = [(1.0, 30.0), (1.2, 28.0), (1.1, 25.0), (0.9, 31.0), (1.2, 28.0)]
    assert pareto_front(pts) == [3, 0, 1, 4]  # (1.1, 25) is dominated; identical points both stay
    rows = [{"x": x, "psnr_db": y} for x, y in pts]
    xs, ys = core.frontier(rows, "x")
    assert xs.tolist() == [0.9, 1.0, 1.2, 1.2] and ys.tolist() == [31.0, 30.0, 28.0, 28.0]
    assert core.y_at((xs, ys), 1.1) == pytest.approx(29.0) and core.y_at((xs, ys), 0.5) == 31.0
    assert np.isnan(core.y_at((xs, ys), 1.3)) and core.x_at((xs, ys), 29.0) == pytest.approx(1.1)
    assert np.isnan(core.x_at((xs, ys), 27.0)) and np.isnan(core.y_at((np.array([]), np.array([])), 1.0))
