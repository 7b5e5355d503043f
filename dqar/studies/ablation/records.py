"""What `dqar ablate` writes: the environment, the study block, one record per configuration, and resume checks."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Sequence

import torch

from dqar.errors import DqarError
from dqar.reporting.findings import is_baseline
from dqar.studies.ablation import grid as G
from dqar.studies.measure import memory
from dqar.studies.measure import intervals as I
from dqar.studies.core import SEED_OFFSET, Evaluator
from dqar.studies.measure.timing import Run, median, relative_range, seconds, walls

# Names of the seed report's eight ImageNet classes (dqar.labels.IMAGENET_SHOWCASE).
IMAGENET_SHOWCASE_NAMES = {207: "golden retriever", 360: "otter", 387: "elephant", 974: "cliff",
                           88: "macaw", 417: "balloon", 279: "arctic fox", 928: "ice cream"}
FIDELITY_METHOD = (
    "paired against the baseline's images at the same sampling setting (same seeds, the baseline on its timed executor): "
    "PSNR (mean over images, each capped at 100 dB), SSIM (Gaussian 11/1.5), max absolute pixel difference; images in [0, 1]"
)
STATISTICS_METHOD = (
    f"{I.METHOD}; the FLOP ceiling of a configuration is 1 / (1 − its share of FLOPs skipped); a speedup whose "
    "interval's lower end lies above the ceiling by more than the measured noise (the relative range of its "
    "baseline's repeats) is flagged implausible and never named fastest, best or recommended; claims that pick or "
    "rank configurations ('faster', 'fastest', 'recommended', 'not distinguishable') compare simultaneous intervals "
    "(Bonferroni over the study's k speedups: each at 1 − 0.05 / k) and need them apart by more than the measured noise "
    "too (A faster than B: A's lower end > B's upper end × (1 + noise); faster than the baseline: lower end > 1 + noise)"
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
        "family": getattr(loaded, "family", "dit"),  # "dit" (DDIM / DPM-Solver++) or a flow model ("flux", "sd3": flow matching)
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


def study_block(study: G.Study, labels, names, evaluator: Evaluator | None, device, entries: Sequence[G.Entry],
                methods: dict) -> dict:
    """The results' "study" entry: what was planned and how it is measured (`methods`: the timing and fidelity texts)."""
    return {
        "grid": study.source,
        "grid_hash": study.text_hash,
        "configurations": len(entries),
        "distinct_configurations": len({e.config_hash for e in entries}),
        "fidelity_runs": study.fidelity_runs,  # the grid's cap on fidelity runs (None: main configurations + finalists)
        "repeats": study.repeats,
        "samples_per_label": study.samples_per_label,
        "labels": labels,
        "class_names": {str(k): v for k, v in names.items()},
        "num_samples": len(labels),
        "seed": study.sample.seed,
        "seeds": [study.sample.seed, study.sample.seed + len(labels) - 1],
        "sample": dict(study.sample.__dict__),
        **methods,
        "statistics_method": STATISTICS_METHOD,
        "memory_method": memory.method(device),
        "fidelity_method": FIDELITY_METHOD,
        "classifier": evaluator.description if evaluator else None,
        "calibration_method": CALIBRATION_METHOD if any(e.calibration for e in entries) else None,
        "peer_method": PEER_METHOD if any(e.peer is not None for e in entries) else None,
        "planned": [e.name for e in entries],
    }


def check_resumable(old: dict, env: dict, labels: list[int], repeats: int, out: Path, same: dict) -> None:
    """Refuse to mix measurements from another model, device, dtype, label set, repeat count or `same` study settings."""
    have_env = old.get("environment", {})
    for key in ("model", "model_fingerprint", "device", "dtype", "torch", "diffusers"):
        if have_env.get(key) != env.get(key):
            raise DqarError(f"the results in {out} were measured with {key} = {have_env.get(key)!r}, this run has {env.get(key)!r}",
                            "resume with the same settings, or choose another --out")
    study = old.get("study", {})
    if study.get("labels") != labels or study.get("repeats") != repeats:
        raise DqarError(f"the results in {out} used other labels or repeats", "resume with the same grid, or choose another --out")
    for key, value in same.items():
        if study.get(key) != value:
            raise DqarError(f"the results in {out} were measured with {key} = {study.get(key)!r}, this run has {value!r}",
                            "resume with the same settings, or choose another --out")


# ----- one configuration -----------------------------------------------------------------------------
def measurements(own: list[Run], base: list[Run], samples: int, *, executor: str, note: str | None, baseline_executor: str,
                 flops_skipped: float | None, eager_base: list[Run] | None = None, is_baseline: bool = False) -> dict:
    """Timings of one configuration and of the baseline timed in the same rounds, their ratio with its interval, the FLOP ceiling.

    `own`, `base`: the runs of round 1, 2, ...; `eager_base`: the eager baseline's, for an eagerly run configuration.
    """
    t, b = seconds(own), seconds(base)
    med, base_med = median(t), median(b)
    ci = [1.0, 1.0] if is_baseline else I.ratio_ci(b, t)
    noise = relative_range(b)
    ceiling = 1.0 / (1.0 - flops_skipped) if flops_skipped is not None and flops_skipped < 1.0 else None
    peak, base_peak = _max_or_none(r.peak for r in own), _max_or_none(r.peak for r in base)
    out = {
        "executor": executor,
        "executor_note": note,
        "baseline_executor": baseline_executor,
        "repeats": len(t),
        "times_s": t,
        "wall_times_s": walls(own),
        "baseline_times_s": b,
        "baseline_wall_times_s": walls(base),
        "median_s": med,
        "baseline_median_s": base_med,
        "time_per_sample_s": med / samples,
        "baseline_time_per_sample_s": base_med / samples,
        "speedup": 1.0 if is_baseline else base_med / med,
        "speedup_ci": ci,
        "wall_speedup": 1.0 if is_baseline else median(walls(base)) / median(walls(own)),
        "wall_speedup_ci": [1.0, 1.0] if is_baseline else I.ratio_ci(walls(base), walls(own)),
        "noise": noise,
        "flops_ceiling": ceiling,
        "implausible": bool(ceiling is not None and ci is not None and ci[0] > ceiling * (1.0 + (noise or 0.0))),
        "speedup_vs_eager": None,
        "speedup_vs_eager_ci": None,
        "peak_memory_bytes": peak,
        "baseline_peak_memory_bytes": base_peak,
        "memory_reduction": (1.0 - peak / base_peak) if peak and base_peak else None,
        "deterministic": all(r.kept for r in own),
    }
    if eager_base:
        eb = seconds(eager_base)
        out.update(speedup_vs_eager=median(eb) / med, speedup_vs_eager_ci=I.ratio_ci(eb, t))
    return out


def with_simultaneous(records: list[dict]) -> None:
    """Give every record's measurements its simultaneous interval: Bonferroni over the study's distinct speedups."""
    k = sum(1 for r in records if r.get("same_as") is None and not is_baseline(r))
    level = I.simultaneous_level(k)
    for r in records:
        m = r["measurements"]
        m["comparisons"] = k
        m["speedup_sim_ci"] = [1.0, 1.0] if is_baseline(r) else I.ratio_ci(m["baseline_times_s"], m["times_s"], level)


def _max_or_none(values) -> int | None:
    values = list(values)
    return None if not values or None in values else max(values)


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
