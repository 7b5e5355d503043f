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

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from dqar.engine.plan import build_plan, save_plan
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.io import atomic_write_json, atomic_write_text
from dqar.labels import default_labels
from dqar.reporting import plots, report
from dqar.reporting.documents import RESULTS_FILE, RESULTS_FORMAT, load_results
from dqar.reporting.plots import HEATMAP_FILE, PARETO_FILE
from dqar.studies import grid as G
from dqar.studies import records as REC
from dqar.studies.core import Evaluator, Reference, baseline_run, embedded_evaluator, make_reference, other_seeds, score
from dqar.studies.peer_rows import PeerNotRun, start_peer
from dqar.studies.timing import bracketed, cpu_threads, warms_each

__all__ = ["REPORT_FILE", "RESULTS_FILE", "AblationOptions", "Evaluator", "Outcome", "run_ablation"]

REPORT_FILE = "ABLATION_REPORT.md"
COMPARISON_FILE = "comparison.png"


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


def study_labels(num_classes: int, samples_per_label: int) -> list[int]:
    """The default labels, the whole list repeated `samples_per_label` times."""
    return default_labels(num_classes) * samples_per_label


def check_plans(entries: Sequence[G.Entry], num_layers: int) -> None:
    """Build every configuration's plan once, so a bad layer index fails before anything runs."""
    for e in entries:
        if e.run.reuse.enabled:
            build_plan(e.run.reuse, e.run.sample.steps, num_layers)


def calibrated(entry: G.Entry, loaded, labels, out: Path) -> G.Entry:
    """`entry` with its plan calibrated (untimed, seeds offset) and saved under `out/plans/`."""
    from dqar.tuning.calibrate import calibrate

    cal = calibrate(loaded, labels, other_seeds(entry.run), **entry.calibration)
    path = (out / "plans" / f"{entry.slug}.json").resolve()
    save_plan(cal.plan, path)
    return replace(entry, run=replace(entry.run, reuse=replace(entry.run.reuse, plan_file=str(path))))


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


def _write(out: Path, st: _State, entries: Sequence[G.Entry], status: str, figures: bool = False) -> None:
    """Figures (when asked: they take seconds), then the results JSON, then the report, each written atomically."""
    records = [st.done[(e.name, e.config_hash)] for e in entries if (e.name, e.config_hash) in st.done]
    res = st.results
    res.update(status=status, updated=REC.now(), completed=len(records), total=len(entries), records=records,
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
        REC.copy_images(out / "images" / source["slug"], out / "images" / entry.slug)
        return REC.copy_record(entry, base, source)
    if entry.calibration:
        st.lead = None  # other work ran since the last baseline timing
        entry = calibrated(entry, loaded, labels, out)
    if entry.run.sample not in st.refs:
        st.lead = None
        st.refs[entry.run.sample] = make_reference(loaded, labels, entry.run, evaluator)
    ref: Reference = st.refs[entry.run.sample]
    peer = None
    if entry.peer is not None:
        st.lead = None  # untimed work runs first, and the copy must exist during both bracketing baselines
        peer = start_peer(entry, loaded, labels, ref)
    lead = st.lead[1:] if st.lead is not None and st.lead[0] == entry.run.sample else None
    bars.start(entry, lead is not None)
    make = peer.generate if peer else (lambda: generate(loaded, labels, entry.run))
    base_run = baseline_run(entry.run)
    timed_base = None if entry.is_baseline else (lambda: generate(loaded, labels, base_run))
    try:
        measurements, shown, trail = bracketed(make, timed_base, ctx["repeats"], ctx["device"], len(labels), tick=bars.tick,
                                               warm=ref.generation if entry.is_baseline else peer.counted if peer else None,
                                               lead=lead)
    finally:
        if peer is not None:
            peer.attached.detach()
    st.lead = (entry.run.sample, *trail) if peer is None else None
    images = shown.output.images
    save_samples(images, labels, out / "images" / entry.slug, scale=1 if images.shape[-1] >= 128 else 4)
    rec = REC.make_record(entry, base, measurements, shown.stats, score(images, ref), ctx["env"], peer.summary if peer else None)
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
    env = REC.environment(loaded, device, loaded.transformer.dtype)
    st = _State(results={"format": RESULTS_FORMAT, "created": REC.now(), "command": opts.command, "environment": env,
                         "study": REC.study_block(study, labels, REC.class_names(loaded, labels), evaluator, device, entries)},
                t0=t0)
    if old is not None:
        REC.check_resumable(old, env, labels, study.repeats, out)
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
