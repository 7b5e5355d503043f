"""`dqar ablate`: run every configuration of a grid against a baseline timed in the same process.

Protocol (written into the report's methodology):
- every configuration draws the same labels and the same initial noise (sample i: seed + i);
- for each sampling setting, one untimed warm-up generation of the baseline runs first; its images
  are the reference of every paired fidelity metric at that setting;
- on GPU each configuration also runs once untimed first (kernel selection, compilation);
- each configuration is timed `repeats` times between two baseline runs (B C C C B); the trailing
  B is the next configuration's leading B, so the baseline is re-timed between every two
  configurations and drift of a shared machine is tracked; the speedup is median(bracketing
  baseline runs) / median(configuration runs);
- a configuration whose resolved config equals one already measured reuses that measurement;
- a peer (dqar.studies.peers) runs on a fresh deep copy of the transformer: untimed, one counted baseline
  generation on the copy, the peer applied (MagCache calibrated first, on seeds offset like calibrated
  plans), one counted generation with the peer (its images and counts are reported); then it is timed
  like any configuration, its state reset before every generation. A peer whose package is missing
  or that fails while being applied is reported as not run, with the reason.

Results are written atomically after every configuration (JSON and report; figures at the end); `resume`
skips configurations already complete (same name and config hash); Ctrl-C leaves a valid
partial report.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import os
import platform
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dqar.studies import grid as G
from dqar.studies import memory
from dqar.engine.config import RunConfig, preset
from dqar.errors import DqarError, first_line
from dqar.io import atomic_write_json
from dqar.reporting.documents import RESULTS_FILE, RESULTS_FORMAT, load_results
from dqar.reporting.plots import HEATMAP_FILE, PARETO_FILE

REPORT_FILE = "ABLATION_REPORT.md"
COMPARISON_FILE = "comparison.png"

TIMING_METHOD = (
    "one untimed warm-up generation of the baseline per sampling setting (its images are the fidelity reference); "
    "{each}per configuration, {repeats} timed generations between two timed baseline generations (B C×{repeats} B; "
    "the trailing B is the next configuration's leading B, so the baseline is re-timed between every two "
    "configurations); time = median of the configuration's runs; speedup = median(its two bracketing baseline "
    "runs) / median(its runs); a baseline entry is {repeats} timed baseline runs; clock: {clock}"
)
CLOCK_CUDA = "CUDA events around each generation, torch.cuda.synchronize before reading"
CLOCK_CPU = "time.perf_counter around each generation"

# Names of the seed report's eight ImageNet classes (dqar.labels.IMAGENET_SHOWCASE).
IMAGENET_SHOWCASE_NAMES = {207: "golden retriever", 360: "otter", 387: "elephant", 974: "cliff",
                           88: "macaw", 417: "balloon", 279: "arctic fox", 928: "ice cream"}


@dataclass(frozen=True)
class AblationOptions:
    """What `dqar ablate` runs and where it writes."""

    model: str | None = None  # None: the embedded model
    out: Path = Path("results/ablation")
    quick: bool = False  # the small shipped grid (quick.toml)
    resume: bool = False  # continue a study in `out`
    config: str | None = None  # a grid file replacing the shipped one
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    repeats: int | None = None  # tests only: override the grid's repeats (may be < 3)
    stop_after: int | None = None  # tests only: interrupt after this many configurations of this run
    steps: int | None = None  # override the grid's shared step count ([sample] steps)
    threads: int | None = None  # CPU intra-op threads while timing (default 1); ignored on GPU
    command: str | None = None  # the command line that started the study, recorded in the results


@dataclass(frozen=True)
class Evaluator:
    """A classifier on the model's images and real-data feature statistics (class accuracy and FD)."""

    classifier: torch.nn.Module
    stats: dict  # {'mu', 'sigma'}: features of real data
    description: str


@dataclass(frozen=True)
class Reference:
    """The baseline's images at one sampling setting, and its classifier metrics."""

    images: torch.Tensor
    generation: Any = None  # the warm-up generation that produced them
    accuracy: float | None = None
    fd: float | None = None


@dataclass(frozen=True)
class Outcome:
    """What a call of `run_ablation` did."""

    results: dict
    out: Path
    completed: int  # configurations complete in the results
    total: int
    ran: int  # configurations measured (or copied) in this call
    interrupted: bool
    seconds: float
    not_run: tuple = ()  # {"name", "method", "reason"} of peers that could not run


# ----- setup ---------------------------------------------------------------------------------
def embedded_evaluator(loaded) -> Evaluator | None:
    """The embedded model's classifier and reference statistics; None for other models."""
    if loaded.name != "embedded":
        return None
    from dqar.embedded import load_classifier, load_reference_stats

    return Evaluator(load_classifier(device="cpu"), load_reference_stats(),
                     "embedded Fashion-MNIST CNN: class accuracy and Fréchet distance of its penultimate features "
                     "to the real test split")


def study_labels(num_classes: int, samples_per_label: int) -> list[int]:
    """The default labels, the whole list repeated `samples_per_label` times."""
    from dqar.labels import default_labels

    return default_labels(num_classes) * samples_per_label


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


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def check_plans(entries: Sequence[G.Entry], num_layers: int) -> None:
    """Build every configuration's plan once, so a bad layer index fails before anything runs."""
    from dqar.engine.plan import build_plan

    for e in entries:
        if e.run.reuse.enabled:
            build_plan(e.run.reuse, e.run.sample.steps, num_layers)


# ----- results file ----------------------------------------------------------------------------
def _check_resumable(old: dict, env: dict, labels: list[int], repeats: int, out: Path) -> None:
    """Refuse to mix measurements from another model, device, dtype, label set or repeat count."""
    have_env = old.get("environment", {})
    for key in ("model", "model_fingerprint", "device", "dtype", "torch", "diffusers"):
        if have_env.get(key) != env.get(key):
            raise DqarError(f"the results in {out} were measured with {key} = {have_env.get(key)!r}, this run has {env.get(key)!r}",
                            "resume with the same settings, or choose another --out")
    study = old.get("study", {})
    if study.get("labels") != labels or study.get("repeats") != repeats:
        raise DqarError(f"the results in {out} used other labels or repeats", "resume with the same grid, or choose another --out")


# ----- calibrated plans ---------------------------------------------------------------------------
CALIBRATION_SEED_OFFSET = 1000  # calibration samples use other noise than the evaluated ones


def calibrated(entry: G.Entry, loaded, labels, out: Path) -> G.Entry:
    """`entry` with its plan calibrated (untimed, seeds offset) and saved under `out/plans/`."""
    from dqar.tuning.calibrate import calibrate
    from dqar.engine.plan import save_plan

    s = entry.run.sample
    cal = calibrate(loaded, labels, replace(entry.run, sample=replace(s, seed=s.seed + CALIBRATION_SEED_OFFSET)), **entry.calibration)
    path = (out / "plans" / f"{entry.slug}.json").resolve()
    save_plan(cal.plan, path)
    return replace(entry, run=replace(entry.run, reuse=replace(entry.run.reuse, plan_file=str(path))))


# ----- measurement -----------------------------------------------------------------------------
def _baseline_run(run: RunConfig) -> RunConfig:
    return RunConfig(reuse=preset(G.BASELINE), sample=run.sample)


def _timed(fn: Callable[[], Any], device) -> tuple[float, int | None, Any]:
    """(seconds, peak bytes, Generation) of one generation made by `fn`."""
    from dqar.studies.timing import time_once

    box = []
    memory.reset(device)
    seconds = time_once(lambda: box.append(fn()), device)
    return seconds, memory.read_peak(device), box[0]


def fidelity(images: torch.Tensor, ref: Reference, labels: Sequence[int], evaluator: Evaluator | None) -> dict:
    """Paired metrics against the baseline's images; classifier metrics when an evaluator exists."""
    from dqar import metrics as M

    out = {
        "psnr_db": M.psnr(images, ref.images),
        "ssim": M.ssim(images, ref.images) if min(images.shape[-2:]) >= M.SSIM_WINDOW else None,
        "max_abs": M.max_abs_error(images, ref.images),
        "class_accuracy": None, "accuracy_drop_points": None, "fd": None, "fd_delta": None,
    }
    out["identical"] = out["max_abs"] == 0.0
    if evaluator is not None:
        acc = M.class_accuracy(images, labels, evaluator.classifier)
        fd = M.fd_to_reference(images, evaluator.classifier, evaluator.stats)
        out.update(class_accuracy=acc, accuracy_drop_points=100.0 * (ref.accuracy - acc), fd=fd, fd_delta=fd - ref.fd)
    return out


def make_reference(loaded, labels, run: RunConfig, evaluator: Evaluator | None) -> Reference:
    """The untimed warm-up generation of the baseline at `run`'s sampling setting."""
    from dqar import metrics as M
    from dqar.generate import generate

    gen = generate(loaded, labels, _baseline_run(run))
    images = gen.output.images
    if evaluator is None:
        return Reference(images, gen)
    return Reference(images, gen, M.class_accuracy(images, labels, evaluator.classifier),
                     M.fd_to_reference(images, evaluator.classifier, evaluator.stats))


def warms_each(device: torch.device) -> bool:
    """Whether every configuration gets its own untimed warm-up run: on GPU (kernel selection, compilation).

    On CPU the study's first baseline generation warms the process; every later generation attaches a
    fresh reuse handle and takes the same path each time, so the first timed run is not special.
    """
    return device.type == "cuda"


def measure(loaded, labels, entry: G.Entry, repeats: int, device, tick: Callable[[], None] = lambda: None,
            warm=None, lead: tuple | None = None, make: Callable[[], Any] | None = None) -> tuple[dict, tuple]:
    """Timings bracketed by baseline runs, peak memory, images and reuse stats of one configuration.

    Order: [warm-up on GPU] B C×repeats B — the leading B is `lead` (seconds, peak) when the previous
    timed run was a baseline at this sampling setting, and the trailing B is returned to become the
    next configuration's lead. A baseline entry is `repeats` timed baseline runs. The images and stats
    come from `warm` (the baseline's reference run), else the GPU warm-up run, else the first timed run.
    `make` makes one generation of the configuration (a peer's); default: `generate` with `entry.run`.
    Returns (measured, trailing baseline (seconds, peak)).
    """
    from dqar.generate import generate

    base = _baseline_run(entry.run)
    make = make or (lambda: generate(loaded, labels, entry.run))
    timed_base = lambda: _timed(lambda: generate(loaded, labels, base), device)  # noqa: E731
    if warm is None and warms_each(device):
        warm = make()
        lead = None  # no longer the previous timed run
        tick()
    runs = []  # (kind, seconds, peak, generation)
    if not entry.is_baseline:
        runs.append(("base", *lead, None) if lead is not None else ("base", *timed_base()))
        tick()
    for _ in range(repeats):
        runs.append(("self", *_timed(make, device)))
        tick()
    if not entry.is_baseline:
        runs.append(("base", *timed_base()))
        tick()
    own = [r for r in runs if r[0] == "self"]
    other = [r for r in runs if r[0] == "base"] or own
    first = warm if warm is not None else own[0][3]
    n = len(labels)
    peak, base_peak = _max_or_none(r[2] for r in own), _max_or_none(r[2] for r in other)
    med, base_med = statistics.median(r[1] for r in own), statistics.median(r[1] for r in other)
    measured = {
        "images": first.output.images,
        "stats": first.stats,
        "measurements": {
            "times_s": [r[1] for r in own],
            "baseline_times_s": [r[1] for r in other],
            "median_s": med,
            "baseline_median_s": base_med,
            "time_per_sample_s": med / n,
            "baseline_time_per_sample_s": base_med / n,
            "speedup": 1.0 if entry.is_baseline else base_med / med,
            "peak_memory_bytes": peak,
            "baseline_peak_memory_bytes": base_peak,
            "memory_reduction": (1.0 - peak / base_peak) if peak and base_peak else None,
            "deterministic": all(torch.equal(r[3].output.images, first.output.images) for r in own),
        },
    }
    return measured, runs[-1][1:3]


def _max_or_none(values) -> int | None:
    values = list(values)
    return None if not values or None in values else max(values)


def _reuse_dict(stats) -> dict | None:
    if stats is None:
        return None
    d = stats.to_dict()
    d["cache_mb_peak"] = d["cache_bytes_peak"] / 2**20
    return d


def make_record(entry: G.Entry, baseline: G.Entry, measured: dict, fid: dict, env: dict, peer: dict | None = None) -> dict:
    """One configuration's JSON record (`peer`: what a peer row applied and counted)."""
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
        "measurements": measured["measurements"],
        "reuse": _reuse_dict(measured["stats"]),
        "peer": peer,
        "fidelity": fid,
        "environment": env,
        "completed": _now(),
    }


def _copy_record(entry: G.Entry, baseline: G.Entry, source: dict) -> dict:
    """A record for a configuration identical to one already measured."""
    rec = dict(source)
    rec.update(name=entry.name, slug=entry.slug, role=entry.role, sweep=entry.sweep, varied=dict(entry.varied),
               baseline=baseline.name, same_as=source["name"] if source.get("same_as") is None else source["same_as"])
    return rec


def _copy_images(src: Path, dst: Path) -> None:
    """The PNGs of an identical configuration, under this configuration's own folder."""
    from dqar.io import atomic_write_bytes

    for f in sorted(src.glob("*.png")):
        atomic_write_bytes(dst / f.name, f.read_bytes())


# ----- peers ---------------------------------------------------------------------------------------
class PeerNotRun(Exception):
    """A peer row that cannot run here; the message is the one-line reason the report gives."""


@dataclass
class PeerRow:
    """A peer applied to its own deep copy of the transformer, with its untimed counted generations."""

    attached: Any  # dqar.studies.peers.Attached
    loaded: Any  # the loaded model with the copy as its transformer
    run: RunConfig  # no dqar reuse, the entry's sampling settings
    labels: list
    counted: Any = None  # the counted generation with the peer (its images are the row's)
    summary: dict = field(default_factory=dict)

    def generate(self):
        """One generation with the peer, its state reset first."""
        from dqar.generate import generate

        with self.attached.generation():
            return generate(self.loaded, self.labels, self.run)


def start_peer(entry: G.Entry, loaded, labels, ref: Reference) -> PeerRow:
    """Copy the transformer, count a baseline generation on the copy, apply the peer, count one generation with it."""
    from dqar.studies import peers as P
    from dqar.generate import generate

    reason = P.unavailable(entry.peer)
    if reason:
        raise PeerNotRun(reason)
    model = replace(loaded, transformer=copy.deepcopy(loaded.transformer))
    blocks = list(model.transformer.transformer_blocks)
    s = entry.run.sample
    with P.count_calls(blocks) as base_counts:
        base_gen = generate(model, labels, entry.run)
    calib_run = replace(entry.run, sample=replace(s, seed=s.seed + CALIBRATION_SEED_OFFSET))
    try:
        attached = P.attach(entry.peer, model.transformer, s.steps, calibrate=lambda: generate(model, labels, calib_run))
        row = PeerRow(attached, model, entry.run, list(labels))
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


# ----- the study -------------------------------------------------------------------------------
@dataclass
class _State:
    """Mutable bookkeeping of one `run_ablation` call."""

    results: dict
    not_run: dict = field(default_factory=dict)  # (name, hash) -> {"name", "method", "reason"}
    seconds_before: float = 0.0  # run time of earlier calls on this study (resume)
    t0: float = 0.0  # perf_counter at the start of this call
    done: dict = field(default_factory=dict)  # (name, hash) -> record
    by_hash: dict = field(default_factory=dict)  # hash -> record measured first
    refs: dict = field(default_factory=dict)  # SampleConfig -> Reference
    lead: tuple | None = None  # (SampleConfig, seconds, peak) of the last timed run, when it was a baseline


def _study_block(study: G.Study, labels, names, evaluator, device, entries) -> dict:
    clock = CLOCK_CUDA if device.type == "cuda" else CLOCK_CPU
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
        "timing_method": TIMING_METHOD.format(repeats=study.repeats, clock=clock, each=(
            "on GPU one more untimed warm-up generation per configuration (its images and statistics are reported); "
            if warms_each(device) else "on CPU no per-configuration warm-up (images and statistics from the first timed run); ")),
        "memory_method": memory.method(device),
        "fidelity_method": (
            "paired against the baseline's images at the same sampling setting (same seeds): PSNR (mean over images, "
            "each capped at 100 dB), SSIM (Gaussian 11/1.5), max absolute pixel difference; images in [0, 1]"
        ),
        "classifier": evaluator.description if evaluator else None,
        "calibration_method": (
            f"configurations with calibrate.* settings get a plan from dqar.tuning.calibrate.calibrate before timing (untimed), "
            f"on the same labels with seeds offset by {CALIBRATION_SEED_OFFSET} (other noise than the evaluated samples)"
        ) if any(e.calibration for e in entries) else None,
        "peer_method": (
            "each peer runs through its own package on a fresh deep copy of the transformer (the shared model is never "
            "touched), with the same labels, seeds, sampler and timing as every configuration; untimed first: one baseline "
            "generation on the copy and one generation with the peer, both with forward hooks counting the block, attn1 and "
            "ff forwards that really ran (computed calls = peer count / baseline count); the peer's state is reset before "
            "every generation; MagCache's ratios come from its calibration mode, run once on the same labels with seeds "
            f"offset by {CALIBRATION_SEED_OFFSET}"
        ) if any(e.peer is not None for e in entries) else None,
        "planned": [e.name for e in entries],
    }


def _write(out: Path, st: _State, entries: Sequence[G.Entry], status: str, figures: bool = False) -> None:
    """Figures (when asked: they take seconds), then the results JSON, then the report, each written atomically."""
    from dqar.reporting import plots
    from dqar.reporting import report
    from dqar.io import atomic_write_text

    records = [st.done[(e.name, e.config_hash)] for e in entries if (e.name, e.config_hash) in st.done]
    res = st.results
    res.update(status=status, updated=_now(), completed=len(records), total=len(entries), records=records,
               not_run=[st.not_run[k] for k in ((e.name, e.config_hash) for e in entries) if k in st.not_run],
               run_seconds=st.seconds_before + time.perf_counter() - st.t0)
    if figures:
        plots.write_all(res, out)
        _comparison(out, records)
    res["artifacts"] = {k: f for k, f in (("comparison", COMPARISON_FILE), ("pareto", PARETO_FILE), ("heatmap", HEATMAP_FILE))
                        if (out / f).is_file()}
    atomic_write_json(out / RESULTS_FILE, res)
    atomic_write_text(out / REPORT_FILE, report.render(res))


def _comparison(out: Path, records: list[dict]) -> None:
    """Baseline row vs each main configuration, from the saved sample PNGs."""
    import numpy as np
    from PIL import Image

    from dqar.images import comparison

    rows = {}
    for r in sorted((r for r in records if r["role"] == "main"), key=lambda r: r["config"]["reuse"]["enabled"]):
        files = sorted((out / "images" / r["slug"]).glob("sample_*.png"))
        if files:
            arr = np.stack([np.asarray(Image.open(f)) for f in files])  # (N, H, W) or (N, H, W, C)
            arr = arr[..., None] if arr.ndim == 3 else arr
            rows[r["name"]] = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    if len(rows) >= 2:
        comparison(rows, out / COMPARISON_FILE, scale=4 if next(iter(rows.values())).shape[-1] < 128 else 1)


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None):
    """On CPU, time with `threads` intra-op threads (default 1: stable timings, no oversubscription); restored after."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads or 1))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _resume_into(st: _State, old: dict, entries: Sequence[G.Entry]) -> None:
    """Take over the finished records of a previous run that match a planned (name, config hash)."""
    st.results["created"] = old.get("created", st.results["created"])
    wanted = {(e.name, e.config_hash) for e in entries}
    for rec in old["records"]:
        key = (rec["name"], rec["config_hash"])
        if key in wanted:
            st.done[key] = rec
            if rec.get("same_as") is None:
                st.by_hash.setdefault(rec["config_hash"], rec)


def _run_entry(entry: G.Entry, base: G.Entry, st: _State, ctx: dict, bars: "_Bars") -> dict:
    """Measure one configuration (or copy an identical one) and save its images; returns its record."""
    from dqar.images import save_samples

    out, loaded, labels, evaluator = ctx["out"], ctx["loaded"], ctx["labels"], ctx["evaluator"]
    if entry.config_hash in st.by_hash:
        source = st.by_hash[entry.config_hash]
        _copy_images(out / "images" / source["slug"], out / "images" / entry.slug)
        return _copy_record(entry, base, source)
    if entry.calibration:
        st.lead = None  # other work ran since the last baseline timing
        entry = calibrated(entry, loaded, labels, out)
    if entry.run.sample not in st.refs:
        st.lead = None
        st.refs[entry.run.sample] = make_reference(loaded, labels, entry.run, evaluator)
    ref = st.refs[entry.run.sample]
    peer = None
    if entry.peer is not None:
        st.lead = None  # untimed work runs first, and the copy must exist during both bracketing baselines
        peer = start_peer(entry, loaded, labels, ref)
    lead = st.lead[1:] if st.lead is not None and st.lead[0] == entry.run.sample else None
    bars.start(entry, lead is not None)
    try:
        measured, trail = measure(loaded, labels, entry, ctx["repeats"], ctx["device"], tick=bars.tick,
                                  warm=ref.generation if entry.is_baseline else peer.counted if peer else None, lead=lead,
                                  make=peer.generate if peer else None)
    finally:
        if peer is not None:
            peer.attached.detach()
    st.lead = (entry.run.sample, *trail) if peer is None else None
    fid = fidelity(measured["images"], ref, labels, evaluator)
    save_samples(measured["images"], labels, out / "images" / entry.slug, scale=1 if measured["images"].shape[-1] >= 128 else 4)
    rec = make_record(entry, base, measured, fid, ctx["env"], peer.summary if peer else None)
    st.by_hash[entry.config_hash] = rec
    return rec


def _setup(opts: AblationOptions, loaded):
    """(study, previous results or None, loaded model)."""
    from dqar.device import resolve_device, resolve_dtype

    study = G.load_grid(opts.config or G.builtin_grid(opts.quick), repeats=opts.repeats)
    if opts.steps is not None:
        study = G.with_sample(study, steps=opts.steps)
    old = load_results(Path(opts.out))
    if old is not None and not opts.resume:
        raise DqarError(f"{Path(opts.out) / RESULTS_FILE} already holds {len(old['records'])} finished configurations",
                        "pass --resume to continue that study, or choose another --out")
    if loaded is None:
        from dqar.models import load_model

        device = resolve_device(opts.device)
        loaded = load_model(opts.model, device=device, dtype=resolve_dtype(opts.dtype, device))
    return study, old, loaded


def run_ablation(opts: AblationOptions, *, loaded=None, evaluator: Evaluator | None | str = "auto",
                 on_record: Callable[[dict], None] | None = None) -> Outcome:
    """Run (or resume) a study; returns what was done. `loaded`/`evaluator` may be injected (tests)."""
    t0 = time.perf_counter()
    study, old, loaded = _setup(opts, loaded)
    device = loaded.transformer.device
    with cpu_threads(device, opts.threads):
        return _run(opts, study, old, loaded, device, evaluator, on_record, t0)


def _run(opts, study, old, loaded, device, evaluator, on_record, t0) -> Outcome:
    out = Path(opts.out)
    if evaluator == "auto":
        evaluator = embedded_evaluator(loaded)
    labels = study_labels(loaded.num_classes, study.samples_per_label)
    entries = G.expand(study)
    check_plans(entries, loaded.transformer.config.num_layers)
    env = environment(loaded, device, loaded.transformer.dtype)
    st = _State(results={"format": RESULTS_FORMAT, "created": _now(), "command": opts.command, "environment": env,
                         "study": _study_block(study, labels, class_names(loaded, labels), evaluator, device, entries)},
                t0=t0)
    if old is not None:
        _check_resumable(old, env, labels, study.repeats, out)
        _resume_into(st, old, entries)
        st.seconds_before = float(old.get("run_seconds") or 0.0)
        st.results["command"] = old.get("command") or opts.command
    ctx = {"out": out, "loaded": loaded, "labels": labels, "evaluator": evaluator, "repeats": study.repeats,
           "device": device, "env": env}
    ran, interrupted = 0, False
    bars = _Bars(len(entries), len(st.done), study.repeats, opts.progress, warms_each(device))
    try:
        _write(out, st, entries, "partial")
        for entry in [e for e in entries if (e.name, e.config_hash) not in st.done]:
            try:
                rec = _run_entry(entry, G.baseline_of(entries, entry), st, ctx, bars)
            except PeerNotRun as exc:
                st.lead = None
                st.not_run[(entry.name, entry.config_hash)] = {"name": entry.name, "method": entry.peer.method, "reason": str(exc)}
                bars.finish()
                _write(out, st, entries, "partial")
                continue
            st.done[(entry.name, entry.config_hash)] = rec
            ran += 1
            bars.finish()
            _write(out, st, entries, "partial")
            if on_record is not None:
                on_record(rec)
            if opts.stop_after is not None and ran >= opts.stop_after and len(st.done) + len(st.not_run) < len(entries):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bars.close()
    finished = len(st.done) + len(st.not_run)
    _write(out, st, entries, "complete" if finished == len(entries) else "partial", figures=True)
    return Outcome(st.results, out, finished, len(entries), ran, interrupted, time.perf_counter() - t0,
                   tuple(st.results["not_run"]))


class _Bars:
    """An overall progress bar over configurations and one per configuration over its runs."""

    def __init__(self, total: int, done: int, repeats: int, enabled: bool, warm_each: bool):
        from tqdm.auto import tqdm

        self._tqdm, self.enabled, self.repeats, self.warm_each = tqdm, enabled, repeats, warm_each
        self.overall = tqdm(total=total, initial=done, desc="ablation", unit="config", disable=not enabled, position=0)
        self.inner = None

    def start(self, entry: G.Entry, have_lead: bool) -> None:
        runs = self.repeats if entry.is_baseline else int(self.warm_each) + self.repeats + 2
        self.inner = self._tqdm(total=runs, desc=entry.name[:40], unit="run", leave=False, disable=not self.enabled, position=1)

    def tick(self) -> None:
        if self.inner is not None:
            self.inner.update(1)

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None
        self.overall.update(1)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.overall.close()
