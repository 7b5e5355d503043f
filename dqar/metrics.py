"""Offline image-quality metrics: paired (PSNR, SSIM, max error), Fréchet distance on classifier features, Pareto fronts.

Images are torch tensors in [0, 1], shape (N, C, H, W). Paired metrics compare sample i of `a`
with sample i of `b` and average over samples.

PSNR of identical images is +inf. `psnr_per_sample` returns the raw values (inf included);
`psnr` averages per-sample values after capping each at `PSNR_CAP_DB` (100 dB, an MSE of 1e-10),
so reports and JSON always hold a finite number; pass `cap=None` to get the raw mean (inf if any
pair is identical).

The Fréchet distance is computed with symmetric PSD square roots (eigh, tiny negative eigenvalues
clipped to zero), so it is always a real number ≥ 0, even for singular covariances.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from dqar.errors import DqarError

PSNR_CAP_DB = 100.0  # finite stand-in for +inf (identical images) in means and reports
SSIM_WINDOW = 11  # Gaussian window size (Wang et al. 2004)
SSIM_SIGMA = 1.5  # Gaussian window standard deviation
SSIM_K1, SSIM_K2 = 0.01, 0.03  # stabilising constants


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 4 or a.shape != b.shape:
        raise DqarError(
            f"paired metrics need two (N, C, H, W) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}",
            "pass images generated from the same seeds and settings",
        )


def mse_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, float64 (N,)."""
    _check_pair(a, b)
    return (a.double() - b.double()).pow(2).flatten(1).mean(1)


def psnr_per_sample(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB per sample (N,), float64; +inf where a pair is identical."""
    mse = mse_per_sample(a, b)  # (N,)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 → +inf


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, cap: float | None = PSNR_CAP_DB) -> float:
    """Mean per-sample PSNR in dB, each value capped at `cap` (None: no cap, may be inf)."""
    values = psnr_per_sample(a, b, data_range)
    if cap is not None:
        values = values.clamp(max=cap)
    return float(values.mean())


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    """Normalised separable Gaussian, float64 (size,)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Depthwise 'valid' Gaussian filtering of (N, C, H, W) → (N, C, H-k+1, W-k+1)."""
    c, k = x.shape[1], g.numel()
    x = torch.nn.functional.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return torch.nn.functional.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim_per_sample(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM per sample (N,), float64: Gaussian window 11, σ 1.5, K1 0.01, K2 0.03, 'valid' borders."""
    _check_pair(a, b)
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise DqarError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW}", "use PSNR for smaller images")
    x, y = a.double(), b.double()
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA).to(x.device)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = _filter(x, g), _filter(y, g)  # (N, C, H', W')
    vx = _filter(x * x, g) - mx * mx
    vy = _filter(y * y, g) - my * my
    cxy = _filter(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))  # (N, C, H', W')
    return s.flatten(1).mean(1)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM over samples."""
    return float(ssim_per_sample(a, b, data_range).mean())


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute pixel difference over the whole batch."""
    _check_pair(a, b)
    return float((a.double() - b.double()).abs().max())


@torch.no_grad()
def _classifier_apply(fn, images: torch.Tensor, classifier, batch_size: int) -> torch.Tensor:
    if images.dim() != 4:
        raise DqarError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}", "pass a 4-D image batch")
    p = next(classifier.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(p.device, p.dtype) * 2.0 - 1.0  # [0, 1] → classifier's [-1, 1]
        out.append(fn(x).double().cpu())
    return torch.cat(out)


def classifier_features(images: torch.Tensor, classifier, batch_size: int = 500) -> torch.Tensor:
    """Penultimate classifier features of images in [0, 1], float64 (N, D)."""
    return _classifier_apply(classifier.features, images, classifier, batch_size)


def class_accuracy(images: torch.Tensor, labels, classifier, batch_size: int = 500) -> float:
    """Fraction of images the classifier assigns to `labels` (N,)."""
    logits = _classifier_apply(classifier, images, classifier, batch_size)  # (N, K)
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if len(labels) != len(logits):
        raise DqarError(f"{len(logits)} images but {len(labels)} labels", "pass one label per image")
    return float((logits.argmax(1) == labels).double().mean())


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and sample covariance (D, D), float64, of features (N, D); needs N ≥ 2."""
    f = np.asarray(features.numpy() if torch.is_tensor(features) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise DqarError(f"feature statistics need at least 2 samples, got shape {f.shape}", "generate more images")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh; negative eigenvalues (round-off) clipped to 0."""
    m = 0.5 * (m + m.T)
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||μ1-μ2||² + tr Σ1 + tr Σ2 - 2 tr((Σ1^½ Σ2 Σ1^½)^½), real and ≥ 0 for any PSD inputs."""
    mu1, mu2 = (np.asarray(m, dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise DqarError(
            f"Fréchet distance shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}",
            "compute both statistics with the same feature extractor",
        )
    r1 = _psd_sqrt(s1)
    inner = r1 @ (0.5 * (s2 + s2.T)) @ r1  # symmetric PSD
    w = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0) if math.isfinite(fd) else fd


def fd_to_reference(images: torch.Tensor, classifier, stats: dict, batch_size: int = 500) -> float:
    """Fréchet distance between classifier features of images in [0, 1] and reference `stats` (mu, sigma)."""
    mu, sigma = feature_stats(classifier_features(images, classifier, batch_size))
    return frechet_distance(mu, sigma, stats["mu"], stats["sigma"])


def fd_between(a: torch.Tensor, b: torch.Tensor, classifier, batch_size: int = 500) -> float:
    """Fréchet distance between the classifier features of two image sets in [0, 1] (e.g. baseline vs reuse)."""
    mu1, s1 = feature_stats(classifier_features(a, classifier, batch_size))
    mu2, s2 = feature_stats(classifier_features(b, classifier, batch_size))
    return frechet_distance(mu1, s1, mu2, s2)


def pareto_front(points) -> list[int]:
    """Indices of the points (x, y) not dominated when both x and y are better higher, sorted by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])
