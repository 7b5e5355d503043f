"""FID of a sample file against reference statistics.

Samples: an `.npz` whose `arr_0` is uint8 (N, H, W, C) — what `dqar fid-sample` and ADM's sampling
scripts write. It is read in batches straight from the zip member, so 50,000 ImageNet samples never
sit in memory at once.

Feature extractors:
- Inception-v3 pool3 (2048-d) from the TorchScript file `inception-2015-12-05.pt` that StyleGAN2-ADA
  and clean-fid use (a port of the TensorFlow graph ADM's evaluator runs). It is called as
  `model(uint8 (N, 3, H, W), return_features=True)` and resizes to 299×299 itself. Loading TorchScript
  runs code from the file: pass only a file you trust.
- the embedded Fashion-MNIST classifier (penultimate, 128-d) against the shipped statistics of the
  real test split, for samples of the embedded model (28×28, one channel). Works offline.

References: an `.npz` with `mu` (D,) and `sigma` (D, D) — ADM's reference batches
(`VIRTUAL_imagenet256_labeled.npz`) hold both.
"""
from __future__ import annotations

import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dqar.errors import DqarError

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FIX = (f"download {INCEPTION_URL} on a connected machine, copy it here "
                 "and pass --inception /path/to/inception-2015-12-05.pt")


@dataclass(frozen=True)
class FidResult:
    """One score and what it was computed from."""

    fid: float
    features: str  # "inception-v3-pool3" | "embedded-classifier"
    num_samples: int
    image_shape: tuple[int, int, int]  # (H, W, C) of the samples
    samples: str
    reference: str
    seconds: float
    class_accuracy: float | None = None  # embedded only, when the file holds `labels`

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SampleFile:
    """The `arr_0` member of an `.npz`: its shape, read lazily in batches."""

    path: Path
    shape: tuple[int, ...]  # (N, H, W, C)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive (B, H, W, C) uint8 batches in index order."""
        row = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as fh:
            _read_header(fh, self.path)
            for start in range(0, self.shape[0], batch_size):
                n = min(batch_size, self.shape[0] - start)
                data = fh.read(n * row)
                if len(data) != n * row:
                    raise DqarError(f"{self.path} is truncated", "regenerate or re-copy the sample file")
                yield np.frombuffer(data, dtype=np.uint8).reshape(n, *self.shape[1:])


def _read_header(fh, path: Path) -> tuple:
    """Parse the .npy header of `arr_0`; returns (shape, fortran_order, dtype)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        header = fmt.read_array_header_1_0(fh) if version == (1, 0) else fmt.read_array_header_2_0(fh)
    except ValueError as exc:
        raise DqarError(f"arr_0 in {path} is not a valid array ({exc})", "write samples with dqar fid-sample") from None
    return header


def open_samples(path) -> SampleFile:
    """Validate an `.npz` of samples: `arr_0` uint8 (N, H, W, C), C in {1, 3}, N >= 2."""
    path = Path(path)
    if not path.is_file():
        raise DqarError(f"samples file '{path}' does not exist", "generate it with `dqar fid-sample --out FILE.npz`")
    try:
        with zipfile.ZipFile(path) as zf:
            if "arr_0.npy" not in zf.namelist():
                raise DqarError(f"{path} has no arr_0", "pass an .npz whose arr_0 holds uint8 (N, H, W, C) images")
            with zf.open("arr_0.npy") as fh:
                shape, fortran, dtype = _read_header(fh, path)
    except zipfile.BadZipFile:
        raise DqarError(f"{path} is not an .npz file", "pass the .npz written by dqar fid-sample") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
        raise DqarError(f"arr_0 in {path} is {dtype} {shape}, not uint8 (N, H, W, C) with C = 1 or 3",
                        "write samples with dqar fid-sample")
    if shape[0] < 2:
        raise DqarError(f"{path} holds {shape[0]} sample(s)", "FID needs at least 2 samples (50,000 for the standard protocol)")
    return SampleFile(path, tuple(int(s) for s in shape))


def read_labels(path, n: int) -> np.ndarray | None:
    """The `labels` member (N,) when present and of the right length, else None; pickled objects are refused."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "labels" not in z.files:
                return None
            labels = z["labels"]
    except ValueError as exc:  # an object array: loading it would unpickle
        raise DqarError(f"labels in {path} cannot be read ({exc})", "store labels as an integer array (N,)") from None
    if labels.dtype.kind not in "iu":
        raise DqarError(f"labels in {path} are {labels.dtype}, not integers", "store labels as an integer array (N,)")
    return labels.astype(np.int64) if labels.shape == (n,) else None


def load_reference(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) float64 from an `.npz` holding `mu` and `sigma`."""
    path = Path(path)
    if not path.is_file():
        raise DqarError(f"reference file '{path}' does not exist",
                        "pass an .npz with mu and sigma, e.g. ADM's VIRTUAL_imagenet256_labeled.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise DqarError(f"{path} has no mu/sigma (keys: {', '.join(z.files)})",
                                "pass reference statistics: an .npz with mu (D,) and sigma (D, D)")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:  # ValueError: an object array (a pickle) or a bad member
        why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DqarError(f"cannot read {path} ({why})", "pass an .npz with mu and sigma as float arrays") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise DqarError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together", "pass mu (D,) and sigma (D, D)")
    return mu, sigma


def load_inception(path, device) -> torch.jit.ScriptModule:
    """The TorchScript Inception-v3 at `path` (executes code from that file), eval mode on `device`."""
    if path is None:
        raise DqarError("FID needs Inception-v3 weights, which are not shipped", INCEPTION_FIX)
    path = Path(path).expanduser()
    if not path.is_file():
        raise DqarError(f"Inception file '{path}' does not exist", INCEPTION_FIX)
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:  # not a TorchScript archive, or saved by an incompatible torch
        raise DqarError(f"cannot load {path} as TorchScript ({type(exc).__name__})", INCEPTION_FIX) from None


@torch.no_grad()
def inception_features(samples: SampleFile, model, device, batch_size: int = 100, expect_dim: int | None = None) -> np.ndarray:
    """Pool3 features (N, D = 2048) float64 of every sample; grey images are repeated to 3 channels.

    `expect_dim`: the reference's D, checked on the first batch so a mismatch fails before the long run.
    """
    feats = []
    for batch in samples.batches(batch_size):
        x = torch.from_numpy(batch.copy()).to(device).permute(0, 3, 1, 2)  # (B, C, H, W) uint8
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)  # (B, 3, H, W)
        f = model(x, return_features=True).double().cpu().reshape(len(batch), -1).numpy()  # (B, D)
        if expect_dim is not None and not feats and f.shape[1] != expect_dim:
            raise DqarError(f"the reference holds {expect_dim}-d statistics, the feature extractor gives {f.shape[1]}-d",
                            "pass Inception pool3 reference statistics (ADM's reference batch), "
                            "or use --embedded for embedded-model samples")
        feats.append(f)
    return np.concatenate(feats)  # (N, D)


def fid_inception(samples_path, ref_path, inception_path, *, device="cpu", batch_size: int = 100) -> FidResult:
    """FID of the samples' Inception pool3 features against `mu`/`sigma` in `ref_path`."""
    from dqar.metrics import feature_stats, frechet_distance

    _check_batch(batch_size)
    start = time.perf_counter()
    samples = open_samples(samples_path)
    mu_ref, sigma_ref = load_reference(ref_path)
    model = load_inception(inception_path, device)
    mu, sigma = feature_stats(inception_features(samples, model, device, batch_size, expect_dim=mu_ref.size))
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    return FidResult(fid, "inception-v3-pool3", samples.shape[0], samples.shape[1:], str(samples_path), str(ref_path),
                     time.perf_counter() - start)


def fid_embedded(samples_path, ref_path=None, *, device="cpu", batch_size: int = 500, folder=None) -> FidResult:
    """Fréchet distance of the embedded classifier's features against the shipped (or given) statistics."""
    from dqar.embedded import load_classifier, load_reference_stats
    from dqar.metrics import class_accuracy, fd_to_reference

    _check_batch(batch_size)
    start = time.perf_counter()
    samples = open_samples(samples_path)
    if samples.shape[1:] != (28, 28, 1):
        raise DqarError(f"{samples_path} holds {samples.shape[1:]} images; the embedded classifier reads 28×28×1",
                        "use --embedded only for samples of the embedded model; score others with --ref and --inception")
    if ref_path is None:
        stats, reference = load_reference_stats(folder), "embedded:fashion-mnist-test"
    else:
        mu, sigma = load_reference(ref_path)
        stats, reference = {"mu": mu, "sigma": sigma}, str(ref_path)
    images = torch.from_numpy(np.concatenate(list(samples.batches(4096)))).permute(0, 3, 1, 2).float() / 255  # (N, 1, 28, 28)
    classifier = load_classifier(device, folder)
    fid = fd_to_reference(images, classifier, stats, batch_size)
    labels = read_labels(samples_path, samples.shape[0])
    accuracy = class_accuracy(images, labels, classifier, batch_size) if labels is not None else None
    return FidResult(fid, "embedded-classifier", samples.shape[0], samples.shape[1:], str(samples_path), reference,
                     time.perf_counter() - start, accuracy)


def _check_batch(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
        raise DqarError(f"--batch-size = {batch_size!r} is invalid", "use an integer >= 1")
