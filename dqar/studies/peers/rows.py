"""A peer's row in `dqar ablate`: the peer applied to its own copy of the model, counted, then timed like a configuration."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from dqar.engine.config import RunConfig
from dqar.errors import first_line
from dqar.generate import generate
from dqar.studies.peers import methods as P
from dqar.studies.core import Reference, other_seeds


class PeerNotRun(Exception):
    """A peer row that cannot run here; the message is the one-line reason the report gives."""


@dataclass
class PeerRow:
    """A peer applied to its own deep copy of the transformer, with its untimed counted generations."""

    attached: Any  # dqar.studies.peers.methods.Attached
    loaded: Any  # the loaded model with the copy as its transformer
    run: RunConfig  # no dqar reuse, the entry's sampling settings
    labels: list
    counted: Any = None  # the counted generation with the peer (its images are the row's)
    summary: dict = field(default_factory=dict)

    def generate(self):
        """One generation with the peer, its state reset first."""
        with self.attached.generation():
            return generate(self.loaded, self.labels, self.run)


def model_copy(loaded):
    """`loaded` with a deep copy of its transformer (a peer's hooks never touch the shared model)."""
    return replace(loaded, transformer=copy.deepcopy(loaded.transformer))


def attach_peer(peer: Any, model, labels, run: RunConfig) -> PeerRow:
    """Apply `peer` to `model`'s transformer (a copy); a peer that calibrates (MagCache) does so on other seeds."""
    calib_run = other_seeds(run)
    attached = P.attach(peer, model.transformer, run.sample.steps, calibrate=lambda: generate(model, labels, calib_run))
    return PeerRow(attached, model, run, list(labels))


def start_peer(entry, loaded, labels, ref: Reference) -> PeerRow:
    """`entry`: an ablation grid entry (its `peer` and `run`). Copy the transformer, count a baseline generation on the copy, apply the peer, count one generation with it."""
    reason = P.unavailable(entry.peer)
    if reason:
        raise PeerNotRun(reason)
    model = model_copy(loaded)
    blocks = P.layers(model.transformer)
    with P.count_calls(blocks) as base_counts:
        base_gen = generate(model, labels, entry.run)
    calib_run = other_seeds(entry.run)
    try:
        row = attach_peer(entry.peer, model, labels, entry.run)
        attached = row.attached
        with P.count_calls(blocks) as counts:
            row.counted = row.generate()
    except Exception as exc:  # foreign library code on a model it may not support: report, do not abort the study
        raise PeerNotRun(f"{type(exc).__name__} while applying or running it: {first_line(exc)}") from None
    settings = P.to_dict(entry.peer)
    row.summary = {
        "method": settings.pop("method"),
        "title": entry.peer.title,
        "settings": settings,
        "package": attached.package,
        "implementation": attached.implementation,
        "counts": dict(counts),
        "baseline_counts": dict(base_counts),
        "computed": P.computed_fractions(counts, base_counts),
        "copy_identical": bool(torch.equal(base_gen.output.images, ref.images)),
        "calibration_seeds": [calib_run.sample.seed, calib_run.sample.seed + len(labels) - 1] if attached.info.get("calibrated") else None,
        "info": attached.info,
    }
    return row
