"""Sanity check of the embedded DiT: sample every class, score with the embedded classifier.

Usage: python -m dqar.embedded.check [--per-class 10] [--steps 50] [--cfg 4] [--grid out.png] [--folder DIR]
       [--device cpu|cuda] [--random-weights]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dqar.errors import DqarError
from dqar.metrics import class_accuracy, fd_to_reference
from dqar.embedded import EMBEDDED_DIR, NUM_CLASSES, load_classifier, load_embedded_scheduler_config, load_embedded_transformer
from dqar.embedded import load_reference_stats
from dqar.embedded.classifier import STATS_FILE, WEIGHTS_FILE


def random_weights_like(transformer, seed: int = 0):
    """The same architecture with diffusers' default random initialisation (seeded): the no-training reference."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel.from_config(transformer.config)
    return model.to(transformer.device).eval().requires_grad_(False)


def scorer_folder(folder):
    """Where the judge (classifier + reference statistics) comes from: `folder` when it holds both, else the shipped one.

    A training run writes only the DiT, so a freshly trained folder is scored by the shipped classifier.
    """
    if folder is not None and (Path(folder) / WEIGHTS_FILE).is_file() and (Path(folder) / STATS_FILE).is_file():
        return Path(folder)
    return EMBEDDED_DIR


def check_samples(per_class: int = 10, steps: int = 50, cfg: float = 4.0, seed: int = 0, folder=None,
                  device: str = "cpu", random_weights: bool = False) -> dict:
    """DDIM samples of every class (clip_sample=False as shipped); returns accuracy, FD and the images.

    `random_weights`: sample the same architecture with random weights instead (the FD to beat).
    """
    from dqar.device import resolve_device
    from dqar.sampling import make_scheduler, sample

    transformer = load_embedded_transformer(device=resolve_device(device), folder=folder)
    if random_weights:
        transformer = random_weights_like(transformer, seed)
    scheduler = make_scheduler("ddim", load_embedded_scheduler_config(folder=folder))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)  # (N,)
    start = time.perf_counter()
    out = sample(transformer, labels, scheduler=scheduler, steps=steps, cfg=cfg, seed=seed)
    seconds = time.perf_counter() - start
    judge = scorer_folder(folder)
    classifier = load_classifier(folder=judge)
    images = out.images.float().cpu()  # (N, 1, 28, 28) in [0, 1]
    return {
        "samples": len(labels),
        "steps": steps,
        "cfg": cfg,
        "seed": seed,
        "device": str(transformer.device),
        "weights": "random" if random_weights else "trained",
        "class_accuracy": round(class_accuracy(images, labels, classifier), 4),
        "fd_to_test_split": round(fd_to_reference(images, classifier, load_reference_stats(folder=judge)), 3),
        "scored_by": str(judge),
        "sampling_seconds": round(seconds, 1),
        "images": images,
        "labels": labels,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqar.embedded.check", description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--random-weights", action="store_true", help="sample the architecture with random weights (reference FD)")
    p.add_argument("--folder", default=None, help="DiT weights folder, e.g. a training run's --out (default: the shipped one); "
                   "scored by its own classifier when it has one, else by the shipped classifier")
    p.add_argument("--grid", default=None, help="write a PNG grid, one column per class")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        result = check_samples(args.per_class, args.steps, args.cfg, args.seed, args.folder, args.device,
                               args.random_weights)
    except DqarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.grid:
        from dqar.images import save_grid, to_uint8

        images = result["images"]  # (10 * per_class, 1, 28, 28), class-major
        by_column = images.view(NUM_CLASSES, args.per_class, *images.shape[1:]).transpose(0, 1).reshape(images.shape)
        save_grid(to_uint8(by_column), args.grid, cols=NUM_CLASSES, scale=2)  # one column per class
    print(json.dumps({k: v for k, v in result.items() if k not in ("images", "labels")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
