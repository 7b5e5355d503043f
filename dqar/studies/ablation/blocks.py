"""The ablation's timing blocks: which configurations are timed together, on which executor, and one block's run.

A block is the main comparison, one sweep, or the peers. Its cases are the configurations not yet
measured and, for every sampling setting among them, the baseline (and, when a configuration runs
eagerly while the baseline is compiled, the eager baseline too). Every case is warmed up once
(untimed: compilation happens there; its images and stats are the ones reported), configurations
whose timed run differs from the one that reports (INT8 error tracking off while timing) run once more
untimed with diagnostics on, then the cases are timed round-robin (dqar.studies.measure.timing).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from dqar.engine.api import enable, on_cuda
from dqar.engine.config import RunConfig, SampleConfig
from dqar.errors import DqarError, first_line
from dqar.generate import Generation, generate, loaded_plan_key
from dqar.studies.ablation import grid as G
from dqar.studies.core import baseline_run
from dqar.studies.measure.timing import Run, round_robin

EXECUTOR_PREFERENCES = ("auto", "graph", "patch")
EXECUTOR_METHOD = (
    "each configuration (the baseline included) is timed on the fastest executor that runs it here: on CUDA the graph "
    "executor (one whole-model CUDA graph per plan row) where it runs the configuration; on a CPU 'compiled' "
    "(dqar's torch.compile'd block functions) wherever the engine supports the configuration — or, with --executor graph, "
    "the graph executor first there too (not the CPU default, as it compiles for minutes per configuration on a CPU) —; "
    "a model of another family (Flux, SD3, ...) on 'flow_compiled' (its stock blocks under torch.compile, one copy per "
    "block kind shared by every configuration) where the engine supports the configuration; else 'patch' (eager), "
    "with the reason in the Executor column; a compiled case that fails in its warm-up falls back to 'patch' "
    "(reason given); peers run eagerly through their own packages. Speedups are against the baseline on its executor; "
    "an eager configuration also gets its speedup against the eager baseline timed in the same rounds"
)


def timed_run(run: RunConfig) -> RunConfig:
    """What is timed: the configuration with diagnostics off (no INT8 round-trip error tracking)."""
    return replace(run, reuse=replace(run.reuse, track_quant_error=False)) if run.reuse.enabled else run


COMPILED = ("compiled", "graph", "flow_compiled")  # the executors that run torch.compile'd graphs
# the DiT's compiled executors first; "flow_compiled" (compiled stock blocks) where the model is another family
FASTEST_FIRST = {"auto": ("compiled", "flow_compiled", "patch"), "graph": ("graph", "compiled", "flow_compiled", "patch"),
                 "patch": ("patch",)}


def choose_executor(loaded, run: RunConfig, preference: str) -> tuple[str, str | None]:
    """(executor, why not the first choice) for `run`: the first of the preference's executors the engine accepts.

    'auto': on CUDA as 'graph', on a CPU compiled (flow_compiled for a non-DiT family), else patch; 'graph': the graph
    executor first (one whole-model graph per plan row: the fastest per generation, but it compiles for 0.5-2.5 minutes
    per configuration on a CPU, docs/BENCHMARKS.md); 'patch': eager.
    """
    if preference == "patch":
        return "patch", "asked for (--executor patch)"
    reasons = []
    order = FASTEST_FIRST["graph" if preference == "auto" and on_cuda(loaded.transformer) else preference]
    for executor in order:
        if executor == "patch":
            break
        try:
            with enable(loaded.transformer, run.reuse, key=loaded_plan_key(loaded, run), executor=executor):
                pass
        except DqarError as exc:
            reasons.append(exc.problem)
            continue
        return executor, "; ".join(reasons) or None
    return "patch", "; ".join(reasons)


class Refused(Exception):
    """A configuration this model's family cannot run (the engine refuses it at enable); the message is the reason."""


def refusal(loaded, run: RunConfig) -> str | None:
    """Why the engine refuses `run` on this model on every executor (checked by enabling it eagerly), or None."""
    if not run.reuse.enabled:
        return None
    try:
        with enable(loaded.transformer, run.reuse, key=loaded_plan_key(loaded, run), executor="patch"):
            pass
    except DqarError as exc:
        return str(exc)
    return None


def baseline_executor(loaded, sample: SampleConfig, preference: str) -> str:
    """The executor the baseline of `sample` is timed on."""
    return choose_executor(loaded, baseline_run(RunConfig(sample=sample)), preference)[0]


@dataclass(frozen=True)
class Block:
    name: str  # "main", a sweep's name, "peers"
    entries: tuple[G.Entry, ...]


def plan_blocks(entries: Sequence[G.Entry]) -> list[Block]:
    """Entries grouped into blocks, in run order; a sampling setting's own baseline joins the block of the entry after it."""
    groups: dict[str, list[G.Entry]] = {}
    pending: list[G.Entry] = []
    for e in entries:
        if e.role == "baseline":
            pending.append(e)
            continue
        key = "main" if e.role == "main" else e.sweep if e.role == "sweep" else "peers"
        groups.setdefault(key, []).extend([*pending, e])
        pending = []
    return [Block(k, tuple(v)) for k, v in groups.items()]


@dataclass
class Case:
    """One timed thing of a block: a configuration, or a baseline re-timed among the block's configurations."""

    name: str
    run: RunConfig  # as configured (the timed run has diagnostics off: `timed_run`)
    executor: str  # "graph" | "compiled" | "patch" | "peer"
    note: str | None = None  # why not compiled
    entry: G.Entry | None = None  # None: a baseline that is not one of this block's records
    peer: Any = None  # a dqar.studies.peers.rows.PeerRow
    fn: Callable[[], Generation] | None = None
    warm: Generation | None = None  # the untimed warm-up generation
    stats: Any = None  # reuse stats of the diagnostics run (or of the warm-up when it is the same configuration)
    runs: list[Run] = field(default_factory=list)

    @property
    def sample(self) -> SampleConfig:
        return self.run.sample


def baseline_name(sample: SampleConfig, executor: str) -> str:
    return f"baseline[{sample.steps} steps, cfg {sample.cfg:g}, {sample.sampler}, seed {sample.seed}; {executor}]"


def entry_case(loaded, labels, entry: G.Entry, preference: str) -> Case:
    """A dqar configuration's case (a baseline entry's run has reuse off: it is timed as its setting's baseline)."""
    case = Case(entry.name, entry.run, *choose_executor(loaded, entry.run, preference), entry=entry)
    bind(case, loaded, labels)
    return case


def baseline_case(loaded, labels, sample: SampleConfig, executor: str) -> Case:
    """The baseline of `sample` on `executor` ('compiled' or 'patch'), re-timed among a block's configurations."""
    case = Case(baseline_name(sample, executor), baseline_run(RunConfig(sample=sample)), executor)
    bind(case, loaded, labels)
    return case


def peer_case(entry: G.Entry, row) -> Case:
    return Case(entry.name, entry.run, "peer", "peers run eagerly through their own packages", entry, row, row.generate)


def bind(case: Case, loaded, labels) -> None:
    """Set the case's timed call: its run with diagnostics off, on its executor."""
    timed = timed_run(case.run)
    executor = case.executor if case.executor in COMPILED else "patch"  # patch: nothing attached without reuse
    case.fn = lambda: generate(loaded, labels, timed, executor=executor)


def warm(case: Case, loaded, labels) -> None:
    """The case's untimed warm-up; a compiled case that fails here falls back to the patch executor (reason kept)."""
    while True:
        try:
            case.warm = case.fn()
            break
        except Exception as exc:
            if case.executor not in COMPILED:
                raise
            failed, case.executor = case.executor, "compiled" if case.executor == "graph" else "patch"
            case.note = f"{failed} failed in its warm-up: {type(exc).__name__}: {first_line(exc)}"[:300]
            bind(case, loaded, labels)
    case.stats = case.warm.stats


def diagnose(case: Case, loaded, labels) -> bool:
    """Reuse stats from an untimed run with diagnostics on, where the timed run had them off; True when one ran."""
    if case.executor == "peer" or timed_run(case.run) == case.run:
        return False
    gen = generate(loaded, labels, case.run, executor=case.executor if case.executor in COMPILED else "patch")
    case.stats = gen.stats
    return True


def time_block(cases: list[Case], clock, repeats: int, device: torch.device, on_step=None) -> None:
    """Time the warmed-up cases round-robin; each run keeps whether its images equal the warm-up's."""
    by_name = {c.name: c for c in cases}
    keep = lambda name, gen: bool(torch.equal(gen.output.images, by_name[name].warm.output.images))  # noqa: E731
    runs = round_robin({c.name: c.fn for c in cases}, clock, repeats, device=device, keep=keep, on_step=on_step)
    for c in cases:
        c.runs = runs[c.name]
