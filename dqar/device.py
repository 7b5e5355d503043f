"""Device and dtype choice."""
from __future__ import annotations

import torch

from dqar.errors import DqarError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DqarError(f"unknown device '{name}'", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DqarError("CUDA was requested but no GPU is available", "use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' → fp16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise DqarError(f"unknown dtype '{name}'", "use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing boundaries only, never inside a generation)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
