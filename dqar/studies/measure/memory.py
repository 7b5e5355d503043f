"""Peak memory of one generation: CUDA allocator peak on GPU, the process's peak resident set on CPU.

GPU: `torch.cuda.reset_peak_memory_stats` before, `torch.cuda.max_memory_allocated` after — every
tensor the process holds on the device (weights included), at its highest point.
CPU (Linux): the kernel's peak-RSS counter (`VmHWM`) is reset through `/proc/self/clear_refs` before
and read from `/proc/self/status` after — everything the process holds in RAM at its highest point
(weights, Python, libraries, allocator caches included). Elsewhere on CPU: not measured (None).
"""
from __future__ import annotations

from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")

METHOD_CUDA = "torch.cuda.max_memory_allocated after reset_peak_memory_stats (device tensors, weights included)"
METHOD_CPU = "process peak resident set (Linux VmHWM, reset via /proc/self/clear_refs before each run; weights, Python and allocator caches included)"
METHOD_NONE = "not measured on this platform"


def method(device: torch.device) -> str:
    """How `measure_peak` measures on `device`, in words."""
    if device.type == "cuda":
        return METHOD_CUDA
    return METHOD_CPU if _cpu_supported_cached() else METHOD_NONE


def _cpu_supported() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return _vm("VmHWM") is not None
    except OSError:
        return False


def _vm(key: str) -> int | None:
    """A `/proc/self/status` field in bytes."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_memory(device: torch.device) -> int | None:
    """Peak allocated device bytes since the last reset (CUDA), else None."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def reset(device: torch.device) -> None:
    """Start a new peak window."""
    if device.type == "cuda":
        reset_peak_memory(device)
        return
    if _cpu_supported_cached():
        _CLEAR_REFS.write_text("5")  # resets VmHWM to the current RSS


def read_peak(device: torch.device) -> int | None:
    """Peak bytes since the last `reset`, or None where it cannot be measured."""
    if device.type == "cuda":
        return peak_memory(device)
    return _vm("VmHWM") if _SUPPORTED.get("cpu") else None  # known after the first `reset`


_SUPPORTED: dict[str, bool] = {}


def _cpu_supported_cached() -> bool:
    if "cpu" not in _SUPPORTED:
        _SUPPORTED["cpu"] = _cpu_supported()
    return _SUPPORTED["cpu"]
