"""The embedded model: a small class-conditional pixel-space DiT trained on Fashion-MNIST, its classifier
and reference feature statistics. Everything loads offline (safetensors / json / npz, never pickle).

See docs/EMBEDDED.md for how the shipped files were made.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dqar.errors import DqarError
from dqar.embedded.classifier import STATS_FILE, load_stats
from dqar.embedded.classifier import load_classifier as _load_classifier_from
from dqar.embedded.data import CLASS_NAMES, NUM_CLASSES

EMBEDDED_DIR = Path(__file__).resolve().parent / "weights"
NULL_CLASS_ID = NUM_CLASSES  # = num_embeds_ada_norm, as DiTPipeline uses it for the unconditional branch
TRAIN_COMMAND = "python -m dqar.embedded.train --out {out} --steps 6587 --batch-size 256 --seed 0 --device auto"
CLASSIFIER_COMMAND = "python -m dqar.embedded.classifier --out {out} --epochs 3 --seed 0 --threads 1"

__all__ = [
    "CLASS_NAMES", "EMBEDDED_DIR", "NULL_CLASS_ID", "load_classifier", "load_embedded_scheduler_config",
    "load_embedded_transformer", "load_reference_stats",
]


def _folder(folder) -> Path:
    return EMBEDDED_DIR if folder is None else Path(folder)


def _require(path: Path, what: str, command: str) -> None:
    if not path.is_file():
        raise DqarError(f"{what} not found at {path}", f"train it with `{command}`")


def load_embedded_transformer(device="cpu", dtype=torch.float32, folder=None):
    """The embedded `DiTTransformer2DModel` (28×28×1, patch 4, 10 classes + null id 10), eval mode."""
    root = _folder(folder)
    sub = root / "transformer"
    _require(sub / "config.json", "embedded DiT", TRAIN_COMMAND.format(out=root))
    _require(sub / "diffusion_pytorch_model.safetensors", "embedded DiT weights", TRAIN_COMMAND.format(out=root))
    from diffusers import DiTTransformer2DModel

    try:
        model = DiTTransformer2DModel.from_pretrained(  # low_cpu_mem_usage=False: no "install accelerate" advice
            str(sub), local_files_only=True, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except (OSError, ValueError) as exc:
        raise DqarError(f"cannot load the embedded DiT from {sub} ({exc})",
                        f"retrain it with `{TRAIN_COMMAND.format(out=root)}`") from None
    return model.to(device).eval().requires_grad_(False)


def load_embedded_scheduler_config(folder=None) -> dict:
    """The DDIM scheduler config (training betas, clip_sample=False); use `DDIMScheduler.from_config`."""
    root = _folder(folder)
    path = root / "scheduler" / "scheduler_config.json"
    _require(path, "embedded scheduler config", TRAIN_COMMAND.format(out=root))
    return json.loads(path.read_text())


def load_classifier(device="cpu", folder=None):
    """The Fashion-MNIST CNN (inputs in [-1, 1]; `features`, logits), eval mode."""
    root = _folder(folder)
    _require(root / "classifier.safetensors", "embedded classifier", CLASSIFIER_COMMAND.format(out=root))
    return _load_classifier_from(root, device=device)


def load_reference_stats(folder=None) -> dict:
    """Classifier-feature statistics of the real Fashion-MNIST test split: {'mu', 'sigma', 'n'}."""
    root = _folder(folder)
    _require(root / STATS_FILE, "reference statistics", CLASSIFIER_COMMAND.format(out=root))
    return load_stats(root / STATS_FILE)
