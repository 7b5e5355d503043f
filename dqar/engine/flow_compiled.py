"""The "flow_compiled" executor: the patch executor's per-layer dispatch over compiled stock forwards.

The DiT kernels (`dqar.engine.block`) cover `BasicTransformerBlock` only. For every other family (Flux, SD3,
Qwen-Image, Wan, …) this executor keeps the patch executor's hooks, decisions, cache, CFG branches and stats
(`ReuseEngine`, `forwards.block` / `forwards.attention`) and runs each hooked module's *stock* forward (a block, or
its attention module at attention granularity) under `torch.compile`: one compiled copy per distinct (block spec,
input shape), shared by every layer of that spec and with its own dynamo cache (`variants.own_code`), so a second
generation never recompiles and no configuration storms dynamo's recompile limit. The anchored INT8 history's write
and read (`codec.rebase`, `codec.forecast_anchored`) run compiled too, one copy per (variant, shape). A reused layer
then skips compiled work, which is what makes skipped FLOPs show up as time on a CPU.

The verifying decider runs here as on patch: its probe is a hooked block like any other, so `forwards` hands the
compiled copy's output to `verify.observe` (the relative L1 and the forecast it compares with run outside the copies,
eagerly, one scalar read per deciding evaluation); a decision changes which layers call their copy, never a copy's
inputs, so none recompiles.

What it refuses at enable, in one line: the class-conditional DiT (its compiled executors are "compiled" and
"graph"), deciders that measure signals inside the forward, CFG-branch sharing, and target "kv" (those need the
patch executor's eager forwards).
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Callable

import torch

from dqar.engine import forwards
from dqar.engine.adapter import DIT_FAMILIES
from dqar.engine.codec import Codec, forecast_anchored, rebase
from dqar.engine.config import ReuseConfig
from dqar.engine.flops import shape_key
from dqar.engine.hooks import ATTENTION_HOOK, BLOCK_HOOK
from dqar.engine.reuse import ReuseEngine
from dqar.engine.variants import Variants, compiled_copy, forecast_key, rebase_key
from dqar.errors import DqarError

NAME = "flow_compiled"
_FLOPS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()  # transformer → shapes → counted FLOPs


def stock_forward(module: torch.nn.Module, *args, **kwargs) -> Any:
    """A module's class forward, past any instance hooks: what each compiled copy traces."""
    return type(module).forward(module, *args, **kwargs)


def _shape(args: tuple, kwargs: dict) -> tuple:
    """The shapes of a call's tensor arguments (positional, then keyword by name): part of a copy's key."""
    pos = tuple(tuple(a.shape) if torch.is_tensor(a) else None for a in args)
    return pos + tuple((k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if torch.is_tensor(v))


class StockForwards:
    """`torch.compile` of stock module forwards, one copy per (spec, input shapes), shared by same-spec modules."""

    def __init__(self, mode: str | None = None):
        self.mode = mode
        self.copies: dict[tuple, Callable] = {}

    def __call__(self, spec: str, module: torch.nn.Module, original: Callable, *args, **kwargs) -> Any:
        """`module`'s forward on (args, kwargs); eager where another hook lies beneath dqar's (its chain keeps acting)."""
        if getattr(original, "__func__", None) is not type(module).forward:
            return original(*args, **kwargs)
        key = (spec, _shape(args, kwargs))
        copy = self.copies.get(key)
        if copy is None:
            copy = compiled_copy(stock_forward, f"stock_{spec}_{len(self.copies)}", self.mode)
            try:
                out = copy(module, *args, **kwargs)  # the first call compiles
            except Exception as exc:  # no C++ compiler, an op dynamo cannot trace, …: one line, the copy not kept
                lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
                first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]  # dynamo's "backend=… raised:" + the cause
                raise DqarError(f"torch.compile of the stock {spec} forward failed: {first}", "use executor = 'patch'") from exc
            self.copies[key] = copy
            return out
        return copy(module, *args, **kwargs)


def stock_forwards(mode: str | None = None) -> StockForwards:
    """The process's compiled stock forwards for `mode`: every engine shares them (a new generation never recompiles)."""
    return _shared(StockForwards, mode)


@functools.lru_cache(maxsize=None)
def _shared(kind: Callable, mode: str | None):
    """One `kind(mode)` per process (positional key: `f()` and `f(None)` are one entry)."""
    return kind(mode)


def _shaped(key: Callable) -> Callable:
    """A variant key plus the first argument's shape: each compiled copy then sees one shape only."""
    return lambda *args: (*key(*args), tuple(args[0].shape))


def compiled_codec(mode: str | None = None) -> Codec:
    """The anchored history's rebase and forecast compiled, one copy per (variant, shape); this executor's own caches."""
    return _shared(_codec, mode)


def _codec(mode: str | None) -> Codec:
    return Codec(Variants(rebase, _shaped(rebase_key), mode), Variants(forecast_anchored, _shaped(forecast_key), mode), True)


def check(transformer: torch.nn.Module, cfg: ReuseConfig, decider) -> None:
    """One line for what the flow_compiled executor cannot run."""
    if type(transformer).__name__ in DIT_FAMILIES:
        raise DqarError(f"the '{NAME}' executor is the compiled path of the families the DiT kernels do not run, not "
                        f"{type(transformer).__name__}", "use executor = 'compiled' or 'graph' (or 'auto') for the DiT")
    needs = getattr(decider, "needs", None)
    if needs is not None and needs.any:
        raise DqarError(f"the gate, policies and signal traces measure inside eager forwards, not on the '{NAME}' executor",
                        "use executor = 'patch', or a plan (schedule, calibrated plan or plan file)")
    if cfg.cfg_share != "none":
        raise DqarError(f"cfg_share runs on the 'patch' executor, not '{NAME}'", "set cfg_share = 'none'")
    if cfg.target == "kv":
        raise DqarError(f"the '{NAME}' executor caches attention or block outputs, not K/V", "use target = 'attention'")


class FlowCompiledEngine(ReuseEngine):
    """`ReuseEngine` whose hooked modules run their stock forward compiled; decisions, cache and stats as on patch."""

    def __init__(self, transformer: torch.nn.Module, cfg: ReuseConfig, decider, scheduler: Any = None, mode: str | None = None):
        check(transformer, cfg, decider)
        self.stock = stock_forwards(mode)  # before the hooks attach (ReuseEngine.__init__ attaches)
        super().__init__(transformer, cfg, decider, scheduler, NAME)
        self.codec = compiled_codec(mode)  # each generation's LayerCache reads and writes through it

    def _layer_forwards(self):
        """(module, hook name, forward): the patch executor's forwards, each calling its module's compiled stock forward."""
        out = []
        for layer, block in enumerate(self.blocks):
            spec = self.layout.specs[layer]
            if self.cfg.granularity == "block":
                run = functools.partial(self._compiled, spec.kind, block)
                out.append((block, BLOCK_HOOK, functools.partial(_dispatch, forwards.block, (self, layer), run)))
            else:
                attn = self.layout.attention_module(layer)
                run = functools.partial(self._compiled, f"{spec.kind}_{spec.attention}", attn)
                out.append((attn, ATTENTION_HOOK, functools.partial(_dispatch, forwards.attention, (self, layer, attn), run)))
        return out

    def _count_flops(self, args: tuple, kwargs: dict) -> dict[str, int]:
        """Counted FLOPs per module, once per (transformer, input shapes) in the process: a generation's attachment pays
        no fake-tensor forward after the first (FLOPs depend on shapes only)."""
        counts = _FLOPS.setdefault(self.transformer, {})
        key = shape_key(args, kwargs)
        if key not in counts:
            counts[key] = super()._count_flops(args, kwargs)
        return counts[key]

    def _compiled(self, spec: str, module: torch.nn.Module, original: Callable, *args, **kwargs) -> Any:
        """The module's stock forward: compiled, or `original` while FLOPs are counted on fake tensors."""
        if self.counting:
            return original(*args, **kwargs)
        return self.stock(spec, module, original, *args, **kwargs)


def _dispatch(forward: Callable, bound: tuple, run: Callable, original: Callable, *args, **kwargs) -> Any:
    """A `LayerHook` forward: the patch forward `forward(*bound, …)` with `run(original, …)` as the module's own forward."""
    return forward(*bound, functools.partial(run, original), *args, **kwargs)
