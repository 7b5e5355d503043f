"""Honest timing: warm-up first, interleaved repeats, medians; CUDA events on GPU, wall clock on CPU."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from dqar.device import synchronize
from dqar.errors import first_line


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


def peak_memory(device: torch.device) -> int | None:
    """Peak allocated device bytes since the last reset (CUDA), else None."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
