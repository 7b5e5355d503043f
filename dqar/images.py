"""Saving samples: one PNG per sample, grids, and baseline-vs-config comparison strips."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dqar.io import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) floats in [0, 1] → (N, H, W, C) uint8, the layout of ADM's `.npz` files."""
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)  # (N, C, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(arr: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 → PIL image (grey for one channel)."""
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def grid(arr: np.ndarray, cols: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile (N, H, W, C) uint8 images into one picture, white padding."""
    n, h, w, c = arr.shape
    cols = cols or min(n, math.ceil(math.sqrt(n)) if n > 8 else n)
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = arr[i]
    img = _pil(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(arr: np.ndarray, path: Path, cols: int | None = None, scale: int = 1) -> None:
    """Write `grid(arr, cols, scale=scale)` as a PNG (atomically)."""
    atomic_write_bytes(Path(path), _png(grid(arr, cols=cols, scale=scale)))


def save_samples(images: torch.Tensor, labels: Sequence[int], out_dir: Path, scale: int = 1) -> list[Path]:
    """Write `sample_{i:03d}_class{c}.png` and `grid.png` into `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    arr = to_uint8(images)
    paths = []
    for i, (img, c) in enumerate(zip(arr, labels)):
        path = out_dir / f"sample_{i:03d}_class{int(c)}.png"
        atomic_write_bytes(path, _png(_pil(img)))
        paths.append(path)
    save_grid(arr, out_dir / "grid.png", scale=scale)
    return paths


def comparison(rows: dict[str, torch.Tensor], path: Path, scale: int = 2) -> None:
    """One row per configuration (first row the baseline), labelled on the left, written as PNG."""
    from PIL import ImageDraw

    names = list(rows)
    strips = [grid(to_uint8(rows[n]), cols=rows[n].shape[0], scale=scale) for n in names]
    label_w = 8 + 7 * max(len(n) for n in names)
    width = label_w + max(s.width for s in strips)
    height = sum(s.height for s in strips)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for name, strip in zip(names, strips):
        canvas.paste(strip.convert("RGB"), (label_w, y))
        draw.text((4, y + strip.height // 2 - 5), name, fill="black")
        y += strip.height
    atomic_write_bytes(Path(path), _png(canvas))
