"""`dqar bench`: the stock transformer (eager, torch.compile), dqar (no reuse, presets) on its executors and diffusers'
caching peers, in one process.

Rows: `stock_eager`, `stock_compiled`; `noreuse_<executor>` and `<preset>_<executor>` for the executors asked for
(eager = patch, compiled, graph; a gate preset's decisions frozen into a plan for the compiled ones; `_compiled_modeldtype`:
the same plan with a model-dtype cache); `peer_<name>` (dqar.studies.bench_peers: under torch.compile where it tolerates it).
Every case draws the same labels and noise; all cases of one batch size are warmed up in `warmup` passes, then timed
round-robin over the repeats on the device's clock (dqar.studies.timing: the sampling thread's CPU time on CPU, CUDA events
on GPU, wall time beside); every ratio is a ratio of medians with a paired bootstrap interval (dqar.studies.intervals),
against the stock eager and the stock compiled model. Peak memory: the CUDA allocator's, reset before each run; on CPU only
the dqar cache's bytes. Timed runs have diagnostics off. Ratios are what travels between machines.
"""
from __future__ import annotations

import fnmatch
import functools
import platform
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable

import torch
from tqdm import tqdm

from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.errors import DqarError
from dqar.engine.plan import Plan
from dqar.generate import generate
from dqar.labels import cycle_labels
from dqar.sampling import make_scheduler
from dqar.studies import memory
from dqar.studies.bench_peers import PEERS, PREFIX, PeerCase, check_peers
from dqar.studies.blocks import timed_run
from dqar.studies.intervals import ratio_ci
from dqar.studies.timing import clock_for, median, round_robin, seconds, walls, warm_up
from dqar.tuning.distill import executed_plan

BLOCK_PRESET = "block_reuse"
STOCK_EAGER, STOCK_COMPILED = "stock_eager", "stock_compiled"
EXECUTORS = ("eager", "compiled", "graph")  # dqar's rows: patch (eager), per-block compiled, one graph per plan row
COMPILE_SETTING = "torch.compile (default mode, static shapes)"
MEMORY_CACHE = "dqar cache only: ReuseStats.cache_bytes_peak of the last timed run (process memory is not measured on CPU)"
MEMORY_NONE = "not measured on CPU (no dqar cache in this row)"


@dataclass(frozen=True)
class BenchSettings:
    """What `dqar bench` measures."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)  # images per generation (CFG doubles the rows)
    steps: int = 50
    cfg: float = 4.0
    repeats: int = 5
    warmup: int = 2  # untimed passes over every case before the rounds (compilation happens there)
    presets: tuple[str, ...] = ("full_dqar", "quant_cache_only", BLOCK_PRESET)
    compile: bool = True  # include the torch.compile rows (stock_compiled, dqar compiled and graph; peers try it)
    stock: bool = True  # include diffusers' DiTPipeline where the model allows it
    seed: int = 0
    executors: tuple[str, ...] = EXECUTORS  # which of dqar's executors get rows
    peers: tuple[str, ...] = tuple(PEERS)  # diffusers caching methods timed beside dqar (dqar.studies.bench_peers)
    cases: tuple[str, ...] = ()  # only the cases matching one of these names or shell patterns; empty: all

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise DqarError(f"batch sizes {self.batch_sizes} are invalid", "use positive integers, e.g. --batch-sizes 1 8 32")
        if self.repeats < 3:
            raise DqarError(f"repeats = {self.repeats} is too few for a median", "use --repeats 3 or more")
        if self.steps < 1:
            raise DqarError(f"steps = {self.steps} is invalid", "use steps >= 1")
        if self.warmup < 1:
            raise DqarError(f"warmup = {self.warmup} is invalid", "use warmup >= 1 (compilation must happen before the rounds)")
        for p in self.presets:
            preset(p)
        for e in self.executors:
            if e not in EXECUTORS:
                raise DqarError(f"unknown executor '{e}'", f"use some of: {', '.join(EXECUTORS)}")
        check_peers(self.peers)
        names = case_names(self)
        for pattern in self.cases:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise DqarError(f"--cases '{pattern}' matches no case of this run", f"cases: {', '.join(names)}")


@dataclass(frozen=True)
class BenchRow:
    case: str
    batch: int
    median_s: float  # seconds per generation of `batch` images, on the clock
    per_sample_s: float
    times_s: list[float] = field(default_factory=list)  # round 1, 2, ...
    wall_times_s: list[float] = field(default_factory=list)
    vs_stock_eager: float | None = None  # stock eager time / this time (speedup)
    vs_stock_eager_ci: list[float] | None = None
    vs_stock_compiled: float | None = None
    vs_stock_compiled_ci: list[float] | None = None
    reuse_fraction: float | None = None
    setting: str = ""  # how the row ran: eager, torch.compile, dqar's executor, a peer's fallback
    peak_memory_bytes: int | None = None
    peak_memory_method: str = ""


@dataclass
class Case:
    """One bench case: a generation closure, how it ran, and the stats of its last run (None without dqar)."""

    run: Callable[[], Any]
    setting: Callable[[], str]
    stats: Callable[[], Any] = lambda: None


@dataclass
class _Batch:
    """What the cases of one batch size share: the model, the labels, the settings and the distilled plans."""

    loaded: Any
    labels: list[int]
    s: "BenchSettings"
    plans: dict = field(default_factory=dict)

    def reuse(self, name: str) -> tuple[ReuseConfig, Plan | None]:
        """A preset for the compiled executors: a gate's decisions, taken once eagerly, frozen into a plan (zero syncs)."""
        cfg = preset(name)
        if not cfg.gate:
            return cfg, None
        if name not in self.plans:
            self.plans[name] = executed_plan(self.loaded, self.labels, _run(self.s, cfg))
        return replace(cfg, gate=False), self.plans[name]


def stock_supported(loaded) -> str | None:
    """Why diffusers' DiTPipeline cannot run this model, or None when it can."""
    if loaded.vae is None:
        return "no VAE (DiTPipeline always decodes)"
    if loaded.null_class != 1000:
        return f"{loaded.num_classes} classes (DiTPipeline hard-codes null class 1000)"
    return None


def _labels(loaded, batch: int) -> list[int]:
    return cycle_labels(loaded.num_classes, batch, stride=7)


def _run(s: BenchSettings, cfg: ReuseConfig) -> RunConfig:
    return timed_run(RunConfig(reuse=cfg, sample=SampleConfig(steps=s.steps, cfg=s.cfg, sampler="ddim", seed=s.seed)))


def _dqar(b: _Batch, cfg: ReuseConfig, executor: str, plan: Plan | None = None) -> Case:
    """dqar attached on `executor` (patch, compiled, graph) under `cfg`; the setting names the executor that ran."""
    run = _run(b.s, cfg)
    last = []

    def one():
        gen = generate(b.loaded, b.labels, run, executor=executor, plan=plan)
        last[:] = [gen]
        return gen

    planned = ", the gate's decisions frozen into a plan" if plan is not None else ""

    def setting() -> str:  # the executor that ran (the engine's own word), not the one asked for
        ran = last[0].executor if last else executor
        return f"dqar executor {ran}{planned}" if ran else "nothing of dqar attached (reuse off on the patch executor)"

    return Case(one, setting, lambda: last[0].stats if last else None)


def _pipeline_case(loaded, labels, s: BenchSettings, transformer) -> Callable:
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=transformer, vae=loaded.vae, scheduler=make_scheduler("ddim", loaded.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: [torch.Generator().manual_seed(s.seed + i) for i in range(len(labels))]  # noqa: E731
    return lambda: pipe(labels, num_inference_steps=s.steps, guidance_scale=s.cfg, generator=gen(), output_type="pt")


def _stock(b: _Batch, compiled: bool) -> Case:
    """The stock model, nothing of dqar attached: diffusers' DiTPipeline where it runs the model, else dqar's no-reuse
    loop (bit-identical to it, tests/test_sampling.py); `compiled`: the whole transformer under torch.compile."""
    transformer = compiled_transformer(b.loaded.transformer) if compiled else b.loaded.transformer
    setting = COMPILE_SETTING if compiled else "eager"
    if b.s.stock and stock_supported(b.loaded) is None:
        return Case(_pipeline_case(b.loaded, b.labels, b.s, transformer), lambda: setting)
    model = replace(b.loaded, transformer=transformer)
    run = _run(b.s, ReuseConfig(enabled=False))
    return Case(lambda: generate(model, b.labels, run), lambda: setting)


def _peer(b: _Batch, name: str) -> Case:
    peer = PeerCase(b.loaded, b.labels, _run(b.s, ReuseConfig(enabled=False)), name, b.s.compile)
    return Case(peer, lambda: peer.setting)


@functools.lru_cache(maxsize=8)
def compiled_transformer(transformer):
    """The whole transformer under torch.compile, in the mode and dtype of dqar's compiled executor (default mode, static shapes)."""
    return torch.compile(transformer, dynamic=False)


def _specs(s: BenchSettings):
    """(name, kind, builder) of every case the settings name; kind: stock | stock_compiled | eager | compiled | graph | peer."""
    off = ReuseConfig(enabled=False)
    yield STOCK_EAGER, "stock", lambda b: _stock(b, False)
    yield STOCK_COMPILED, "stock_compiled", lambda b: _stock(b, True)
    for kind, executor in zip(EXECUTORS, ("patch", "compiled", "graph")):
        yield f"noreuse_{kind}", kind, functools.partial(lambda b, e: _dqar(b, off, e), e=executor)
    for name in s.presets:
        yield from _preset_specs(name)
    for name in s.peers:
        yield f"{PREFIX}{name}", "peer", functools.partial(_peer, name=name)


def _preset_specs(name: str):
    """A preset eager, and where the compiled executors take it (no CFG sharing): compiled, graph, compiled with a model-dtype cache."""
    cfg = preset(name)
    yield f"{name}_eager", "eager", lambda b: _dqar(b, cfg, "patch")
    if cfg.cfg_share != "none":  # CFG sharing runs on the patch executor only
        return
    yield f"{name}_compiled", "compiled", lambda b: _planned(b, name, "compiled")
    yield f"{name}_graph", "graph", lambda b: _planned(b, name, "graph")  # a graph per plan row
    if cfg.cache_dtype == "int8":  # same plan, model-dtype cache: the INT8 overhead
        yield f"{name}_compiled_modeldtype", "compiled", lambda b: _planned(b, name, "compiled", cache_dtype="model")


def _planned(b: _Batch, name: str, executor: str, **change) -> Case:
    cfg, plan = b.reuse(name)
    return _dqar(b, replace(cfg, **change), executor, plan)


def _wanted(s: BenchSettings, kind: str) -> bool:
    if kind in ("compiled", "graph", "stock_compiled"):
        return s.compile and (kind == "stock_compiled" or kind in s.executors)
    return kind in ("stock", "peer") or kind in s.executors


def selected(s: BenchSettings) -> list[tuple[str, Callable]]:
    """(name, builder) of the cases this run times: the kinds the settings include, then the --cases patterns."""
    out = [(n, build) for n, kind, build in _specs(s) if _wanted(s, kind)]
    return [(n, b) for n, b in out if not s.cases or any(fnmatch.fnmatchcase(n, p) for p in s.cases)]


def case_names(s: BenchSettings) -> list[str]:
    """The names of every case the settings include before the --cases patterns (the model does not change them)."""
    return [n for n, kind, _ in _specs(s) if _wanted(s, kind)]


def cases_for(loaded, batch: int, s: BenchSettings) -> dict[str, Case]:
    """Name → case for one batch size."""
    b = _Batch(loaded, _labels(loaded, batch), s)
    return {name: build(b) for name, build in selected(s)}


def run_bench(loaded, device: torch.device, s: BenchSettings, progress: bool = True,
              on_batch: Callable[[dict], None] | None = None, clock=None) -> dict:
    """Time every case at every batch size; returns a JSON-ready dict.

    A case that raises during its warm-up is dropped from the timing and listed under "failed"
    with its error, so one broken backend does not cost the other rows. `on_batch` receives the
    result so far after each batch size (the CLI writes it, so a killed run keeps finished batches).
    `clock`: the timing clock (default: the device's; tests inject one). Peak memory: per run on CUDA
    (reset before each), the dqar cache's peak on CPU.
    """
    clock = clock or clock_for(device)
    rows: list[BenchRow] = []
    failed: dict[str, str] = {}
    result = _header(loaded, device, s, clock) | {"rows": [], "failed": failed}
    for batch in s.batch_sizes:
        cases = cases_for(loaded, batch, s)
        runs = {name: c.run for name, c in cases.items()}
        with tqdm(total=len(runs) * (s.warmup + s.repeats), desc=f"bench batch {batch}", disable=not progress) as bar:
            failed |= {f"{name}@{batch}": error for name, error in _warm(runs, s, bar).items()}
            timed = round_robin(runs, clock, s.repeats, device=device if device.type == "cuda" else None,
                                on_step=lambda _: bar.update(1))
        rows.extend(_rows(batch, timed, cases))
        result["rows"] = [asdict(r) for r in rows]
        if on_batch:
            on_batch(result)
    return result


def _warm(runs: dict, s: BenchSettings, bar) -> dict[str, str]:
    """`s.warmup` passes over all cases (one compile can change another case's guards; the next pass settles that
    before the timing); a case that raises is dropped from `runs`: name → its one-line error."""
    errors = {}
    for done in range(s.warmup):
        for name, error in warm_up(runs, 1, on_step=lambda _: bar.update(1))[1].items():
            errors[name] = error
            del runs[name]
            bar.update(s.warmup - done - 1 + s.repeats)
    return errors


def _header(loaded, device: torch.device, s: BenchSettings, clock) -> dict:
    why = stock_supported(loaded)
    return {"settings": asdict(s), "model": loaded.name, "device": _device_name(device), "dtype": str(loaded.transformer.dtype),
            "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "clock": clock.name, "clock_method": clock.description,
            "memory_method": memory.METHOD_CUDA + ", highest of the row's timed runs" if device.type == "cuda" else MEMORY_CACHE,
            "stock": "DiTPipeline" if s.stock and why is None else
            f"dqar's no-reuse loop around the stock transformer ({why if s.stock else 'stock pipeline off'})"}


def _memory(runs: list, st) -> tuple[int | None, str]:
    """(peak bytes, how measured) of one row."""
    peaks = [r.peak for r in runs if r.peak is not None]
    if peaks:
        return max(peaks), memory.METHOD_CUDA
    if st is not None:
        return int(st.cache_bytes_peak), MEMORY_CACHE
    return None, MEMORY_NONE


def _rows(batch: int, timed: dict, cases: dict[str, Case]) -> list[BenchRow]:
    times = {name: seconds(runs) for name, runs in timed.items()}
    refs = {ref: times.get(ref) for ref in (STOCK_EAGER, STOCK_COMPILED)}
    out = []
    for name, ts in times.items():
        st = cases[name].stats()
        ratio = {ref: (median(t) / median(ts), ratio_ci(t, ts)) if t else (None, None) for ref, t in refs.items()}
        peak, how = _memory(timed[name], st)
        out.append(BenchRow(case=name, batch=batch, median_s=median(ts), per_sample_s=median(ts) / batch, times_s=ts,
                            wall_times_s=walls(timed[name]), vs_stock_eager=ratio[STOCK_EAGER][0], vs_stock_eager_ci=ratio[STOCK_EAGER][1],
                            vs_stock_compiled=ratio[STOCK_COMPILED][0], vs_stock_compiled_ci=ratio[STOCK_COMPILED][1],
                            reuse_fraction=st.reuse_fraction if st is not None else None, setting=cases[name].setting(),
                            peak_memory_bytes=peak, peak_memory_method=how))
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _ratio(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}× [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.2f}×"


def _mib(r: dict) -> str:
    return f"{r['peak_memory_bytes'] / 2 ** 20:.3g}" if r.get("peak_memory_bytes") is not None else "–"


def render_table(result: dict) -> str:
    """Markdown table of a bench result."""
    st = result["settings"]
    lines = [f"model {result['model']} · {result['device']} · {result['dtype']} · torch {result['torch']} · {result.get('date', '')} · "
             f"DDIM {st['steps']} · CFG {st['cfg']} · median of {st['repeats']} rounds · clock: {result.get('clock_method', '')}",
             "", f"Stock: {result.get('stock', '')}. Ratios: stock time / case time, with 95% paired-bootstrap intervals "
             f"(an interval that contains 1.00 is no difference on this machine). Peak MiB: {result.get('memory_method', '')}.",
             "", "| batch | case | setting | s / sample | vs stock eager | vs stock compiled | reuse % | peak MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ru = f"{100 * r['reuse_fraction']:.1f}" if r["reuse_fraction"] is not None else "–"
        lines.append(f"| {r['batch']} | {r['case']} | {r.get('setting', '')} | {r['per_sample_s']:.4f} "
                     f"| {_ratio(r['vs_stock_eager'], r['vs_stock_eager_ci'])} "
                     f"| {_ratio(r['vs_stock_compiled'], r['vs_stock_compiled_ci'])} | {ru} | {_mib(r)} |")
    for case, error in result.get("failed", {}).items():
        lines.append(f"\nNot timed: {case} failed in warm-up — {error}")
    return "\n".join(lines)
