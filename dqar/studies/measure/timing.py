"""Honest timing: one clock per device, one warm-up per case, repeats interleaved round-robin across the cases.

CPU: the CPU time of the sampling thread (`time.thread_time`); with one torch thread every kernel runs
in that thread, so time the scheduler gives to other processes is not counted. Wall time is read beside
it. With more torch threads the clock is wall time. CUDA: events around each generation, wall time beside. A clock is an object with `name`, `description` and
`measure(fn) -> (result, Timing)`; tests inject their own.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dqar.device import synchronize
from dqar.errors import first_line
from dqar.studies.measure import memory

CLOCK_THREAD = "CPU time of the sampling thread (time.thread_time, one torch thread); wall time (time.perf_counter) beside it"
CLOCK_WALL = ("wall time (time.perf_counter): with {threads} torch threads one thread's CPU time misses the others' work and the "
              "process's counts their idle spinning")
CLOCK_CUDA = "CUDA events around each generation (read after the end event synchronizes); wall time beside it"
ORDER = ("per block (the main comparison, each sweep, the peers), one untimed warm-up generation of every case "
         "(compilation happens there), then {repeats} rounds; each round times every case of the block once — its "
         "configurations and the baseline of each sampling setting among them — starting one case later than the round before")


@dataclass(frozen=True)
class Timing:
    """One timed call: `seconds` on the device's clock, `wall` beside it."""

    seconds: float
    wall: float


class ThreadClock:
    """CPU time of the calling thread (one torch thread), else wall time; wall time beside it."""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self.name = "thread_time" if threads == 1 else "wall"
        self.description = CLOCK_THREAD if threads == 1 else CLOCK_WALL.format(threads=threads)
        self._cpu = time.thread_time if threads == 1 else time.perf_counter

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, Timing]:
        w0, c0 = time.perf_counter(), self._cpu()
        out = fn()
        return out, Timing(self._cpu() - c0, time.perf_counter() - w0)


class CudaClock:
    """CUDA events around the call, with wall time."""

    name = "cuda_events"
    description = CLOCK_CUDA

    def __init__(self, device: torch.device):
        self.device = device

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, Timing]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(self.device)
        w0 = time.perf_counter()
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return out, Timing(start.elapsed_time(end) / 1000.0, time.perf_counter() - w0)


def clock_for(device: torch.device):
    """The clock `device` is timed with (CPU: read the torch thread count now, while timing is set up)."""
    return CudaClock(device) if device.type == "cuda" else ThreadClock(torch.get_num_threads())


def order_method(repeats: int) -> str:
    return ORDER.format(repeats=repeats)


# ----- warm-up and rounds --------------------------------------------------------------------------
def warm_up(cases: dict[str, Callable[[], object]], warmup: int = 1,
            on_step: Callable[[str], None] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Run each case `warmup` times (compilation happens here): (name → last result, name → one-line error of those that raised)."""
    results, errors = {}, {}
    for name, fn in cases.items():
        for _ in range(warmup):
            try:
                results[name] = fn()
            except Exception as exc:  # a backend that cannot run here (e.g. no compiler): report it, keep the rest
                errors[name] = f"{type(exc).__name__}: {first_line(exc)}"[:300]
                results.pop(name, None)
                break
            if on_step:
                on_step(f"warm-up {name}")
    return results, errors


@dataclass(frozen=True)
class Run:
    """One timed generation: its timing, peak memory (None where not measured) and what `keep` made of its result."""

    timing: Timing
    peak: int | None
    kept: Any = None


def round_robin(cases: dict[str, Callable[[], Any]], clock, repeats: int, *, device: torch.device | None = None,
                keep: Callable[[str, Any], Any] | None = None, on_step: Callable[[str], None] | None = None,
                runs: dict[str, list[Run]] | None = None) -> dict[str, list[Run]]:
    """`repeats` rounds timing every (warmed-up) case once; round k starts at case k, so no case always runs first.

    Drift of a shared machine then hits every case alike, and the i-th runs of two cases are neighbours
    in time (a pair the bootstrap resamples together). `device`: peak memory around each run.
    `keep(name, result)`: what to retain of a result (outside the timed call); None keeps nothing.
    `runs`: the caller's name → runs to append to (so `on_step` can read the rounds so far); default a new one.
    """
    names = list(cases)
    runs = {n: [] for n in names} if runs is None else runs
    for k in range(repeats):
        for i in range(len(names)):
            name = names[(i + k) % len(names)]
            runs[name].append(measure_once(cases[name], clock, device, (lambda r, n=name: keep(n, r)) if keep else None))
            if on_step:
                on_step(name)
    return runs


def measure_once(fn: Callable[[], Any], clock, device: torch.device | None = None,
                 keep: Callable[[Any], Any] | None = None) -> Run:
    """One timed call of `fn` on `clock`; `device`: its allocator peak (reset before); `keep(result)`: what to retain."""
    if device is not None:
        memory.reset(device)
    result, timing = clock.measure(fn)
    peak = memory.read_peak(device) if device is not None else None
    return Run(timing, peak, keep(result) if keep else None)


def seconds(runs: list[Run]) -> list[float]:
    return [r.timing.seconds for r in runs]


def walls(runs: list[Run]) -> list[float]:
    return [r.timing.wall for r in runs]


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def relative_range(values: list[float]) -> float | None:
    """(slowest − fastest) / median: the spread of repeated timings of one case; None for fewer than two."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) >= 2 else None


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
