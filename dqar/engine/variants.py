"""`torch.compile` with one compiled copy per static variant of a function's arguments.

Dynamo keeps one cache per code object and stops compiling it after `recompile_limit` (8)
specializations; a process that runs many configurations (quantization modes, forecast orders,
history lengths) through one shared compiled function passes that and silently falls back to eager.
Here each static variant (a key computed on the host from the arguments) gets its own code object,
so its own cache: only shapes and dtypes specialize within one copy.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch


def own_code(fn: Callable, name: str) -> Callable:
    """`fn` with its own code object named `name` (its own dynamo cache), same globals, defaults and closure."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__, fn.__closure__)


def compiled_copy(fn: Callable, name: str, mode: str | None = None) -> Callable:
    """`torch.compile` (static shapes, `mode`) of `fn` under its own code object: its dynamo cache holds only its own entries."""
    return torch.compile(own_code(fn, name), dynamic=False, mode=mode)


class Variants:
    """Call `fn` compiled (static shapes, `mode`), one compiled copy per `key(*args)`."""

    def __init__(self, fn: Callable, key: Callable[..., tuple], mode: str | None = None):
        self.fn, self.key, self.mode = fn, key, mode
        self.copies: dict[tuple, Callable] = {}

    def __call__(self, *args: Any) -> Any:
        k = self.key(*args)
        copy = self.copies.get(k)
        if copy is None:
            copy = self.copies[k] = compiled_copy(self.fn, f"{self.fn.__name__}_v{len(self.copies)}", self.mode)
        return copy(*args)


def rebase_key(x, anchor, kept, mode, heads, track) -> tuple:
    """What `codec.rebase` specializes on besides shapes: history length, INT8 mode, heads, error tracking."""
    return anchor is None, len(kept), mode, heads, track


def forecast_key(anchor_values, anchor_scale, values, scales, mode, weights, dtype) -> tuple:
    """What `codec.forecast_anchored` specializes on besides shapes: history length, INT8 mode, output dtype."""
    return len(values), mode, dtype
