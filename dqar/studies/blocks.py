"""The ablation's timing blocks: which configurations are timed together, on which executor, and one block's run.

A block is the main comparison, one sweep, or the peers. Its cases are the configurations not yet
measured and, for every sampling setting among them, the baseline (and, when a configuration runs
eagerly while the baseline is compiled, the eager baseline too). Every case is warmed up once
(untimed: compilation happens there; its images and stats are the ones reported), configurations
whose timed run differs from the one that reports (INT8 error tracking off while timing) run once more
untimed with diagnostics on, then the cases are timed round-robin (dqar.studies.timing).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from dqar.engine.api import enable
from dqar.engine.config import RunConfig, SampleConfig
from dqar.errors import DqarError, first_line
from dqar.generate import Generation, generate, plan_key
from dqar.studies import grid as G
from dqar.studies.core import baseline_run
from dqar.studies.timing import Run, round_robin

EXECUTOR_PREFERENCES = ("auto", "patch")
EXECUTOR_METHOD = (
    "each configuration (the baseline included) is timed on the fastest executor that runs it here: 'compiled' "
    "(dqar's torch.compile'd block functions) wherever the engine supports the configuration, else 'patch' (eager), "
    "with the reason in the Executor column; a compiled case that fails in its warm-up falls back to 'patch' "
    "(reason given); peers run eagerly through their own packages. Speedups are against the baseline on its executor; "
    "an eager configuration also gets its speedup against the eager baseline timed in the same rounds"
)


def timed_run(run: RunConfig) -> RunConfig:
    """What is timed: the configuration with diagnostics off (no INT8 round-trip error tracking)."""
    return replace(run, reuse=replace(run.reuse, track_quant_error=False)) if run.reuse.enabled else run


def choose_executor(loaded, run: RunConfig, preference: str) -> tuple[str, str | None]:
    """('compiled' or 'patch', why not compiled) for `run`: the engine itself says whether it can compile it."""
    if preference == "patch":
        return "patch", "asked for (--executor patch)"
    try:
        with enable(loaded.transformer, run.reuse, key=plan_key(loaded.name, run), executor="compiled"):
            pass
    except DqarError as exc:
        return "patch", exc.problem
    return "compiled", None


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
    executor: str  # "compiled" | "patch" | "peer"
    note: str | None = None  # why not compiled
    entry: G.Entry | None = None  # None: a baseline that is not one of this block's records
    peer: Any = None  # a dqar.studies.peer_rows.PeerRow
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
    executor = "compiled" if case.executor == "compiled" else None  # None: the default (patch); nothing attached without reuse
    case.fn = lambda: generate(loaded, labels, timed, executor=executor)


def warm(case: Case, loaded, labels) -> None:
    """The case's untimed warm-up; a compiled case that fails here falls back to the patch executor (reason kept)."""
    try:
        case.warm = case.fn()
    except Exception as exc:
        if case.executor != "compiled":
            raise
        case.executor, case.note = "patch", f"compiled failed in its warm-up: {type(exc).__name__}: {first_line(exc)}"[:300]
        bind(case, loaded, labels)
        case.warm = case.fn()
    case.stats = case.warm.stats


def diagnose(case: Case, loaded, labels) -> bool:
    """Reuse stats from an untimed run with diagnostics on, where the timed run had them off; True when one ran."""
    if case.executor == "peer" or timed_run(case.run) == case.run:
        return False
    gen = generate(loaded, labels, case.run, executor="compiled" if case.executor == "compiled" else None)
    case.stats = gen.stats
    return True


def time_block(cases: list[Case], clock, repeats: int, device: torch.device, on_step=None) -> None:
    """Time the warmed-up cases round-robin; each run keeps whether its images equal the warm-up's."""
    by_name = {c.name: c for c in cases}
    keep = lambda name, gen: bool(torch.equal(gen.output.images, by_name[name].warm.output.images))  # noqa: E731
    runs = round_robin({c.name: c.fn for c in cases}, clock, repeats, device=device, keep=keep, on_step=on_step)
    for c in cases:
        c.runs = runs[c.name]
