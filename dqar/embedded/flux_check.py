"""Quality check of the embedded Flux: sample every class with Flux's default sampling, score with the embedded classifier.

Usage: python -m dqar.embedded.flux_check [--per-class 100] [--steps 28] [--cfg 4] [--batch 100] [--grid out.png]
       [--folder DIR] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from dqar.errors import DqarError
from dqar.io import atomic_write_json
from dqar.metrics import class_accuracy, fd_to_reference
from dqar.embedded import NUM_CLASSES, load_classifier, load_reference_stats
from dqar.embedded.flux import DEFAULT_CFG, DEFAULT_STEPS, load_embedded_flux, make_flux_scheduler, sample_embedded_flux


def check_flux_samples(per_class: int = 100, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, seed: int = 0,
                       folder=None, batch: int = 100, progress: bool = False) -> dict:
    """Class accuracy and FD to the test split of `per_class` samples of each class (sample i seeded seed + i)."""
    if per_class < 1 or batch < 1:
        raise DqarError(f"--per-class {per_class} / --batch {batch} must be >= 1", "pass positive counts")
    transformer, prompts, sched = load_embedded_flux(folder=folder)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)  # (N,)
    start, chunks = time.perf_counter(), []
    for i in range(0, len(labels), batch):
        chunks.append(sample_embedded_flux(transformer, prompts, labels[i:i + batch], steps=steps, cfg=cfg,
                                           seed=seed + i, scheduler=make_flux_scheduler(sched)))
        if progress:
            print(f"sampled {i + len(chunks[-1])}/{len(labels)} in {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    images = torch.cat(chunks)  # (N, 1, 28, 28) in [0, 1]
    classifier = load_classifier()
    with torch.no_grad():
        per = (classifier(images * 2 - 1).argmax(1) == labels).view(NUM_CLASSES, per_class).float().mean(1)
    return {
        "samples": len(labels), "steps": steps, "cfg": cfg, "seed": seed, "threads": torch.get_num_threads(),
        "class_accuracy": round(class_accuracy(images, labels, classifier), 4),
        "per_class_accuracy": [round(float(a), 3) for a in per],
        "fd_to_test_split": round(fd_to_reference(images, classifier, load_reference_stats()), 3),
        "sampling_seconds": round(seconds, 1), "images": images, "labels": labels,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqar.embedded.flux_check", description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100, help="samples per sampling call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--folder", default=None, help="weights folder, e.g. a training run's --out (default: the shipped one)")
    p.add_argument("--grid", default=None, help="write a PNG grid, one column per class")
    p.add_argument("--out", default=None, help="also write the result as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        with torch.no_grad():
            result = check_flux_samples(args.per_class, args.steps, args.cfg, args.seed, args.folder, args.batch,
                                        progress=True)
    except DqarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.grid:
        from dqar.images import save_grid, to_uint8

        images = result["images"]  # class-major
        by_column = images.view(NUM_CLASSES, args.per_class, *images.shape[1:]).transpose(0, 1).reshape(images.shape)
        save_grid(to_uint8(by_column), args.grid, cols=NUM_CLASSES, scale=2)
    summary = {k: v for k, v in result.items() if k not in ("images", "labels")}
    if args.out:
        atomic_write_json(args.out, summary)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
