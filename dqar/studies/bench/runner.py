"""`dqar bench`: the stock transformer (eager, torch.compile), dqar (no reuse, presets) on its executors and diffusers'
caching peers, in one process.

Rows: `stock_eager`, `stock_compiled` and, on CUDA only, `stock_compiled_cudagraphs` (mode reduce-overhead); `noreuse_<executor>` and `<preset>_<executor>` for the executors asked for
(eager = patch, compiled, graph, flow_compiled; a gate preset's decisions frozen into a plan for the compiled ones;
`noreuse_flow_compiled` runs whole blocks compiled at block granularity; `_compiled_modeldtype`:
the same plan with a model-dtype cache; a verifying-decider preset, e.g. `--presets adaptive`, runs live on every
executor and gets `<preset>_static_<executor>` beside its compiled rows: its own executed decisions replayed as a plan,
the same FLOPs without the probe check and its host reads, `dqar.studies.bench.cases`); `peer_<name>` (dqar.studies.bench.peers: under torch.compile where it tolerates it) and, with compile rows on,
`peer_<name>_eager` beside it (the same peer without compile: a peer is compared at its faster form).
Flow models (Flux, SD3: dqar.models.RANDOM_FLOW) sample with `sample_flow` through `generate`; a row whose executor or peer
refuses the family at enable is not timed but listed under "not_applicable" with the refusal (`Case.refused`).
Every case draws the same labels and noise; all cases of one batch size are warmed up in `warmup` passes (each
case's warm-up seconds, graphs and fallbacks logged), then timed round-robin over the repeats on the device's clock (dqar.studies.measure.timing: the sampling thread's CPU time on CPU, CUDA events
on GPU, wall time beside); every ratio is a ratio of medians with a paired bootstrap interval (dqar.studies.measure.intervals),
against the stock eager, the stock compiled and the faster stock compiled row (`stock_best`). The result is handed on
after every timed case (rows still short of their rounds: `complete: false`). Peak memory: the CUDA allocator's, reset before each run; on CPU only
the dqar cache's bytes. Timed runs have diagnostics off. Ratios are what travels between machines. Each dqar row also
reports its skipped FLOPs and the bound they set, 1 / (1 - skipped): the most reuse alone can gain over no reuse, and
its counted host syncs.
"""
from __future__ import annotations

import fnmatch
import functools
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

import torch
from tqdm import tqdm

from dqar.engine.api import on_cuda
from dqar.engine.config import ReuseConfig, preset
from dqar.errors import DqarError
from dqar.studies.measure import compile_cache, memory
from dqar.studies.bench.cases import Batch, Case, dqar_case, labels_for, peer_case, planned_case, stock_case, verify_static_case
from dqar.studies.bench.family import flops, for_model, stock_supported
from dqar.studies.bench.peers import PEERS, PREFIX, check_peers
from dqar.studies.bench.report import render_table  # noqa: F401 - re-exported
from dqar.studies.measure.intervals import ratio_ci
from dqar.studies.measure.timing import Run, clock_for, median, round_robin, seconds, walls, warm_up

BLOCK_PRESET = "block_reuse"
STOCK_EAGER, STOCK_COMPILED, STOCK_CUDAGRAPHS = "stock_eager", "stock_compiled", "stock_compiled_cudagraphs"
STOCK_COMPILED_ROWS = (STOCK_COMPILED, STOCK_CUDAGRAPHS)  # the candidates for stock_best
EXECUTORS = ("eager", "compiled", "graph", "flow_compiled")  # dqar's rows: patch (eager), per-block compiled (DiT), one graph
# per plan row (DiT), compiled stock block forwards under patch's dispatch (the other families: dqar.engine.flow_compiled)
ENGINE_EXECUTORS = ("patch", "compiled", "graph", "flow_compiled")  # the engine's name of each bench executor
FLOW_NOREUSE = ReuseConfig(enabled=False, granularity="block")  # flow_compiled's no-reuse row: whole blocks compiled, as full_dqar
NO_CUDAGRAPHS = (f"{STOCK_CUDAGRAPHS} left out: torch.compile mode reduce-overhead has no CUDA graphs on this device, so stock_best "
                 f"is {STOCK_COMPILED}")
MEMORY_CACHE = "dqar cache only: ReuseStats.cache_bytes_peak of the last timed run (process memory is not measured on CPU)"
MEMORY_NONE = "not measured on CPU (no dqar cache in this row)"


@dataclass(frozen=True)
class BenchSettings:
    """What `dqar bench` measures."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)  # images per generation (CFG doubles the rows)
    steps: int | None = None  # None: the model's (DEFAULTS: DiT 50, flow models 28)
    cfg: float | None = None  # None: the model's (DiT 4; Flux 1: guidance-distilled, one forward; SD3 4.5, batched CFG)
    repeats: int = 5
    warmup: int = 2  # untimed passes over every case before the rounds (compilation happens there)
    presets: tuple[str, ...] = ("full_dqar", "quant_cache_only", BLOCK_PRESET)
    compile: bool = True  # include the torch.compile rows (stock_compiled(_cudagraphs), dqar compiled and graph; peers try it)
    stock: bool = True  # include diffusers' DiTPipeline where the model allows it
    seed: int = 0
    executors: tuple[str, ...] = EXECUTORS  # which of dqar's executors get rows
    peers: tuple[str, ...] = tuple(PEERS)  # diffusers caching methods timed beside dqar (dqar.studies.bench.peers)
    cases: tuple[str, ...] = ()  # only the cases matching one of these names or shell patterns; empty: all
    verify_target: float | None = None  # verifying-decider presets: τ scaled to skip this FLOPs share (cases.Batch.config); None: the preset's

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise DqarError(f"batch sizes {self.batch_sizes} are invalid", "use positive integers, e.g. --batch-sizes 1 8 32")
        if self.repeats < 3:
            raise DqarError(f"repeats = {self.repeats} is too few for a median", "use --repeats 3 or more")
        if self.steps is not None and self.steps < 1:
            raise DqarError(f"steps = {self.steps} is invalid", "use steps >= 1")
        if self.warmup < 1:
            raise DqarError(f"warmup = {self.warmup} is invalid", "use warmup >= 1 (compilation must happen before the rounds)")
        if self.verify_target is not None and not 0.0 < self.verify_target < 1.0:
            raise DqarError(f"verify_target = {self.verify_target} is out of range", "use a fraction of FLOPs skipped in (0, 1), e.g. 0.64")
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
    vs_stock_best: float | None = None  # against the faster of stock_compiled and stock_compiled_cudagraphs (header: stock_best)
    vs_stock_best_ci: list[float] | None = None
    reuse_fraction: float | None = None
    setting: str = ""  # how the row ran: eager, torch.compile, dqar's executor, a peer's fallback
    peak_memory_bytes: int | None = None
    peak_memory_method: str = ""
    complete: bool = True  # False while the row has fewer than `repeats` rounds (a partial write)
    warmup_s: list[float] = field(default_factory=list)  # wall seconds of each warm-up pass (the first compiles)
    graphs: int | None = None  # dqar's ReuseStats of the last run (None without dqar)
    fallback_evaluations: int | None = None
    compile_seconds: float | None = None  # dqar's first-call seconds over the warm-up passes
    flops_skipped_fraction: float | None = None  # dqar's ReuseStats of the last run (None without dqar)
    speedup_bound: float | None = None  # 1 / (1 - flops_skipped_fraction): the most skipping those FLOPs can gain
    host_syncs: int | None = None  # dqar's counted device→host reads in the last run (the verifying decider: one per deciding step)


def _specs(s: BenchSettings):
    """(name, kind, builder) of every case the settings name; kind: stock | stock_compiled | eager | compiled | graph | peer."""
    off = ReuseConfig(enabled=False)
    yield STOCK_EAGER, "stock", lambda b: stock_case(b, None)
    yield STOCK_COMPILED, "stock_compiled", lambda b: stock_case(b, "default")
    yield STOCK_CUDAGRAPHS, "stock_cudagraphs", lambda b: stock_case(b, "reduce-overhead")  # CUDA only (selected)
    for kind, executor in zip(EXECUTORS, ENGINE_EXECUTORS):
        cfg = FLOW_NOREUSE if kind == "flow_compiled" else off
        yield f"noreuse_{kind}", kind, functools.partial(lambda b, e, c: dqar_case(b, c, e), e=executor, c=cfg)
    for name in s.presets:
        yield from _preset_specs(name)
    for name in s.peers:
        yield f"{PREFIX}{name}", "peer", functools.partial(peer_case, name=name)
        # beside a compiled peer row, the same peer eagerly: graph breaks at its hooks can make compiling it slower
        yield f"{PREFIX}{name}_eager", "peer_eager", functools.partial(peer_case, name=name, compile=False)


def _preset_specs(name: str):
    """A preset eager, and where the compiled executors take it (no CFG sharing): compiled, graph, flow_compiled, compiled with a
    model-dtype cache; a verifying-decider preset (adaptive) instead gets `<name>_static_<executor>` beside its compiled rows,
    and `<name>_per_sample_eager` (per-sample refresh, patch executor only) beside its eager row."""
    cfg = preset(name)
    yield f"{name}_eager", "eager", lambda b: dqar_case(b, b.config(name), "patch", note=b.note(name))
    if cfg.cfg_share != "none":  # CFG sharing runs on the patch executor only
        return
    yield f"{name}_compiled", "compiled", lambda b: planned_case(b, name, "compiled")
    yield f"{name}_graph", "graph", lambda b: planned_case(b, name, "graph")  # a graph per plan row
    yield f"{name}_flow_compiled", "flow_compiled", lambda b: planned_case(b, name, "flow_compiled")  # compiled stock blocks
    if cfg.decider == "verify":  # beside each compiled row, the static plan of its own executed decisions (same FLOPs)
        yield f"{name}_per_sample_eager", "eager", lambda b: dqar_case(b, b.config(name, True), "patch", note=b.note(name, True))
        for kind in ("compiled", "graph", "flow_compiled"):
            yield f"{name}_static_{kind}", kind, functools.partial(verify_static_case, name=name, executor=kind)
    elif cfg.cache_dtype == "int8":  # same plan, model-dtype cache: the INT8 overhead
        yield f"{name}_compiled_modeldtype", "compiled", lambda b: planned_case(b, name, "compiled", cache_dtype="model")


def _wanted(s: BenchSettings, kind: str) -> bool:
    if kind in ("compiled", "graph", "flow_compiled", "stock_compiled", "stock_cudagraphs"):
        return s.compile and (kind.startswith("stock") or kind in s.executors)
    if kind == "peer_eager":  # without compile rows the peer row itself runs eagerly
        return s.compile
    return kind in ("stock", "peer") or kind in s.executors


def selected(s: BenchSettings, cuda: bool = True) -> list[tuple[str, Callable]]:
    """(name, builder) of the cases this run times: the kinds the settings include (`cuda`: the device has CUDA graphs),
    then the --cases patterns."""
    out = [(n, build) for n, kind, build in _specs(s) if _wanted(s, kind) and (cuda or kind != "stock_cudagraphs")]
    return [(n, b) for n, b in out if not s.cases or any(fnmatch.fnmatchcase(n, p) for p in s.cases)]


def case_names(s: BenchSettings) -> list[str]:
    """The names of every case the settings include before the --cases patterns (the model does not change them)."""
    return [n for n, kind, _ in _specs(s) if _wanted(s, kind)]


def cases_for(loaded, batch: int, s: BenchSettings) -> dict[str, Case]:
    """Name → case for one batch size (settings left None resolved for the model: `for_model`)."""
    s = for_model(s, loaded)
    b = Batch(loaded, labels_for(loaded, batch), s)
    return {name: build(b) for name, build in selected(s, on_cuda(loaded.transformer))}


def stock_best(medians: dict[str, float]) -> str | None:
    """The stock compiled row with the lowest median among those timed (name → median seconds), or None."""
    timed = [(medians[n], n) for n in STOCK_COMPILED_ROWS if medians.get(n) is not None]
    return min(timed)[1] if timed else None


def run_bench(loaded, device: torch.device, s: BenchSettings, progress: bool = True,
              on_update: Callable[[dict], None] | None = None, clock=None, log: Callable[[str], None] | None = None,
              cache_path=None) -> dict:
    """Time every case at every batch size; returns a JSON-ready dict.

    A case that raises during its warm-up is dropped from the timing and listed under "failed" with its error, so one
    broken backend does not cost the other rows. `on_update` receives the result so far after every warm-up and every
    timed case (the CLI writes it: a killed run keeps every measurement; rows short of their rounds have
    `complete: false`). `clock`: the timing clock (default: the device's; tests inject one). `log`: one line per
    warm-up (default: stderr while `progress`). Peak memory: per run on CUDA (reset before each), the dqar cache's on CPU.
    The compile cache (dqar.studies.measure.compile_cache: `cache_path` or $DQAR_COMPILE_CACHE) is loaded before the first warm-up
    and saved after each batch size's warm-ups, so a run killed while timing keeps what it compiled.
    """
    s = for_model(s, loaded)
    clock = clock or clock_for(device)
    log = log or ((lambda m: tqdm.write(m, file=sys.stderr)) if progress else (lambda m: None))
    cuda = device.type == "cuda"
    result = _header(loaded, device, s, clock) | {"stock_best": {}, "rows": [], "failed": {}, "not_applicable": {},
                                                  "warmup": {}}
    if s.compile and not cuda:
        result["notes"] = [NO_CUDAGRAPHS]
    cache = {"load": compile_cache.load(cache_path, log=log), "save": None}
    if cache["load"] is not None:
        result["compile_cache"] = cache
    done: list[dict] = []

    def publish(rows: list[BenchRow]) -> None:
        result["rows"] = done + [asdict(r) for r in rows]
        if on_update:
            on_update(result)

    for batch in s.batch_sizes:
        cases = cases_for(loaded, batch, s)
        with tqdm(total=len(cases) * (s.warmup + s.repeats), desc=f"bench batch {batch}", disable=not progress) as bar:
            warm = _warm(cases, batch, s, clock, result, bar, log, publish)
            if cache["load"] is not None:
                cache["save"] = compile_cache.save(cache_path, log=log)
            runs: dict[str, list[Run]] = {name: [] for name in cases}
            rows: list[BenchRow] = []

            def timed(_name: str) -> None:  # after every timed case: the rows so far, handed on
                rows[:] = _rows(batch, runs, cases, warm, s.repeats, result)
                bar.update(1)
                publish(rows)

            round_robin({n: c.run for n, c in cases.items()}, clock, s.repeats, device=device if cuda else None, on_step=timed,
                        runs=runs)
        done += [asdict(r) for r in rows]
    result["rows"] = done
    return result


def _warm(cases: dict[str, Case], batch: int, s: BenchSettings, clock, result: dict, bar, log, publish) -> dict[str, dict]:
    """`s.warmup` passes over all cases (one compile can change another case's guards; the next pass settles that before
    the timing), each case's seconds, graphs and fallbacks logged and handed on; a case that raises is dropped from
    `cases` and listed in result["failed"]. Returns name → {seconds: [per pass], compile_seconds}."""
    warm: dict[str, dict] = {}
    for done in range(s.warmup):
        for name in list(cases):
            if cases[name].refused:  # the model's family is refused by this row's executor or peer: listed, not timed
                result["not_applicable"][f"{name}@{batch}"] = cases.pop(name).refused
                bar.update(s.warmup - done + s.repeats)
                continue
            measured, errors = warm_up({name: functools.partial(clock.measure, cases[name].run)}, 1)
            if errors:  # a backend that cannot run here: report it, keep the rest
                result["failed"][f"{name}@{batch}"] = errors[name]
                del cases[name]
                warm.pop(name, None)
                result["warmup"].pop(f"{name}@{batch}", None)
                bar.update(s.warmup - done + s.repeats)
                continue
            _, timing = measured[name]
            st = cases[name].stats()
            w = warm.setdefault(name, {"seconds": [], "compile_seconds": None if st is None else 0.0})
            w["seconds"].append(timing.wall)
            if st is not None:
                w["compile_seconds"] += float(st.compile_seconds)
            g, f = (st.graphs, st.fallback_evaluations) if st is not None else ("–", "–")
            passes = f" (pass {done + 1} of {s.warmup})" if s.warmup > 1 else ""
            log(f"warm-up {name}@{batch}{passes}: {timing.wall:.1f} s, graphs {g}, fallbacks {f}")
            result["warmup"][f"{name}@{batch}"] = {**w, "graphs": None if st is None else st.graphs,
                                                   "fallback_evaluations": None if st is None else st.fallback_evaluations}
            bar.update(1)
            publish([])
    return warm


def _header(loaded, device: torch.device, s: BenchSettings, clock) -> dict:
    why = stock_supported(loaded)
    return {"settings": asdict(s), "model": loaded.name, "device": _device_name(device), "dtype": str(loaded.transformer.dtype),
            "torch": torch.__version__, "cuda": torch.version.cuda, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "clock": clock.name, "clock_method": clock.description,
            "memory_method": memory.METHOD_CUDA + ", highest of the row's timed runs" if device.type == "cuda" else MEMORY_CACHE,
            "family": getattr(loaded, "family", "dit"), "resolution": getattr(loaded, "resolution", None),
            "guidance": getattr(loaded, "guidance", None),
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


@functools.lru_cache(maxsize=4096)
def _ci(base: tuple, own: tuple) -> list[float] | None:
    return ratio_ci(base, own)


def _vs(base: list[float] | None, own: list[float], repeats: int) -> tuple[float | None, list[float] | None]:
    """Ratio of medians over the paired rounds both have; its interval once both have every round."""
    if not base:
        return None, None
    n = min(len(base), len(own))
    ci = _ci(tuple(base), tuple(own)) if len(base) == len(own) == repeats else None
    return median(base[:n]) / median(own[:n]), ci


def _rows(batch: int, timed: dict[str, list[Run]], cases: dict[str, Case], warm: dict[str, dict], repeats: int,
          result: dict) -> list[BenchRow]:
    """The rows of one batch so far (those with at least one round); sets result["stock_best"][batch]."""
    times = {name: seconds(runs) for name, runs in timed.items() if runs}
    best = stock_best({n: median(t) for n, t in times.items()})
    result["stock_best"][str(batch)] = best
    out = []
    for name, ts in times.items():
        st = cases[name].stats()
        eager, compiled, vs_best = (_vs(times.get(ref), ts, repeats) for ref in (STOCK_EAGER, STOCK_COMPILED, best))
        peak, how = _memory(timed[name], st)
        out.append(BenchRow(case=name, batch=batch, median_s=median(ts), per_sample_s=median(ts) / batch, times_s=ts,
                            wall_times_s=walls(timed[name]), vs_stock_eager=eager[0], vs_stock_eager_ci=eager[1],
                            vs_stock_compiled=compiled[0], vs_stock_compiled_ci=compiled[1],
                            vs_stock_best=vs_best[0], vs_stock_best_ci=vs_best[1],
                            reuse_fraction=st.reuse_fraction if st is not None else None, setting=cases[name].setting(),
                            peak_memory_bytes=peak, peak_memory_method=how, complete=len(ts) == repeats,
                            warmup_s=warm.get(name, {}).get("seconds", []),
                            graphs=st.graphs if st is not None else None,
                            fallback_evaluations=st.fallback_evaluations if st is not None else None,
                            compile_seconds=warm.get(name, {}).get("compile_seconds"), **flops(st),
                            host_syncs=getattr(st, "host_syncs", None)))
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
