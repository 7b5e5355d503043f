"""The study core: the baseline every configuration is scored against, one scorer, one row shape, other seeds.

A study samples a fixed set of labels once without reuse (the reference) and once per
configuration, every run from the same initial noise (sample i: seed + i). `score` compares a
configuration's images with the reference's — paired PSNR, SSIM (on images of at least the SSIM
window), max absolute difference — and, with an evaluator, the classifier (class accuracy) and real
data (Fréchet distance on classifier features). Calibration and probe samples use seeds offset by
`SEED_OFFSET`, so no configuration is tuned on the noise it is evaluated on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dqar import metrics as M
from dqar.engine.config import RunConfig, preset
from dqar.engine.plan import Plan, save_plan
from dqar.generate import Generation, generate

EMBEDDED_MODELS = ("embedded", "embedded-flux")  # the shipped Fashion-MNIST models the embedded classifier scores
SEED_OFFSET = 1000  # calibration and probe samples use other noise than the evaluated ones
EMBEDDED_EVALUATOR = ("embedded Fashion-MNIST CNN: class accuracy and Fréchet distance of its penultimate features "
                      "to the real test split")


def other_seeds(run: RunConfig, offset: int = SEED_OFFSET) -> RunConfig:
    """`run` with its seeds moved by `offset` (calibration and probe samples)."""
    return replace(run, sample=replace(run.sample, seed=run.sample.seed + offset))


def baseline_run(run: RunConfig) -> RunConfig:
    """No reuse at `run`'s sampling settings."""
    return RunConfig(reuse=preset("baseline"), sample=run.sample)


# ----- the reference ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluator:
    """A classifier on the model's images and real-data feature statistics (class accuracy and FD)."""

    classifier: torch.nn.Module
    stats: dict  # {'mu', 'sigma'}: features of real data
    description: str


def embedded_classifier() -> Evaluator:
    """The embedded model's classifier and the statistics of the real test split."""
    from dqar.embedded import load_classifier, load_reference_stats

    return Evaluator(load_classifier(device="cpu"), load_reference_stats(), EMBEDDED_EVALUATOR)


def embedded_evaluator(loaded) -> Evaluator | None:
    """The embedded classifier for the embedded models (the DiT and the Flux: Fashion-MNIST); None for other models."""
    return embedded_classifier() if loaded.name in EMBEDDED_MODELS else None


@dataclass(frozen=True)
class Reference:
    """The baseline's images at one sampling setting, and its classifier metrics."""

    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: list[int]
    evaluator: Evaluator | None = None
    generation: Generation | None = None  # the generation that produced the images
    accuracy: float | None = None
    fd: float | None = None


def make_reference(loaded, labels: Sequence[int], run: RunConfig, evaluator: Evaluator | None) -> Reference:
    """Generate the baseline at `run`'s sampling settings and score it with the evaluator."""
    gen = generate(loaded, labels, baseline_run(run))
    return reference_of(gen, labels, evaluator)


def reference_of(gen: Generation, labels: Sequence[int], evaluator: Evaluator | None) -> Reference:
    return reference_from(gen.output.images, labels, evaluator, gen)


def reference_from(images: torch.Tensor, labels: Sequence[int], evaluator: Evaluator | None,
                   gen: Generation | None = None) -> Reference:
    """The reference of `images` (its generation, when there is one): its class accuracy and FD when there is an evaluator."""
    labels = list(labels)
    if evaluator is None:
        return Reference(images, labels, None, gen)
    return Reference(images, labels, evaluator, gen, M.class_accuracy(images, labels, evaluator.classifier),
                     M.fd_to_reference(images, evaluator.classifier, evaluator.stats))


# ----- scoring ---------------------------------------------------------------------------------
def score(images: torch.Tensor, ref: Reference, fd: bool = True) -> dict:
    """Paired metrics against the reference's images; classifier metrics when the reference has an evaluator
    (`fd = False`: FD left out, e.g. on too few images for it)."""
    out = {
        "psnr_db": M.psnr(images, ref.images),
        "ssim": M.ssim(images, ref.images) if min(images.shape[-2:]) >= M.SSIM_WINDOW else None,
        "max_abs": M.max_abs_error(images, ref.images),
        "class_accuracy": None, "accuracy_drop_points": None, "fd": None, "fd_delta": None,
    }
    out["identical"] = out["max_abs"] == 0.0
    ev = ref.evaluator
    if ev is not None:
        acc = M.class_accuracy(images, ref.labels, ev.classifier)
        out.update(class_accuracy=acc, accuracy_drop_points=100.0 * (ref.accuracy - acc))
        if fd:
            d = M.fd_to_reference(images, ev.classifier, ev.stats)
            out.update(fd=d, fd_delta=d - ref.fd)
    return out


PAIRED = ("psnr_db", "ssim", "max_abs", "identical")  # left empty where the baseline is not compared with itself
NO_REUSE = {"reuse": 0.0, "attention_skipped": 0.0, "flops_skipped": 0.0, "cfg_shared": 0, "host_syncs_per_evaluation": 0.0,
            "quant_error": None}


def reuse_values(stats) -> dict:
    """What a generation's reuse did, under the names study rows use (NO_REUSE without stats)."""
    if stats is None:
        return dict(NO_REUSE)
    return {"reuse": stats.reuse_fraction, "attention_skipped": stats.attention_skipped_fraction,
            "flops_skipped": stats.flops_skipped_fraction, "cfg_shared": stats.cfg_shared,
            "host_syncs_per_evaluation": stats.host_syncs / stats.evaluations, "quant_error": stats.quant_error}


def study_row(head: dict, columns: Sequence[str], stats, scores: dict, **tail) -> dict:
    """One row of a study table: `head`, then `columns` from the reuse values and the scores, then `tail`."""
    values = {**reuse_values(stats), **scores}
    return {**head, **{c: values[c] for c in columns}, **tail}


def baseline_row(head: dict, columns: Sequence[str], ref: Reference, *, self_paired: bool = True) -> dict:
    """The no-reuse row: nothing reused, scored against itself (`self_paired=False`: paired metrics left empty)."""
    scores = score(ref.images, ref)
    if not self_paired:
        scores.update(dict.fromkeys(PAIRED))
    return study_row(head, columns, None, scores)


# ----- a study ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    """One model and label set, the reference they are scored against, and a folder for the plans the study writes."""

    loaded: Any
    reference: Reference
    plan_dir: Path | None = None  # where `save_plan` writes (a study that saves none leaves it None)

    @property
    def labels(self) -> list[int]:
        return self.reference.labels

    def measure(self, run: RunConfig, **kwargs) -> tuple[Generation, dict]:
        """Generate the reference's labels under `run` (`kwargs`: what `generate` takes) and score the images."""
        gen = generate(self.loaded, self.labels, run, **kwargs)
        return gen, score(gen.output.images, self.reference)

    def save_plan(self, plan: Plan, name: str) -> str:
        """Write `plan` as `name`.json in the plan folder; returns its path (for `plan_file`)."""
        if self.plan_dir is None:
            raise ValueError("this study has no plan folder")
        path = self.plan_dir / f"{name}.json"
        save_plan(plan, path)
        return str(path)


# ----- trade-off frontiers ---------------------------------------------------------------------
def frontier(rows: Sequence[dict], x: str, y: str = "psnr_db") -> tuple[np.ndarray, np.ndarray]:
    """The rows' Pareto frontier in (x up, y up): x ascending, y descending."""
    pts = [(r[x], r[y]) for r in rows]
    front = M.pareto_front(pts)
    return np.array([pts[i][0] for i in front]), np.array([pts[i][1] for i in front])


def y_at(front: tuple[np.ndarray, np.ndarray], x: float) -> float:
    """The frontier's y at `x`, interpolated; below its least x, its best y; NaN beyond its largest x."""
    xs, ys = front
    if len(xs) == 0 or x > xs[-1] + 1e-9:
        return float("nan")
    return float(np.interp(x, xs, ys))


def x_at(front: tuple[np.ndarray, np.ndarray], y: float) -> float:
    """The frontier's x reaching `y`, interpolated; above its best y, its least x; NaN below its worst y."""
    xs, ys = front
    if len(xs) == 0 or y < ys[-1] - 1e-9:
        return float("nan")
    return float(np.interp(y, ys[::-1], xs[::-1]))
