"""`dqar ablate`: every configuration of a grid against a baseline timed in the same rounds, with intervals.

Protocol (written into the report's methodology):
- every configuration draws the same labels and the same initial noise (sample i: seed + i);
- configurations are timed in blocks (the main comparison, each sweep, the peers; dqar.studies.ablation.blocks),
  each on the fastest executor that runs it here, diagnostics off; the baseline of every sampling
  setting of a block is a case of the block, so the baseline and the configurations are timed in the
  same rounds; one untimed warm-up per case (a baseline warmed up in an earlier block of the run is not warmed up
  again: the blocks share it), then `repeats` rounds (dqar.studies.measure.timing); on CPU the clock is the sampling
  thread's CPU time (one torch thread), wall time beside it;
- speedup = median(baseline runs) / median(configuration runs), with a paired bootstrap interval
  (dqar.studies.measure.intervals); quantization error, finite checks and host-sync counts come from an
  untimed run with diagnostics on;
- fidelity: paired metrics and class accuracy on the timing batch for every configuration, and a
  larger untimed fidelity run (FD) for the main configurations and the finalists a recommendation or
  the target rests on, or at most the grid's `fidelity_runs` of them (dqar.studies.ablation.verify); its first chunk is
  the timing batch, whose warm-up images it reuses;
- a configuration whose resolved config equals one already measured reuses that measurement;
- a configuration the model's family refuses (the engine refuses it at enable: the gate, the policy, K/V caching
  and CFG sharing on Flux) is not run: it is reported as refused, with the engine's reason;
- a peer (dqar.studies.peers.methods) runs on a fresh deep copy of the transformer: untimed, one counted baseline
  generation on the copy, the peer applied (MagCache calibrated first, on seeds offset like calibrated
  plans), one counted generation with the peer, then it is timed in the peers block, its state reset
  before every generation. A peer whose package is missing or that fails while being applied is
  reported as not run, with the reason.

Results are written atomically after every block and every fidelity run (JSON and report; figures at
the end); `resume` skips configurations already complete (same name and config hash) and fidelity runs
already made; Ctrl-C leaves a valid partial report.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from dqar.engine.adapter import describe
from dqar.engine.plan import build_plan, save_plan
from dqar.errors import DqarError
from dqar.io import atomic_write_json, atomic_write_text
from dqar.labels import default_labels
from dqar.reporting import plots, report
from dqar.reporting.documents import RESULTS_FILE, RESULTS_FORMAT, load_results
from dqar.reporting.plots import HEATMAP_FILE, PARETO_FILE
from dqar.studies.ablation import fidelity as AF
from dqar.studies.ablation import blocks as B
from dqar.studies.ablation import grid as G
from dqar.studies.ablation import records as REC
from dqar.studies.ablation.bars import Bars
from dqar.studies.core import Evaluator, embedded_evaluator, other_seeds, reference_of
from dqar.studies.peers.rows import PeerNotRun, start_peer
from dqar.studies.measure.timing import clock_for, cpu_threads, order_method
from dqar.studies.ablation.verify import verify

__all__ = ["REPORT_FILE", "RESULTS_FILE", "AblationOptions", "Evaluator", "Outcome", "run_ablation"]

REPORT_FILE = "ABLATION_REPORT.md"
COMPARISON_FILE = "comparison.png"
SHARED_BASELINES = ("; a baseline (or eager baseline) already warmed up in an earlier block of the run is timed again in "
                    "every block, but not warmed up again")


@dataclass(frozen=True)
class AblationOptions:
    """What `dqar ablate` runs and where it writes."""

    model: str | None = None  # None: the embedded model
    out: Path = Path("results/ablation")
    quick: bool = False  # the small shipped grid (quick.toml): as grid="quick"
    grid: str = "default"  # a grid shipped in dqar/grids/ (G.GRIDS), unless `config` is given
    resume: bool = False  # continue a study in `out`
    config: str | None = None  # a grid file replacing the shipped one
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    repeats: int | None = None  # tests only: override the grid's repeats (may be < 3)
    stop_after: int | None = None  # tests only: interrupt once this many configurations of this run are complete
    steps: int | None = None  # override the grid's shared step count ([sample] steps)
    threads: int | None = None  # CPU intra-op threads while timing (default 1); ignored on GPU
    command: str | None = None  # the command line that started the study, recorded in the results
    executor: str = "auto"  # "auto": compiled where the engine supports it; "graph": the graph executor first; "patch": eager
    fidelity_samples_per_label: int | None = None  # override the grid's (tests)
    fidelity_runs: int | None | str = "grid"  # tests: "grid" keeps the grid's cap, None lifts it, an int replaces it

    def __post_init__(self) -> None:
        if self.grid not in G.GRIDS:
            raise DqarError(f"unknown grid '{self.grid}'", f"use one of: {', '.join(G.GRIDS)}, or --config FILE")
        if self.quick and self.grid not in ("default", "quick"):
            raise DqarError(f"--quick runs the quick grid, not --grid {self.grid}", "pass one of them")
        if self.executor not in B.EXECUTOR_PREFERENCES:
            raise DqarError(f"unknown executor choice '{self.executor}'", f"use one of: {', '.join(B.EXECUTOR_PREFERENCES)}")


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
    """`entry` with its plan calibrated (untimed, seeds offset) and saved under `out/plans/`; a refused calibration raises Refused."""
    from dqar.tuning.calibrate import calibrate

    try:
        cal = calibrate(loaded, labels, other_seeds(entry.run), **entry.calibration)
    except DqarError as exc:
        raise B.Refused(f"calibration refused: {exc}") from None
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
    refs: dict = field(default_factory=dict)  # SampleConfig -> Reference (the timing batch, the baseline on its executor)
    eager_refs: dict = field(default_factory=dict)  # SampleConfig -> Reference of the eager baseline
    executors: dict = field(default_factory=dict)  # SampleConfig -> the baseline's executor
    bases: dict = field(default_factory=dict)  # (SampleConfig, executor) -> warmed-up baseline case, shared by the blocks
    eager: dict = field(default_factory=dict)  # SampleConfig -> warmed-up eager baseline case, shared by the blocks
    warm_images: dict = field(default_factory=dict)  # (timed run, executor) -> warm-up images: chunk 0 of a fidelity run


def _records(st: _State, entries: Sequence[G.Entry]) -> list[dict]:
    return [st.done[(e.name, e.config_hash)] for e in entries if (e.name, e.config_hash) in st.done]


def _write(out: Path, st: _State, entries: Sequence[G.Entry], status: str, figures: bool = False) -> None:
    """Figures (when asked: they take seconds), then the results JSON, then the report, each written atomically."""
    records = _records(st, entries)
    REC.with_simultaneous(records)
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


# ----- one block -------------------------------------------------------------------------------
def _baseline(s, timed: list[G.Entry], st: _State, ctx: dict) -> B.Case:
    """The warmed-up baseline case of sampling setting `s` (the baseline entry itself when the block measures it)."""
    loaded, labels = ctx["loaded"], ctx["labels"]
    own = next((e for e in timed if e.is_baseline and e.run.sample == s), None)
    if own is not None:
        case = B.entry_case(loaded, labels, own, ctx["executor"])
    else:
        executor = st.executors.get(s) or B.baseline_executor(loaded, s, ctx["executor"])
        if (s, executor) in st.bases:
            return st.bases[(s, executor)]  # warmed up in an earlier block: the blocks share it
        case = B.baseline_case(loaded, labels, s, executor)
    _warm(case, st, ctx)
    st.bases[(s, case.executor)] = case
    st.executors.setdefault(s, case.executor)
    if s not in st.refs:
        st.refs[s] = reference_of(case.warm, labels, ctx["evaluator"])
    return case


def _eager(s, st: _State, ctx: dict, eager: dict) -> B.Case:
    """The warmed-up eager baseline of `s` (created once per block); its images are the reference of eager cases."""
    if s not in eager and s in st.eager:
        eager[s] = st.eager[s]  # warmed up in an earlier block
    if s not in eager:
        eager[s] = st.eager[s] = B.baseline_case(ctx["loaded"], ctx["labels"], s, "patch")
        _warm(eager[s], st, ctx)
        if s not in st.eager_refs:
            st.eager_refs[s] = reference_of(eager[s].warm, ctx["labels"], ctx["evaluator"])
    return eager[s]


def _member(e: G.Entry, st: _State, ctx: dict, bases: dict, eager: dict) -> B.Case:
    """A configuration's case, prepared (plan calibrated, peer applied) and warmed up, with its diagnostics run."""
    loaded, labels, bars = ctx["loaded"], ctx["labels"], ctx["bars"]
    if e.peer is not None:
        s = e.run.sample
        if bases[s].executor != "patch":
            _eager(s, st, ctx, eager)  # the peer's copy is checked against the eager baseline
        case = B.peer_case(e, start_peer(e, loaded, labels, st.refs[s] if bases[s].executor == "patch" else st.eager_refs[s]))
    else:
        reason = B.refusal(loaded, e.run)
        if reason:
            raise B.Refused(reason)
        case = B.entry_case(loaded, labels, calibrated(e, loaded, labels, ctx["out"]) if e.calibration else e, ctx["executor"])
    _warm(case, st, ctx)
    if B.diagnose(case, loaded, labels):
        bars.tick()
    return case


def _warm(case: B.Case, st: _State, ctx: dict) -> None:
    """The case's untimed warm-up; its images are kept as chunk 0 of a fidelity run (dqar.studies.ablation.verify)."""
    B.warm(case, ctx["loaded"], ctx["labels"])
    ctx["bars"].tick()
    if ctx["chunks"] > 1 and case.executor != "peer":
        st.warm_images[warm_key(case.run, case.executor)] = case.warm.output.images


def warm_key(run, executor: str) -> tuple[str, str]:
    """What a warm-up's images are filed under: the timed run and the executor it ran on (compiled ones, else patch)."""
    import json

    return json.dumps(B.timed_run(run).to_dict(), sort_keys=True, default=list), executor if executor in B.COMPILED else "patch"


def _cases(timed: list[G.Entry], st: _State, ctx: dict) -> tuple[list[B.Case], dict, dict]:
    """(member cases, setting → baseline case, setting → eager baseline case), all warmed up; peers that cannot run left out.

    An eager baseline joins the block where a configuration runs eagerly while its setting's baseline is compiled.
    """
    bases, eager = {}, {}
    for e in timed:
        if e.run.sample not in bases:
            bases[e.run.sample] = _baseline(e.run.sample, timed, st, ctx)
    members = []
    for e in timed:
        if e.is_baseline:
            members.append(bases[e.run.sample])
            continue
        try:
            members.append(_member(e, st, ctx, bases, eager))
        except PeerNotRun as exc:
            st.not_run[(e.name, e.config_hash)] = {"name": e.name, "method": e.peer.method, "reason": str(exc)}
        except B.Refused as exc:
            st.not_run[(e.name, e.config_hash)] = {"name": e.name, "method": "dqar", "refused": True, "reason": str(exc)}
    for c in members:
        if c.executor not in B.COMPILED and bases[c.sample].executor in B.COMPILED:
            _eager(c.sample, st, ctx, eager)
    return members, bases, eager


def _record(case: B.Case, bases: dict, eager: dict, st: _State, ctx: dict, block: str) -> dict:
    """A measured case's record; its images are saved."""
    from dqar.images import save_samples

    e, labels, s = case.entry, ctx["labels"], case.sample
    base = bases[s]
    eb = eager.get(s) if case.executor not in B.COMPILED else None
    ref = st.eager_refs[s] if eb is not None else st.refs[s]  # paired against the baseline on the same kind of executor
    stats = None if e.is_baseline else case.stats  # a compiled baseline attaches the engine, but reuses nothing
    m = REC.measurements(case.runs, base.runs, len(labels), executor=case.executor, note=case.note, baseline_executor=base.executor,
                         flops_skipped=stats.flops_skipped_fraction if stats is not None else None,
                         eager_base=eb.runs if eb is not None else None, is_baseline=e.is_baseline)
    m["block"] = block
    images = case.warm.output.images
    save_samples(images, labels, ctx["out"] / "images" / e.slug, scale=1 if images.shape[-1] >= 128 else 4)
    m["reference_executor"] = eb.executor if eb is not None else base.executor
    return REC.make_record(e, G.baseline_of(ctx["entries"], e), m, stats, AF.fidelity(images, ref), ctx["env"],
                           case.peer.summary if case.peer is not None else None)


def _run_block(block: B.Block, st: _State, ctx: dict) -> list[dict]:
    """Measure the block's unfinished configurations (copy those identical to one measured); their records, in order."""
    todo = [e for e in block.entries if (e.name, e.config_hash) not in st.done and (e.name, e.config_hash) not in st.not_run]
    seen, timed, copies = set(st.by_hash), [], []
    for e in todo:
        (copies if e.config_hash in seen else timed).append(e)
        seen.add(e.config_hash)
    recs = {}
    if timed:
        bars = ctx["bars"]
        bars.start(block.name, 2 * len(timed) + 1)
        members, bases, eager = _cases(timed, st, ctx)
        try:
            cases = list({c.name: c for c in [*bases.values(), *members, *eager.values()]}.values())
            bars.expect(len(cases) * ctx["repeats"])
            B.time_block(cases, ctx["clock"], ctx["repeats"], ctx["device"], on_step=lambda _: bars.tick())
        finally:
            for c in members:
                if c.peer is not None:
                    c.peer.attached.detach()
        for c in members:
            recs[c.entry.name] = st.by_hash[c.entry.config_hash] = _record(c, bases, eager, st, ctx, block.name)
    for e in copies:
        source = st.by_hash[e.config_hash]
        REC.copy_images(ctx["out"] / "images" / source["slug"], ctx["out"] / "images" / e.slug)
        recs[e.name] = REC.copy_record(e, G.baseline_of(ctx["entries"], e), source)
    return [recs[e.name] for e in todo if e.name in recs]


# ----- the run ---------------------------------------------------------------------------------
def _setup(opts: AblationOptions, loaded):
    """(study, previous results or None, loaded model)."""
    from dqar.device import resolve_device, resolve_dtype

    name, asked = loaded.name if loaded is not None else opts.model, "quick" if opts.quick else opts.grid
    grid = G.grid_for(asked, name)
    study = G.load_grid(opts.config or G.builtin_grid(grid), repeats=opts.repeats)
    if opts.config is None and grid == asked:  # a generic grid: the model's sampling defaults over its [sample]
        study = G.with_model_defaults(study, name)
    if opts.steps is not None:
        study = G.with_sample(study, steps=opts.steps)
    if opts.fidelity_samples_per_label is not None:
        study = replace(study, fidelity_samples_per_label=opts.fidelity_samples_per_label)
    if opts.fidelity_runs != "grid":
        study = replace(study, fidelity_runs=opts.fidelity_runs)
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
                 on_record: Callable[[dict], None] | None = None, clock=None) -> Outcome:
    """Run (or resume) a study; returns what was done. `loaded`, `evaluator` and the timing `clock` may be injected (tests)."""
    t0 = time.perf_counter()
    study, old, loaded = _setup(opts, loaded)
    device = loaded.transformer.device
    with cpu_threads(device, opts.threads):
        return _run(opts, study, old, loaded, device, evaluator, on_record, clock or clock_for(device), t0)


def _methods(study: G.Study, clock, evaluator, samples: int, chunks: int) -> dict:
    return {"timing_method": order_method(study.repeats) + SHARED_BASELINES, "clock": clock.name,
            "clock_method": clock.description, "executor_choice": None, "executor_method": B.EXECUTOR_METHOD,
            "fidelity_samples": samples * chunks, "fd_min_samples": AF.fd_min_samples(evaluator),
            "fidelity_runs_method": AF.method(evaluator, samples, chunks, study.fidelity_runs)}


def _run(opts, study, old, loaded, device, evaluator, on_record, clock, t0) -> Outcome:
    out = Path(opts.out)
    if evaluator == "auto":
        evaluator = embedded_evaluator(loaded)
    labels = study_labels(loaded.num_classes, study.samples_per_label)
    chunks = -(-study.fidelity_samples_per_label // study.samples_per_label)
    AF.check_seeds(study.sample.seed, len(labels), chunks)
    entries = G.expand(study)
    check_plans(entries, len(describe(loaded.transformer).blocks))
    env = REC.environment(loaded, device, loaded.transformer.dtype)
    methods = _methods(study, clock, evaluator, len(labels), chunks)
    methods["executor_choice"] = opts.executor
    st = _State(results={"format": RESULTS_FORMAT, "created": REC.now(), "command": opts.command, "environment": env,
                         "study": REC.study_block(study, labels, REC.class_names(loaded, labels), evaluator, device, entries, methods)},
                t0=t0)
    if old is not None:
        REC.check_resumable(old, env, labels, study.repeats, out,
                            {k: methods[k] for k in ("clock", "executor_choice", "fidelity_samples")})
        _resume_into(st, old, entries)
        st.seconds_before = float(old.get("run_seconds") or 0.0)
        st.results["command"] = old.get("command") or opts.command
        st.results["block_seconds"] = dict(old.get("block_seconds") or {})
    bars = Bars(len(entries), len(st.done), opts.progress)
    ctx = {"out": out, "loaded": loaded, "labels": labels, "evaluator": evaluator, "repeats": study.repeats, "device": device,
           "env": env, "entries": entries, "executor": opts.executor, "clock": clock, "bars": bars, "chunks": chunks,
           "fidelity_runs": study.fidelity_runs, "warm_images": st.warm_images, "warm_key": warm_key}
    ran, interrupted = 0, False
    write = lambda status="partial": _write(out, st, entries, status)  # noqa: E731
    try:
        write()
        for block in B.plan_blocks(entries):
            t_block = time.perf_counter()
            recs = _run_block(block, st, ctx)
            if recs:
                seconds = st.results.setdefault("block_seconds", {})
                seconds[block.name] = seconds.get(block.name, 0.0) + time.perf_counter() - t_block
            for rec in recs:
                st.done[(rec["name"], rec["config_hash"])] = rec
                ran += 1
                bars.finish(1)
                if on_record is not None:
                    on_record(rec)
            write()
            if opts.stop_after is not None and ran >= opts.stop_after and len(st.done) + len(st.not_run) < len(entries):
                raise KeyboardInterrupt
        t_verify = time.perf_counter()
        verify(st.results, ctx, st.done, write)
        seconds = st.results.setdefault("block_seconds", {})
        seconds["fidelity runs"] = seconds.get("fidelity runs", 0.0) + time.perf_counter() - t_verify
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bars.close()
    finished = len(st.done) + len(st.not_run)
    complete = finished == len(entries) and not interrupted
    _write(out, st, entries, "complete" if complete else "partial", figures=True)
    return Outcome(st.results, out, finished, len(entries), ran, interrupted, time.perf_counter() - t0,
                   tuple(st.results["not_run"]))
