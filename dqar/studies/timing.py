"""Honest timing: warm-up first, interleaved or bracketed repeats, medians; CUDA events on GPU, wall clock on CPU."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable

import torch

from dqar.device import synchronize
from dqar.errors import first_line
from dqar.studies import memory

BRACKETED_METHOD = (
    "one untimed warm-up generation of the baseline per sampling setting (its images are the fidelity reference); "
    "{each}per configuration, {repeats} timed generations between two timed baseline generations (B C×{repeats} B; "
    "the trailing B is the next configuration's leading B, so the baseline is re-timed between every two "
    "configurations); time = median of the configuration's runs; speedup = median(its two bracketing baseline "
    "runs) / median(its runs); a baseline entry is {repeats} timed baseline runs; clock: {clock}"
)
CLOCK_CUDA = "CUDA events around each generation, torch.cuda.synchronize before reading"
CLOCK_CPU = "time.perf_counter around each generation"


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one call of `fn`, device work included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def warm_up(cases: dict[str, Callable[[], object]], warmup: int = 1,
            on_step: Callable[[str], None] | None = None) -> dict[str, str]:
    """Run each case `warmup` times (compilation happens here); name → one-line error for the cases that raised."""
    errors = {}
    for name, fn in cases.items():
        for _ in range(warmup):
            try:
                fn()
            except Exception as exc:  # a backend that cannot run here (e.g. no compiler): report it, keep the rest
                errors[name] = f"{type(exc).__name__}: {first_line(exc)}"[:300]
                break
            if on_step:
                on_step(f"warm-up {name}")
    return errors


def interleaved(cases: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                on_step: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Time warmed-up cases round-robin so machine drift hits all cases alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(time_once(fn, device))
            if on_step:
                on_step(name)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


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


# ----- one configuration between two baseline runs -------------------------------------------------
def warms_each(device: torch.device) -> bool:
    """Whether every configuration gets its own untimed warm-up run: on GPU (kernel selection, compilation).

    On CPU the study's first baseline generation warms the process; every later generation attaches a
    fresh reuse handle and takes the same path each time, so the first timed run is not special.
    """
    return device.type == "cuda"


def bracketed_method(repeats: int, device: torch.device) -> str:
    """How `bracketed` times on `device`, in words."""
    each = ("on GPU one more untimed warm-up generation per configuration (its images and statistics are reported); "
            if warms_each(device) else "on CPU no per-configuration warm-up (images and statistics from the first timed run); ")
    return BRACKETED_METHOD.format(repeats=repeats, clock=CLOCK_CUDA if device.type == "cuda" else CLOCK_CPU, each=each)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, int | None, Any]:
    """(seconds, peak bytes, result) of one call of `fn`."""
    box = []
    memory.reset(device)
    seconds = time_once(lambda: box.append(fn()), device)
    return seconds, memory.read_peak(device), box[0]


def bracketed(make: Callable[[], Any], baseline: Callable[[], Any] | None, repeats: int, device: torch.device, samples: int, *,
              tick: Callable[[], None] = lambda: None, warm=None, lead: tuple | None = None) -> tuple[dict, Any, tuple]:
    """Timings of `make` bracketed by `baseline` runs, peak memory, and the generation its images come from.

    Order: [warm-up on GPU] B C×repeats B — the leading B is `lead` (seconds, peak) when the previous
    timed run was a baseline at this sampling setting, and the trailing B is returned to become the
    next configuration's lead. `baseline` None: the configuration is the baseline, timed `repeats`
    times. The reported generation is `warm` when given, else the GPU warm-up run, else the first timed
    run. `samples`: images per generation. Returns (measurements, reported generation, trailing (seconds, peak)).
    """
    if warm is None and warms_each(device):
        warm = make()
        lead = None  # no longer the previous timed run
        tick()
    runs = []  # (kind, seconds, peak, generation)
    if baseline is not None:
        runs.append(("base", *lead, None) if lead is not None else ("base", *timed(baseline, device)))
        tick()
    for _ in range(repeats):
        runs.append(("self", *timed(make, device)))
        tick()
    if baseline is not None:
        runs.append(("base", *timed(baseline, device)))
        tick()
    own = [r for r in runs if r[0] == "self"]
    other = [r for r in runs if r[0] == "base"] or own
    first = warm if warm is not None else own[0][3]
    peak, base_peak = _max_or_none(r[2] for r in own), _max_or_none(r[2] for r in other)
    med, base_med = statistics.median(r[1] for r in own), statistics.median(r[1] for r in other)
    measurements = {
        "times_s": [r[1] for r in own],
        "baseline_times_s": [r[1] for r in other],
        "median_s": med,
        "baseline_median_s": base_med,
        "time_per_sample_s": med / samples,
        "baseline_time_per_sample_s": base_med / samples,
        "speedup": 1.0 if baseline is None else base_med / med,
        "peak_memory_bytes": peak,
        "baseline_peak_memory_bytes": base_peak,
        "memory_reduction": (1.0 - peak / base_peak) if peak and base_peak else None,
        "deterministic": all(torch.equal(r[3].output.images, first.output.images) for r in own),
    }
    return measurements, first, runs[-1][1:3]


def _max_or_none(values) -> int | None:
    values = list(values)
    return None if not values or None in values else max(values)
