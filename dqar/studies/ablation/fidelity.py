"""An ablation's fidelity numbers: on the timing batch for every configuration, on a larger untimed run where claims rest.

Timing batch: paired PSNR / SSIM / max-abs against the baseline's images of the same seeds, class
accuracy with its 95% Wilson interval; no Fréchet distance (too few images for a covariance).
Fidelity run (the main configurations and the finalists a recommendation or the target could rest on):
the timing labels again in `chunks` chunks, chunk j with every seed moved by j × len(labels) (chunk 0 is
the timing batch), on the configuration's timed executor; FD and ΔFD — with a paired bootstrap interval —
once the images outnumber the classifier's feature size by FD_SAMPLES_PER_FEATURE.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from dqar import metrics as M
from dqar.engine.config import RunConfig
from dqar.errors import DqarError
from dqar.studies.core import SEED_OFFSET, Evaluator, Reference, other_seeds, reference_from, score
from dqar.studies.measure.intervals import fd_delta_ci, wilson

FD_SAMPLES_PER_FEATURE = 1.5  # FD needs a well-conditioned feature covariance: N ≥ 1.5 × feature size


def fd_min_samples(evaluator: Evaluator | None) -> int | None:
    """Fewest images an FD is reported on (None without a classifier)."""
    if evaluator is None:
        return None
    return int(-(-FD_SAMPLES_PER_FEATURE * len(evaluator.stats["mu"]) // 1))


def method(evaluator: Evaluator | None, samples: int, chunks: int, cap: int | None = None) -> str:
    """How fidelity is measured, in words (`cap`: the grid's fidelity_runs)."""
    n = samples * chunks
    fd = fd_min_samples(evaluator)
    fd_text = ("" if evaluator is None else
               f"; FD and ΔFD (95% paired-bootstrap interval over images) only on at least {fd} images "
               f"({FD_SAMPLES_PER_FEATURE:g} × the classifier's {len(evaluator.stats['mu'])} features)")
    return (f"timing batch ({samples} images) for every configuration: paired PSNR, SSIM, max abs, class accuracy with its "
            f"95% Wilson interval; fidelity run ({n} images: the labels {chunks}× with seeds moved by {samples} per chunk, "
            f"untimed, on the configuration's executor; chunk 0 is the timing batch's warm-up) for {_which(cap)} besides "
            f"the baseline of each sampling setting{fd_text}")


def _which(cap: int | None) -> str:
    if cap is None:
        return "the main configurations and the finalists of the recommendation and the target"
    return (f"at most {cap} configuration{'s' * (cap != 1)} with reuse (the grid's fidelity_runs): the recommendation's "
            "front first, then the main configurations and the target's finalists")


def check_seeds(seed: int, samples: int, chunks: int) -> None:
    """The fidelity run must not reach the seeds calibration and probes use (seed + SEED_OFFSET on)."""
    if samples * chunks > SEED_OFFSET:
        raise DqarError(f"a fidelity run of {samples * chunks} images would reuse the calibration seeds (offset {SEED_OFFSET})",
                        f"use fidelity_samples_per_label with at most {SEED_OFFSET} images in all")


def fidelity(images: torch.Tensor, ref: Reference) -> dict:
    """Paired metrics and classifier metrics with intervals; FD left out on too few images.

    NumPy's BLAS runs one thread here: beside a busy torch thread its own pool mostly waits (100× slower eigh on 2 cores).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fidelity(images, ref)


def _fidelity(images: torch.Tensor, ref: Reference) -> dict:
    n, need = len(images), fd_min_samples(ref.evaluator)
    out = score(images, ref, fd=need is None or n >= need)  # FD left out on too few images
    out.update(samples=n, class_accuracy_ci=None, baseline_class_accuracy=ref.accuracy, fd_delta_ci=None)
    if out["class_accuracy"] is not None:
        out["class_accuracy_ci"] = wilson(round(out["class_accuracy"] * n), n)
    if need is not None and n >= need and torch.equal(images, ref.images):
        out["fd_delta_ci"] = [0.0, 0.0]  # the reference itself (a baseline's own run): every resample's ΔFD is 0
    elif need is not None and n >= need:
        ev = ref.evaluator
        own, base = (M.classifier_features(x, ev.classifier).numpy() for x in (images, ref.images))
        out["fd_delta_ci"] = fd_delta_ci(own, base, ev.stats)
    return out


def chunk(run: RunConfig, j: int, samples: int) -> RunConfig:
    """`run` for chunk j of a fidelity run: every seed moved by j × samples."""
    return other_seeds(run, j * samples)


def images_of(make: Callable[[RunConfig], object], run: RunConfig, chunks: int, samples: int,
              tick: Callable[[], None] = lambda: None, first: torch.Tensor | None = None) -> torch.Tensor:
    """The fidelity run's images: `make(run)` → Generation, once per chunk, concatenated; `first`: chunk 0's images
    where they are already made (the timing batch's warm-up on the same executor)."""
    out = [] if first is None else [first]
    for j in range(len(out), chunks):
        out.append(make(chunk(run, j, samples)).output.images)
        tick()
    return torch.cat(out)


def reference(images: torch.Tensor, labels: Sequence[int], evaluator: Evaluator | None) -> Reference:
    """The baseline's fidelity-run images as the reference of the fidelity runs at its sampling setting."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return reference_from(images, labels, evaluator)
