"""What `dqar ablate` writes: the environment, the study block, one record per configuration, and resume checks."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

from dqar.errors import DqarError
from dqar.studies import grid as G
from dqar.studies import memory
from dqar.studies.core import SEED_OFFSET, Evaluator
from dqar.studies.timing import bracketed_method

# Names of the seed report's eight ImageNet classes (dqar.labels.IMAGENET_SHOWCASE).
IMAGENET_SHOWCASE_NAMES = {207: "golden retriever", 360: "otter", 387: "elephant", 974: "cliff",
                           88: "macaw", 417: "balloon", 279: "arctic fox", 928: "ice cream"}
FIDELITY_METHOD = (
    "paired against the baseline's images at the same sampling setting (same seeds): PSNR (mean over images, "
    "each capped at 100 dB), SSIM (Gaussian 11/1.5), max absolute pixel difference; images in [0, 1]"
)
CALIBRATION_METHOD = (
    "configurations with calibrate.* settings get a plan from dqar.tuning.calibrate.calibrate before timing (untimed), "
    f"on the same labels with seeds offset by {SEED_OFFSET} (other noise than the evaluated samples)"
)
PEER_METHOD = (
    "each peer runs through its own package on a fresh deep copy of the transformer (the shared model is never "
    "touched), with the same labels, seeds, sampler and timing as every configuration; untimed first: one baseline "
    "generation on the copy and one generation with the peer, both with forward hooks counting the block, attn1 and "
    "ff forwards that really ran (computed calls = peer count / baseline count); the peer's state is reset before "
    "every generation; MagCache's ratios come from its calibration mode, run once on the same labels with seeds "
    f"offset by {SEED_OFFSET}"
)


def now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def class_names(loaded, labels: Sequence[int]) -> dict[int, str]:
    names = loaded.class_names
    if names is not None:
        return {int(c): names[c] for c in sorted(set(labels))}
    return {int(c): IMAGENET_SHOWCASE_NAMES[c] for c in sorted(set(labels)) if c in IMAGENET_SHOWCASE_NAMES}


@torch.no_grad()
def model_fingerprint(module: torch.nn.Module) -> str:
    """16 hex digits identifying the weights (names, shapes and float64 sums of every tensor)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{float(t.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def environment(loaded, device: torch.device, dtype: torch.dtype) -> dict:
    """Where the numbers were measured."""
    import diffusers

    from importlib.metadata import version

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "model": loaded.name,
        "model_fingerprint": model_fingerprint(loaded.transformer),
        "device": str(device),
        "device_name": name,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dqar": version("dqar"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def study_block(study: G.Study, labels, names, evaluator: Evaluator | None, device, entries: Sequence[G.Entry]) -> dict:
    """The results' "study" entry: what was planned and how it is measured."""
    return {
        "grid": study.source,
        "grid_hash": study.text_hash,
        "repeats": study.repeats,
        "samples_per_label": study.samples_per_label,
        "labels": labels,
        "class_names": {str(k): v for k, v in names.items()},
        "num_samples": len(labels),
        "seed": study.sample.seed,
        "seeds": [study.sample.seed, study.sample.seed + len(labels) - 1],
        "sample": dict(study.sample.__dict__),
        "timing_method": bracketed_method(study.repeats, device),
        "memory_method": memory.method(device),
        "fidelity_method": FIDELITY_METHOD,
        "classifier": evaluator.description if evaluator else None,
        "calibration_method": CALIBRATION_METHOD if any(e.calibration for e in entries) else None,
        "peer_method": PEER_METHOD if any(e.peer is not None for e in entries) else None,
        "planned": [e.name for e in entries],
    }


def check_resumable(old: dict, env: dict, labels: list[int], repeats: int, out: Path) -> None:
    """Refuse to mix measurements from another model, device, dtype, label set or repeat count."""
    have_env = old.get("environment", {})
    for key in ("model", "model_fingerprint", "device", "dtype", "torch", "diffusers"):
        if have_env.get(key) != env.get(key):
            raise DqarError(f"the results in {out} were measured with {key} = {have_env.get(key)!r}, this run has {env.get(key)!r}",
                            "resume with the same settings, or choose another --out")
    study = old.get("study", {})
    if study.get("labels") != labels or study.get("repeats") != repeats:
        raise DqarError(f"the results in {out} used other labels or repeats", "resume with the same grid, or choose another --out")


# ----- one configuration -----------------------------------------------------------------------------
def _reuse_dict(stats) -> dict | None:
    if stats is None:
        return None
    d = stats.to_dict()
    d["cache_mb_peak"] = d["cache_bytes_peak"] / 2**20
    return d


def make_record(entry: G.Entry, baseline: G.Entry, measurements: dict, stats, fid: dict, env: dict,
                peer: dict | None = None) -> dict:
    """One configuration's JSON record (`stats`: its reuse stats or None; `peer`: what a peer row applied and counted)."""
    return {
        "name": entry.name,
        "slug": entry.slug,
        "role": entry.role,
        "sweep": entry.sweep,
        "varied": dict(entry.varied),
        "config": entry.run.to_dict(),
        "config_hash": entry.config_hash,
        "calibration": dict(entry.calibration) or None,
        "baseline": baseline.name,
        "same_as": None,
        "measurements": measurements,
        "reuse": _reuse_dict(stats),
        "peer": peer,
        "fidelity": fid,
        "environment": env,
        "completed": now(),
    }


def copy_record(entry: G.Entry, baseline: G.Entry, source: dict) -> dict:
    """A record for a configuration identical to one already measured."""
    rec = dict(source)
    rec.update(name=entry.name, slug=entry.slug, role=entry.role, sweep=entry.sweep, varied=dict(entry.varied),
               baseline=baseline.name, same_as=source["name"] if source.get("same_as") is None else source["same_as"])
    return rec


def copy_images(src: Path, dst: Path) -> None:
    """The PNGs of an identical configuration, under this configuration's own folder."""
    from dqar.io import atomic_write_bytes

    for f in sorted(src.glob("*.png")):
        atomic_write_bytes(dst / f.name, f.read_bytes())
