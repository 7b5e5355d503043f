"""`dqar smoke`: stage 0 of a GPU session. Eight steps, batch 2, each graph-executor case of bench against the same config
on the patch executor; PASS or FAIL per check and case, so a broken path costs seconds, not the GPU window.

Checks, per case: `cuda_graphs` (every pattern captured as a CUDA graph: inductor's `cudagraph_skips` unchanged and new
cudagraph-tree nodes recorded; "n/a (cpu)" without CUDA), `no_recompile` (the second generation under dynamo's
`error_on_recompile`, and no new dynamo graph), `matches_patch` (both generations' final latents within the dtype's
tolerance of the patch executor's, norm-wise), `no_host_syncs` (`ReuseStats.host_syncs == 0` in every generation with dqar attached),
`time_follows_work` (on CUDA: a reusing case's fastest synchronized generation at most 1 - skipped / 2 of no reuse's,
skipped the share of FLOPs its reuse skipped).
The cases are bench's own (`dqar.studies.bench.runner.cases_for`: the same run configs, labels and noise); generating is
`dqar.generate.generate`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import torch
from torch._dynamo.exc import RecompileError
from torch._dynamo.utils import counters

from dqar.engine.config import preset
from dqar.errors import DqarError, first_line
from dqar.studies.measure import compile_cache
from dqar.studies.bench.runner import BenchSettings, cases_for

PASS, FAIL, NA_CPU, NA = "PASS", "FAIL", "n/a (cpu)", "n/a"
CHECKS = ("cuda_graphs", "no_recompile", "matches_patch", "no_host_syncs", "time_follows_work")
REPLAYS = 3  # synchronized generations per case after the checks, the fastest kept (`time_follows_work`)
REFERENCE = "noreuse_graph"  # the case whose replays the others' are held against
CASES = ("noreuse_graph", "full_dqar_graph")
# (atol, rtol) on the final latents per dtype: inductor's fused kernels reorder sums, INT8 codes may differ by one
TOLERANCES = {torch.float16: (2e-2, 2e-2), torch.bfloat16: (5e-2, 5e-2), torch.float32: (1e-4, 1e-4)}


@dataclass(frozen=True)
class SmokeSettings:
    """What `dqar smoke` runs: graph-executor cases of bench (`noreuse_graph`, `<preset>_graph`) at one small batch."""

    steps: int = 8  # enough for a forecast over a full history (full_dqar: three slots) — at 2 no weights are computed
    batch: int = 2  # images per generation (CFG doubles the rows)
    cfg: float = 4.0
    seed: int = 0
    cases: tuple[str, ...] = CASES
    atol: float | None = None  # None: TOLERANCES of the model's dtype
    rtol: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise DqarError(f"steps {self.steps}, batch {self.batch} are invalid", "use positive integers, e.g. --steps 2 --batch 2")
        if not self.cases:
            raise DqarError("no smoke case given", f"use some of: noreuse_graph, <preset>_graph (default {' '.join(CASES)})")
        for name in self.cases:
            if not name.endswith("_graph"):
                raise DqarError(f"smoke case '{name}' is not a graph-executor case", "use noreuse_graph or <preset>_graph")
            if name != "noreuse_graph":
                p = name.removesuffix("_graph")
                if preset(p).cfg_share != "none":
                    raise DqarError(f"preset '{p}' shares CFG halves, which only the patch executor runs", "choose another preset")
        for tol in (self.atol, self.rtol):
            if tol is not None and tol < 0:
                raise DqarError(f"tolerance {tol} is invalid", "use a tolerance >= 0")
        self.bench()  # bench's own checks of the cases, before any model loads

    def bench(self) -> BenchSettings:
        """Bench settings whose cases are these graph cases and their patch twins (`_eager`), nothing compiled besides."""
        presets = tuple(dict.fromkeys(n.removesuffix("_graph") for n in self.cases if n != "noreuse_graph"))
        twins = tuple(patch_twin(n) for n in self.cases)
        return BenchSettings(batch_sizes=(self.batch,), steps=self.steps, cfg=self.cfg, seed=self.seed, warmup=1, presets=presets,
                             executors=("eager", "graph"), peers=(), stock=False, cases=self.cases + twins)


def patch_twin(case: str) -> str:
    """The bench case with the same config on the patch executor: `<x>_graph` → `<x>_eager`."""
    return case.removesuffix("_graph") + "_eager"


def tolerance(s: SmokeSettings, dtype: torch.dtype) -> tuple[float, float]:
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float16])
    return (atol if s.atol is None else s.atol), (rtol if s.rtol is None else s.rtol)


def run_smoke(loaded, device: torch.device, s: SmokeSettings, log: Callable[[str], None] = print,
              on_update: Callable[[dict], None] | None = None, cache_path=None) -> dict:
    """Run every case and its checks; `log` gets one line per check and case as it is decided, `on_update` the result
    after every case. The compile cache (`dqar.studies.measure.compile_cache`, `cache_path` or $DQAR_COMPILE_CACHE) is loaded
    first and saved after every case. Returns the JSON-ready result; `result["passed"]` is False on any FAIL."""
    dtype = loaded.transformer.dtype
    atol, rtol = tolerance(s, dtype)
    result: dict[str, Any] = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": loaded.name,
                              "device": str(device), "dtype": str(dtype), "torch": torch.__version__, "settings": asdict(s),
                              "tolerance": {"atol": atol, "rtol": rtol}, "cases": {}, "passed": True,
                              "compile_cache": {"load": compile_cache.load(cache_path, log=log), "save": None}}
    cases = cases_for(loaded, s.batch, s.bench())
    for name in s.cases:
        seen = _case(cases[name], cases[patch_twin(name)], device, atol, rtol)
        reference = result["cases"].get(REFERENCE, {}).get("replay_s")
        seen["checks"]["time_follows_work"] = _time_follows_work(name, seen, reference, device)
        result["cases"][name] = seen
        for check in CHECKS:
            c = seen["checks"][check]
            log(f"{c['status']:<4} {name} {check}: {c['detail']}")
        log(_timing_line(name, seen))
        result["passed"] = result["passed"] and all(c["status"] != FAIL for c in seen["checks"].values())
        result["compile_cache"]["save"] = compile_cache.save(cache_path, log=log)
        if on_update:
            on_update(result)
    return result


@dataclass
class _Seen:
    """What one case's runs left: the generations, seconds, the counters' changes and any error."""

    generations: list = field(default_factory=list)  # [patch, graph first, graph second]
    seconds: list = field(default_factory=list)
    skips: int = 0  # inductor cudagraph_skips added over both graph generations
    skip_reasons: list = field(default_factory=list)  # inductor's "skipping cudagraphs due to ..." lines meanwhile
    captured: int | None = None  # cudagraph-tree nodes recorded (None: not countable)
    new_graphs_second: int = 0  # dynamo graphs compiled during the second generation
    error: str | None = None
    recompiled: str | None = None  # the RecompileError of the second generation
    replay_s: float | None = None  # the fastest of REPLAYS synchronized graph generations after the checks


class _Lines(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextlib.contextmanager
def _skip_reasons(into: list):
    """Collect inductor's CUDA-graph skip reasons (its `cudagraphs` artifact logger) into `into`."""
    try:
        from torch._inductor.cudagraph_utils import cudagraphs_log
    except ImportError:  # a torch without it: the counter alone tells
        yield
        return
    handler = _Lines(into)
    cudagraphs_log.addHandler(handler)
    try:
        yield
    finally:
        cudagraphs_log.removeHandler(handler)


def _case(graph, patch, device: torch.device, atol: float, rtol: float) -> dict:
    seen = _Seen()
    skips0, nodes0 = counters["inductor"]["cudagraph_skips"], _cudagraph_nodes(device)
    with _skip_reasons(seen.skip_reasons):
        _generations(seen, graph, patch)
    seen.skips = counters["inductor"]["cudagraph_skips"] - skips0
    nodes1 = _cudagraph_nodes(device)
    seen.captured = None if nodes0 is None or nodes1 is None else nodes1 - nodes0
    return _report(seen, graph, device, atol, rtol)


def _generations(seen: _Seen, graph, patch) -> None:
    """Patch once, graph twice (the second under error_on_recompile), into `seen`; an error stops and is kept."""
    try:
        for run in (patch.run, graph.run):
            start = time.perf_counter()
            seen.generations.append(run())
            seen.seconds.append(time.perf_counter() - start)
        graphs0 = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                seen.generations.append(graph.run())
        except RecompileError as exc:
            seen.recompiled = first_line(exc)
        seen.seconds.append(time.perf_counter() - start)
        seen.new_graphs_second = counters["stats"]["unique_graphs"] - graphs0
        if not seen.recompiled:
            seen.replay_s = min(_synchronized(graph.run) for _ in range(REPLAYS))
    except Exception as exc:  # noqa: BLE001 - a broken case is what the smoke reports
        seen.error = f"{type(exc).__name__}: {first_line(exc)}"


def _synchronized(run: Callable) -> float:
    """Seconds of one generation, the device's queue drained before and after (CUDA work runs asynchronously)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


def _report(seen: _Seen, graph, device: torch.device, atol: float, rtol: float) -> dict:
    gens = seen.generations
    why = seen.error or ("the second generation stopped on a recompile" if seen.recompiled else "")
    checks = {c: _check(FAIL, f"not reached ({why})") for c in CHECKS}
    if len(gens) >= 2 or device.type != "cuda":
        checks["cuda_graphs"] = _cuda_graphs(seen, gens[1].stats if len(gens) >= 2 else None, device)
    if len(gens) == 3 or seen.recompiled:
        checks["no_recompile"] = _recompiles(seen)
    if len(gens) == 3:
        checks["matches_patch"] = _matches(gens[0].output.latents, [g.output.latents for g in gens[1:]], atol, rtol)
        checks["no_host_syncs"] = _host_syncs(gens)
    st = gens[-1].stats if len(gens) >= 2 else None
    return {"checks": checks, "executor": gens[-1].executor if len(gens) >= 2 else None, "setting": graph.setting(),
            "seconds": [round(t, 3) for t in seen.seconds], "error": seen.error,
            "stats": None if st is None else {k: getattr(st, k) for k in ("graphs", "fallback_evaluations", "compile_seconds",
                                                                         "reuse_fraction", "flops_skipped_fraction",
                                                                         "host_syncs", "evaluations")},
            "cudagraph_skips": seen.skips, "cudagraph_skip_reasons": seen.skip_reasons[:5], "cudagraph_nodes": seen.captured, "new_graphs_second": seen.new_graphs_second,
            "replay_s": None if seen.replay_s is None else round(seen.replay_s, 5)}


def _timing_line(name: str, seen: dict) -> str:
    """Seconds of the patch run and both graph generations (the first compiles), for sizing the stages after it."""
    secs = ", ".join(f"{who} {t:.1f} s" for who, t in zip(("patch", "graph 1 (compiles)", "graph 2"), seen["seconds"]))
    st = seen["stats"] or {}
    return (f"     {name}: {secs or 'nothing ran'}; graphs {st.get('graphs', '–')}, fallbacks {st.get('fallback_evaluations', '–')}, "
            f"reuse {st.get('reuse_fraction', 0.0):.0%}")


def _time_follows_work(name: str, seen: dict, reference: float | None, device: torch.device) -> dict:
    """A reusing case's fastest replay against no reuse's: at most 1 - skipped / 2 of its time (skipped: the FLOPs share
    its reuse skipped), so at least half of the skipped work shows up as time (on the H200, 2026-12-04, full_dqar skipped
    64% of the FLOPs and ran 1.10x no reuse's time: host-bound)."""
    reuse = (seen["stats"] or {}).get("flops_skipped_fraction") or 0.0
    if name == REFERENCE or not reuse:
        return _check(NA, "no reuse: the reference" if name == REFERENCE else "nothing reused")
    if device.type != "cuda":
        return _check(NA_CPU, "timed on CUDA only (a CPU's compute hides the host's bookkeeping)")
    if reference is None:
        return _check(NA, f"no {REFERENCE} case before it to compare with")
    if seen["replay_s"] is None:
        return _check(FAIL, "not timed: its generations did not finish")
    ratio, bound = seen["replay_s"] / reference, 1.0 - reuse / 2
    detail = (f"{seen['replay_s'] * 1e3:.1f} ms per generation, {ratio:.2f}x {REFERENCE}'s {reference * 1e3:.1f} ms "
              f"(bound {bound:.2f}: {reuse:.0%} of the FLOPs skipped)")
    return _check(PASS if ratio <= bound else FAIL, detail)


def _check(status: str, detail: str) -> dict:
    return {"status": status, "detail": detail}


def _cuda_graphs(seen: _Seen, st, device: torch.device) -> dict:
    if device.type != "cuda":
        return _check(NA_CPU, "no CUDA graphs on this device")
    graphs = st.graphs if st is not None else 0
    if seen.skips:
        why = f": {seen.skip_reasons[0]}" if seen.skip_reasons else " (counters['inductor']['cudagraph_skips'])"
        return _check(FAIL, f"inductor skipped {seen.skips} CUDA graph(s){why}")
    if graphs == 0 or st.fallback_evaluations:
        return _check(FAIL, f"{graphs} whole-model graphs, {st.fallback_evaluations if st else 0} fallback evaluations")
    if seen.captured == 0:
        return _check(FAIL, f"{graphs} graphs ran, but no CUDA graph was recorded")
    recorded = "an uncounted number of" if seen.captured is None else str(seen.captured)
    return _check(PASS, f"{graphs} whole-model graphs, {recorded} CUDA graphs recorded, 0 skips")


def _recompiles(seen: _Seen) -> dict:
    if seen.recompiled:
        return _check(FAIL, f"the second generation recompiled: {seen.recompiled}")
    if seen.new_graphs_second:
        return _check(FAIL, f"the second generation compiled {seen.new_graphs_second} new dynamo graph(s)")
    return _check(PASS, "second generation under error_on_recompile, 0 new dynamo graphs")


def _matches(want: torch.Tensor, got: list[torch.Tensor], atol: float, rtol: float) -> dict:
    """Every graph generation's final latents (N, C, h, w) against the patch executor's, norm-wise: ||a - b|| <= atol
    sqrt(n) + rtol ||b|| (isclose's bound on the whole tensor: in fp16 a 28-block network's fused kernels move single
    elements past an elementwise bound, not the tensor); a non-finite value equal only to the same value in patch's.
    The detail also names the largest elementwise difference and how many elements an elementwise bound would miss."""
    ref = want.float()
    worst, worst_rel, bad, fails = 0.0, 0.0, 0, 0
    for g in got:
        g = g.float()
        finite = torch.isfinite(g) & torch.isfinite(ref)  # (N, C, h, w)
        off = ~torch.isfinite(ref)  # (N, C, h, w): patch's non-finite values, matched position and value (NaN = NaN)
        same_nonfinite = torch.equal(~torch.isfinite(g), off) and torch.equal(g[off].nan_to_num(0.0, 1.0, -1.0),
                                                                              ref[off].nan_to_num(0.0, 1.0, -1.0))
        diff = (g - ref)[finite]
        dist, size = float(diff.norm()), float(ref[finite].norm())
        worst = max(worst, float(diff.abs().max()) if diff.numel() else 0.0)
        worst_rel = max(worst_rel, dist / size if size else dist)
        bad += int((~torch.isclose(g, ref, rtol=rtol, atol=atol, equal_nan=True)).sum())
        fails += int(not same_nonfinite or dist > atol * diff.numel() ** 0.5 + rtol * size)
    detail = (f"||graph - patch|| / ||patch|| {worst_rel:.3g}, max |graph - patch| {worst:.3g} over {len(got)} generations "
              f"(norm-wise atol {atol:g}, rtol {rtol:g})")
    nonfinite = int((~torch.isfinite(ref)).sum())
    detail += f", {nonfinite} non-finite values in patch's latents" if nonfinite else ""
    detail += f", {bad} elements outside the elementwise bound" if bad else ""
    return _check(FAIL if fails else PASS, detail)


def _host_syncs(gens) -> dict:
    """Host syncs of every generation with dqar attached (the patch twin of no reuse has nothing attached)."""
    syncs = {who: g.stats.host_syncs for who, g in zip(("patch", "graph 1", "graph 2"), gens) if g.stats is not None}
    if not syncs:
        return _check(FAIL, "no dqar stats: nothing of dqar ran")
    detail = "host syncs per generation: " + ", ".join(f"{who} {n}" for who, n in syncs.items())
    return _check(FAIL if any(syncs.values()) else PASS, detail)


def _cudagraph_nodes(device: torch.device) -> int | None:
    """CUDA graphs recorded so far in inductor's cudagraph tree of `device` (0 off CUDA; None if not countable)."""
    if device.type != "cuda":
        return 0
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
        if manager is None:
            return 0
        nodes, count = [n for roots in manager.roots.values() for n in roots], 0
        while nodes:
            node = nodes.pop()
            count += 1
            nodes.extend(c for children in node.children.values() for c in children)
        return count
    except Exception:  # noqa: BLE001 - a private structure: report "uncounted" instead
        return None
