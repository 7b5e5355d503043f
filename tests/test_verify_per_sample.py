"""Issue 24 item 1: per-sample refresh (`verify_per_sample = true`) splits a batch after the probe block.

Each sample gets its own verdict and keeps its own history (`dqar.engine.row_cache`): with a model-dtype history, a
copy or a forecast, a batch's outputs equal each sample sampled by itself (DiT with batched CFG, Flux with true CFG as
separate forwards), where the batch decider's do not, and the FLOPs skipped are the sum of the samples'. The verdicts
follow each sample's own error; one host read per step; an INT8 history splits too; bad combinations are one-line errors.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch

from dqar.engine.api import make_decider
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.models import load_model

LABELS = [0, 3, 7, 9]


def config(tau: float, per_sample: bool, order: int = 0, kind: str = "taylor", cache: str = "model") -> ReuseConfig:
    """The adaptive preset with a `cache` history; order 0: a copy."""
    return replace(preset("adaptive"), cache_dtype=cache, forecast_kind=kind, forecast_order=order, warmup_frac=0.2,
                   verify_tau=((0.0, tau), (1.0, tau)), verify_max_interval=3, verify_per_sample=per_sample)


def run(loaded, labels, cfg, steps, seed=0):
    decider = make_decider(cfg)
    g = generate(loaded, labels, RunConfig(reuse=cfg, sample=SampleConfig(steps=steps, cfg=4.0, seed=seed)), decider=decider,
                 executor="patch")
    return g, decider


def out(g) -> torch.Tensor:
    """What a generation produced: images, or latents where the model has no VAE (random-flux-tiny)."""
    return g.output.images if g.output.images is not None else g.output.latents


def alone(loaded, cfg, steps):
    """Each label sampled by itself with the seed it has in the batch: (images (N, ...), FLOPs skipped, FLOPs total)."""
    runs = [run(loaded, [c], cfg, steps, seed=i)[0] for i, c in enumerate(LABELS)]
    return (torch.cat([out(g) for g in runs]), sum(g.stats.flops_skipped for g in runs),
            sum(g.stats.flops_total for g in runs))


def split_tau(loaded, steps, order: int = 0, kind: str = "taylor") -> float:
    """A τ inside the spread of the samples' errors, so the batch does split."""
    _, d = run(loaded, LABELS, config(1e9, True, order, kind), steps)
    errs = np.concatenate(list(d.sample_errors.values()))
    return float(np.median(errs))


@pytest.fixture(scope="module")
def dit():
    torch.set_num_threads(1)
    return load_model("embedded")


@pytest.fixture(scope="module")
def flux():
    torch.set_num_threads(1)
    return load_model("random-flux-tiny")


@pytest.mark.parametrize("which, steps, order, kind", [("dit", 12, 0, "taylor"), ("dit", 12, 2, "bdf2_heun"),
                                                      ("flux", 6, 0, "taylor"), ("flux", 6, 2, "bdf2_heun")])
def test_a_batch_samples_as_its_samples_alone(which, steps, order, kind, request):
    loaded = request.getfixturevalue(which)
    tau = split_tau(loaded, steps, order, kind)
    cfg = config(tau, True, order, kind)
    per, decider = run(loaded, LABELS, cfg, steps)
    assert decider.masks, "the batch never split: the test's τ is outside the samples' errors"
    ref, skipped, total = alone(loaded, cfg, steps)
    assert torch.allclose(out(per), ref, atol=2e-4), (out(per) - ref).abs().max()
    assert per.stats.flops_total == total and abs(per.stats.flops_skipped - skipped) <= len(LABELS)
    batch, _ = run(loaded, LABELS, config(tau, False, order, kind), steps)
    assert (out(batch) - ref).abs().max() > 10 * (out(per) - ref).abs().max()  # the knob acts


def test_an_int8_history_splits_near_its_samples_alone(dit):
    tau = split_tau(dit, 12, 2, "bdf2_heun")
    cfg = config(tau, True, 2, "bdf2_heun", cache="int8")
    per, decider = run(dit, LABELS, cfg, 12)
    ref, _, _ = alone(dit, cfg, 12)
    whole, _ = run(dit, LABELS, config(tau, False, 2, "bdf2_heun", cache="int8"), 12)
    assert decider.masks and per.stats.quant_error is not None
    assert (out(per) - ref).abs().mean() < 0.5 * (out(whole) - ref).abs().mean()  # the batch's scales are shared, not the verdicts


def test_forecast_verdicts_follow_each_samples_error_with_one_read_per_step(dit):
    tau = split_tau(dit, 12, order=2)
    a, d = run(dit, LABELS, config(tau, True, 2), 12)
    b, _ = run(dit, LABELS, config(tau, True, 2), 12)
    assert 0 < a.stats.host_syncs <= 12 - int(np.ceil(0.2 * 12))
    assert torch.equal(a.output.images, b.output.images) and a.stats.flops_skipped == b.stats.flops_skipped  # state resets
    assert d.masks and all(m.shape == (len(LABELS),) and m.any() and not m.all() for m in d.masks.values())
    for e, m in d.masks.items():  # no interval bound forces a sample here: each reuses where its own error is within τ
        assert (m == (d.sample_errors[e] <= d.tau[e])).all()
    whole, _ = run(dit, LABELS, config(tau, False, 2), 12)
    assert not torch.equal(whole.output.images, a.output.images) and whole.stats.flops_skipped != a.stats.flops_skipped


def test_flux_cfg_branches_replay_the_split(flux):
    tau = split_tau(flux, 6)
    _, d = run(flux, LABELS, config(tau, True), 6)
    assert d.masks and (d.replays == 1).all()  # the uncond forward replays each step's split


@pytest.mark.parametrize("change, words", [
    ({"verify_probe": "last"}, "verify_probe = 'first'"),
    ({"granularity": "attention"}, "granularity = 'block'"),
    ({"decider": "plan"}, "decider = 'verify'"),
])
def test_bad_combinations_are_one_line_errors(change, words):
    with pytest.raises(DqarError) as e:
        replace(config(0.03, True), **change)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_other_executors_refuse_it(dit):
    with pytest.raises(DqarError, match="'patch' executor, not 'compiled'"):
        generate(dit, [0], RunConfig(reuse=config(0.03, True), sample=SampleConfig(steps=4)), executor="compiled")


@pytest.mark.parametrize("int8", [False, True])
def test_a_row_cache_forecasts_each_row_from_its_own_entries(int8):
    """Rows on lines y = (b + 1)·x: row 0 stores at 0, 1, 2; row 1 at 0, 1 only; at 3 each extrapolates its own line."""
    from dqar.engine.cache import StorePolicy
    from dqar.engine.row_cache import RowCache

    cache = RowCache(1, (StorePolicy(int8=int8, mode="token"),), False, 1)
    slope = torch.tensor([1.0, 2.0]).view(2, 1, 1)  # (B, 1, 1)
    for x in (0.0, 1.0):
        cache.at(x)
        cache.put(0, slope * x * torch.ones(2, 3, 4))
    cache.at(2.0)
    cache.put_rows(0, slope * 2.0 * torch.ones(2, 3, 4), np.array([True, False]))
    cache.at(3.0)
    got = cache.read(0)  # row 0: through (2, 2), (1, 1) → 3; row 1: through (1, 2), (0, 0) → 6
    assert torch.allclose(got[0], torch.full((3, 4), 3.0), atol=0.05) and torch.allclose(got[1], torch.full((3, 4), 6.0), atol=0.1)
    assert cache.entries_now == 2 and cache.bytes_now > 0
