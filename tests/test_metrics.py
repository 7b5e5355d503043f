"""Metrics on known inputs: PSNR, SSIM, max error, Fréchet distance, classifier-based helpers."""
import math

import numpy as np
import pytest
import torch
from scipy import linalg, ndimage

from dqar import metrics
from dqar.errors import DqarError


def _rand_images(n=4, c=1, h=28, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g)  # (N, C, H, W) in [0, 1]


def _random_psd(d, seed, rank=None):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d)


# ---------- PSNR ----------

def test_psnr_of_known_mse():
    a = torch.zeros(3, 1, 16, 16)
    b = torch.full_like(a, 0.1)  # MSE = 0.01 → 20 dB
    assert metrics.psnr(a, b) == pytest.approx(20.0, abs=1e-5)
    assert torch.allclose(metrics.psnr_per_sample(a, b), torch.full((3,), 20.0, dtype=torch.float64), atol=1e-5)


def test_psnr_data_range():
    a = torch.zeros(2, 1, 8, 8)
    b = torch.full_like(a, 0.2)  # MSE 0.04; range 2 → 10·log10(4 / 0.04) = 20 dB
    assert metrics.psnr(a, b, data_range=2.0) == pytest.approx(20.0, abs=1e-5)


def test_psnr_identical_is_inf_raw_and_capped_in_mean():
    x = _rand_images()
    assert torch.isinf(metrics.psnr_per_sample(x, x)).all()
    assert metrics.psnr(x, x) == metrics.PSNR_CAP_DB
    assert math.isinf(metrics.psnr(x, x, cap=None))
    y = x.clone()
    y[0] += 0.1  # one differing pair: mean of (20 dB, cap, cap, cap)
    assert metrics.psnr(y, x) == pytest.approx((20.0 + 3 * metrics.PSNR_CAP_DB) / 4, abs=1e-6)


def test_paired_metrics_reject_shape_mismatch():
    with pytest.raises(DqarError):
        metrics.psnr(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))
    with pytest.raises(DqarError):
        metrics.ssim(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8))  # smaller than the window


def test_max_abs_error():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[1, 0, 2, 3] = -0.25
    assert metrics.max_abs_error(a, b) == pytest.approx(0.25)
    assert metrics.max_abs_error(a, a) == 0.0


# ---------- SSIM ----------

def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Independent SSIM: scipy Gaussian filtering (radius 5), borders cropped, population statistics."""
    filt = lambda z: ndimage.gaussian_filter(z, sigma=1.5, truncate=5 / 1.5)  # noqa: E731
    c1, c2 = 0.01**2, 0.03**2
    mx, my = filt(a), filt(b)
    vx, vy, cxy = filt(a * a) - mx * mx, filt(b * b) - my * my, filt(a * b) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].mean())


def test_ssim_identical_is_one():
    x = _rand_images(c=3)
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_ssim_decreases_with_noise():
    x = _rand_images(n=2, seed=1) * 0.5 + 0.25
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(x.shape, generator=g)
    values = [metrics.ssim(x, (x + s * noise).clamp(0, 1)) for s in (0.0, 0.02, 0.05, 0.1, 0.3)]
    assert values[0] == pytest.approx(1.0)
    assert all(v1 > v2 for v1, v2 in zip(values, values[1:]))


def test_ssim_matches_independent_reference_and_is_symmetric():
    a, b = _rand_images(n=2, seed=3), _rand_images(n=2, seed=4)
    b = 0.7 * a + 0.3 * b
    ours = metrics.ssim_per_sample(a, b)
    ref = [_ssim_reference(a[i, 0].double().numpy(), b[i, 0].double().numpy()) for i in range(2)]
    assert ours.numpy() == pytest.approx(ref, abs=1e-10)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)


# ---------- Fréchet distance ----------

def test_fd_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fd_commuting_covariances_closed_form():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))  # shared eigenbasis → commuting covariances
    a, b = rng.uniform(0.0, 2, 12), rng.uniform(0.0, 2, 12)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu = rng.standard_normal(12)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2) + 4.0 * 12
    assert metrics.frechet_distance(mu, s1, mu + 2.0, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_of_identical_statistics_is_zero():
    s = _random_psd(64, seed=2)
    mu = np.arange(64.0)
    assert metrics.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)


def test_fd_matches_scipy_sqrtm_on_well_conditioned_case():
    s1, s2 = _random_psd(20, seed=3) + np.eye(20), _random_psd(20, seed=4) + np.eye(20)
    mu1, mu2 = np.zeros(20), np.ones(20) * 0.5
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = 20 * 0.25 + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_never_complex_for_near_singular_covariances():
    for seed in range(5):
        s1, s2 = _random_psd(128, seed, rank=5), _random_psd(128, seed + 10, rank=3)
        s2[0, 0] -= 1e-12  # a tiny negative eigenvalue from round-off
        value = metrics.frechet_distance(np.zeros(128), s1, np.zeros(128), s2)
        assert isinstance(value, float) and math.isfinite(value) and value >= 0.0
        back = metrics.frechet_distance(np.zeros(128), s2, np.zeros(128), s1)
        assert value == pytest.approx(back, rel=1e-6, abs=1e-9)
    z = np.zeros((8, 8))
    assert metrics.frechet_distance(np.zeros(8), z, np.zeros(8), z) == 0.0


def test_fd_rejects_mismatched_shapes():
    with pytest.raises(DqarError):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------- classifier-based helpers ----------

class _MeanClassifier(torch.nn.Module):
    """Features: per-image mean and max of the classifier-space input; class 1 iff the mean is > 0."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def features(self, x):  # (N, 1, H, W) in [-1, 1] → (N, 2)
        return torch.stack([x.flatten(1).mean(1), x.flatten(1).amax(1)], 1) * self.w

    def forward(self, x):  # (N, 2) logits
        m = self.features(x)[:, 0]
        return torch.stack([-m, m], 1)


def test_classifier_features_map_unit_range_to_classifier_range():
    clf = _MeanClassifier()
    images = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])  # (2, 1, 4, 4) in [0, 1]
    feats = metrics.classifier_features(images, clf, batch_size=1)
    assert feats.dtype == torch.float64 and feats.shape == (2, 2)
    assert feats[:, 0].tolist() == [-1.0, 1.0]


def test_class_accuracy():
    clf = _MeanClassifier()
    images = torch.stack([torch.full((1, 4, 4), v) for v in (0.1, 0.9, 0.8, 0.2)])
    assert metrics.class_accuracy(images, torch.tensor([0, 1, 1, 0]), clf) == 1.0
    assert metrics.class_accuracy(images, [0, 1, 0, 0], clf) == 0.75
    with pytest.raises(DqarError):
        metrics.class_accuracy(images, [0, 1], clf)


def test_fd_to_reference_and_between():
    clf = _MeanClassifier()
    x = _rand_images(n=64, h=8, w=8, seed=5)
    mu, sigma = metrics.feature_stats(metrics.classifier_features(x, clf))
    assert metrics.fd_to_reference(x, clf, {"mu": mu, "sigma": sigma}) == pytest.approx(0.0, abs=1e-10)
    assert metrics.fd_between(x, x, clf) == pytest.approx(0.0, abs=1e-10)
    assert metrics.fd_between(x, (x * 0.5), clf) > 0.1
    with pytest.raises(DqarError):
        metrics.feature_stats(np.zeros((1, 2)))
