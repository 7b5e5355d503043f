"""Property-based tests (hypothesis): plans over random valid ReuseConfigs; metrics over shapes, dtypes and ranges."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dqar import metrics
from dqar.engine.config import SCHEDULES, ReuseConfig
from dqar.engine.plan import Plan, build_plan, cooldown_count, max_run_staleness

pytestmark = pytest.mark.usefixtures("single_thread")
fractions = st.floats(0.0, 1.0, allow_nan=False)


# ----- plans -----------------------------------------------------------------------------------------
@st.composite
def plan_cases(draw):
    """(ReuseConfig, evaluations, layers) over every schedule and knob, valid by construction."""
    e, l = draw(st.integers(1, 40)), draw(st.integers(1, 12))
    schedule = draw(st.sampled_from(SCHEDULES))
    custom = tuple(draw(st.lists(st.integers(0, l - 1), min_size=1, max_size=l))) if schedule == "custom" else ()
    cfg = ReuseConfig(
        enabled=draw(st.booleans()), schedule=schedule, custom_layers=custom,
        warmup_frac=draw(fractions), cooldown_frac=draw(fractions), layer_frac=draw(fractions),
        refresh_interval=draw(st.integers(1, 8)), max_staleness=draw(st.integers(0, 8)),
        exp_rate=draw(st.floats(1e-3, 50.0)), step_stages=draw(st.integers(1, 8)),
        refresh_interval_end=draw(st.sampled_from([0, 1, 3, 6])), bound_patterns=draw(st.booleans()),
        max_patterns=draw(st.integers(1, 20)),
    )
    return cfg, e, l


@settings(max_examples=300, deadline=None)
@given(plan_cases())
def test_plan_invariants_hold_for_any_valid_config(case):
    cfg, e, l = case
    mask = build_plan(cfg, e, l).mask
    assert mask.shape == (e, l) and mask.dtype == np.bool_
    assert not mask[0].any()  # nothing is cached before the first evaluation
    assert max_run_staleness(mask) <= min(max(cfg.refresh_interval, cfg.refresh_interval_end) - 1, cfg.max_staleness)
    if cfg.bound_patterns:
        assert build_plan(cfg, e, l).num_patterns <= cfg.max_patterns
        assert not (mask & ~build_plan(replace(cfg, bound_patterns=False), e, l).mask).any()  # only computes more
    assert not mask[: math.ceil(cfg.warmup_frac * e)].any()  # warmup window
    assert not mask[e - cooldown_count(cfg.cooldown_frac, e):].any()  # cooldown window
    if not cfg.enabled:
        assert not mask.any()
    elif cfg.schedule == "custom":
        assert set(np.nonzero(mask.any(axis=0))[0]) <= set(cfg.custom_layers)
    else:
        assert not mask[:, round(cfg.layer_frac * l):].any()  # at most layer_frac of the layers, shallow first
    assert np.array_equal(build_plan(cfg, e, l).mask, mask)  # a pure function of its inputs


keys = st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=12), st.integers(-10**6, 10**6), st.booleans()), max_size=4)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 30), st.integers(1, 12), st.integers(0, 2**32 - 1), keys)
def test_plan_json_round_trip_is_exact(e, l, seed, key):
    mask = np.random.default_rng(seed).random((e, l)) < 0.5
    plan = Plan(mask=mask, key=key)
    back = Plan.from_json(plan.to_json())
    assert back.mask.shape == mask.shape and np.array_equal(back.mask, mask)
    assert back.key == key


# ----- paired image metrics ----------------------------------------------------------------------------
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def image_pairs(draw, min_side=1):
    """Two (N, C, H, W) batches in [0, 1] of one shape and dtype: random, constant, or nearly equal."""
    n, c = draw(st.integers(1, 3)), draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(min_side, min_side + 9)), draw(st.integers(min_side, min_side + 9))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    a = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["random", "constant", "nearby", "extremes"]))
    if kind == "random":
        b = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    elif kind == "constant":
        a, b = torch.full_like(a, draw(fractions)), torch.full_like(a, draw(fractions))
    elif kind == "nearby":
        b = (a + draw(st.sampled_from([1e-7, 1e-4, 1e-2])) * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    else:  # black vs white pixels
        a, b = (a > 0.5).double(), (torch.rand(a.shape, generator=g, dtype=torch.float64) > 0.5).double()
    return a.to(dtype), b.to(dtype)


@settings(max_examples=120, deadline=None)
@given(image_pairs())
def test_psnr_is_symmetric_nonnegative_and_capped_on_identical(pair):
    a, b = pair
    ab, ba = metrics.psnr_per_sample(a, b), metrics.psnr_per_sample(b, a)
    assert torch.equal(ab, ba)
    assert bool((ab >= 0).all())  # MSE <= 1 for images in [0, 1]
    assert metrics.psnr(a, b) == metrics.psnr(b, a) <= metrics.PSNR_CAP_DB
    assert bool(torch.isinf(metrics.psnr_per_sample(a, a)).all())
    assert metrics.psnr(a, a) == metrics.PSNR_CAP_DB and math.isinf(metrics.psnr(a, a, cap=None))


@settings(max_examples=80, deadline=None)
@given(image_pairs(min_side=metrics.SSIM_WINDOW))
def test_ssim_is_bounded_symmetric_and_one_on_identical(pair):
    a, b = pair
    s = metrics.ssim_per_sample(a, b)
    assert bool(torch.isfinite(s).all())
    assert bool(((s >= -1 - 1e-9) & (s <= 1 + 1e-9)).all()), s
    assert torch.allclose(s, metrics.ssim_per_sample(b, a), rtol=0, atol=1e-12)
    assert torch.allclose(metrics.ssim_per_sample(a, a), torch.ones_like(s), rtol=0, atol=1e-12)


# ----- Fréchet distance -----------------------------------------------------------------------------
@st.composite
def gaussians(draw, d):
    """(mu (d,), sigma (d, d)): random PSD, of any rank (near-singular included), any scale, with round-off."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 1e3, 1e6]))
    rank = draw(st.integers(0, d))
    a = rng.standard_normal((d, rank))
    sigma = scale * (a @ a.T) / max(rank, 1)
    sigma = sigma + draw(st.sampled_from([0.0, 1e-12, -1e-12])) * scale * np.eye(d)  # jitter either way
    return rng.standard_normal(d) * math.sqrt(scale), sigma


@st.composite
def two_gaussians(draw):
    d = draw(st.integers(1, 24))
    return draw(gaussians(d)), draw(gaussians(d))


@settings(max_examples=120, deadline=None)
@given(two_gaussians())
def test_frechet_distance_is_real_finite_nonnegative(stats):
    (mu1, s1), (mu2, s2) = stats
    fd = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(fd, float) and math.isfinite(fd) and fd >= 0.0
    size = 1.0 + np.trace(np.abs(s1)) + np.trace(np.abs(s2)) + float((mu1 - mu2) @ (mu1 - mu2))
    assert abs(fd - metrics.frechet_distance(mu2, s2, mu1, s1)) <= 1e-6 * size


@settings(max_examples=120, deadline=None)
@given(st.integers(1, 24).flatmap(gaussians))
def test_frechet_distance_of_a_gaussian_to_itself_is_zero(stats):
    mu, sigma = stats
    fd = metrics.frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= fd <= 1e-6 * (1.0 + np.trace(np.abs(sigma)))


@pytest.mark.parametrize("steps", [28, 50])
def test_full_dqar_computes_its_last_evaluation(steps):
    """full_dqar's 2% cooldown is the nearest whole evaluation: one at 50 steps and at 28 (floor gave none at 28)."""
    from dqar.engine.config import preset

    mask = build_plan(preset("full_dqar"), steps, 4).mask
    assert cooldown_count(0.02, steps) == 1
    assert not mask[-1].any() and mask[-2].any()
