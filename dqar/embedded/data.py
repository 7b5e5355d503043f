"""Fashion-MNIST in its gzipped IDX files, read with numpy + gzip.

By default from Debian's `dataset-fashion-mnist` package; any folder with the same four files works
(`data_dir=`, `--data`), e.g. the slice the tests ship in tests/data/fashion-mnist.
"""
from __future__ import annotations

import functools
import gzip
from pathlib import Path

import numpy as np
import torch

from dqar.errors import DqarError

DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28
_FILES = {"train": "train", "test": "t10k"}


def _path(data_dir: Path, split: str, kind: str) -> Path:
    stem = _FILES[split]
    name = f"{stem}-images-idx3-ubyte.gz" if kind == "images" else f"{stem}-labels-idx1-ubyte.gz"
    return data_dir / name


def _missing(path: Path) -> DqarError:
    return DqarError(
        f"Fashion-MNIST not found at {path}",
        "install it with `apt-get install dataset-fashion-mnist` or pass --data DIR",
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Parse one gzipped IDX file (big-endian header, uint8 payload); read-only, cached per process."""
    if not path.is_file():
        raise _missing(path)
    return _read_idx_cached(path.resolve(), path.stat().st_mtime_ns, magic, ndim)


@functools.lru_cache(maxsize=4)
def _read_idx_cached(path: Path, mtime_ns: int, magic: int, ndim: int) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    head = np.frombuffer(raw[: 4 * (ndim + 1)], dtype=">u4")
    if int(head[0]) != magic:
        raise DqarError(f"{path} is not an IDX file (magic {int(head[0]):#x})", "reinstall dataset-fashion-mnist")
    shape = tuple(int(d) for d in head[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (ndim + 1))
    if data.size != int(np.prod(shape)):
        raise DqarError(f"{path} is truncated", "reinstall dataset-fashion-mnist")
    return data.reshape(shape)


def load_split(split: str = "train", data_dir: str | Path | None = None, limit: int | None = None):
    """Return (images, labels): float32 (N, 1, 28, 28) in [-1, 1] and int64 (N,)."""
    if split not in _FILES:
        raise DqarError(f"unknown split '{split}'", "use 'train' or 'test'")
    root = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not root.is_dir():
        raise _missing(root)
    images = _read_idx(_path(root, split, "images"), 0x803, 3)  # (N, 28, 28) uint8
    labels = _read_idx(_path(root, split, "labels"), 0x801, 1)  # (N,) uint8
    if len(images) != len(labels):
        raise DqarError(f"{root}: {split} images and labels differ in count", "reinstall dataset-fashion-mnist")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32)).div_(127.5).sub_(1.0).unsqueeze(1)  # (N, 1, 28, 28)
    y = torch.from_numpy(labels.astype(np.int64))  # (N,)
    return x, y


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map model-space images in [-1, 1] to [0, 1] (clamped)."""
    return ((x + 1.0) * 0.5).clamp_(0.0, 1.0)
