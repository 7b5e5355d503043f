"""Peer caching methods, run through their own packages on a diffusers DiT, for side-by-side comparison.

The diffusers peers are applied with diffusers' own hook functions (`apply_*`), which need only the block lists and
`TransformerBlockRegistry`, not `CacheMixin`: so they attach on every family the block adapter describes (tested on
PixArt-α / Σ, SD3 / 3.5, Flux, Wan and Qwen-Image in their stock pipelines; PixArt and SD3 have no `CacheMixin`, so
`enable_cache` itself is not offered there). FirstBlockCache is refused on SD3, whose last block drops the text stream.

A peer is a frozen config dataclass (a `[[peer]]` table of an ablation grid; unknown keys refused):

- `pab`: diffusers `PyramidAttentionBroadcast` on every layer's self/joint attention (the DiT's
  `transformer_blocks.N.attn1`; Flux's `transformer_blocks.N.attn`, `single_transformer_blocks.N.attn`,
  from the block adapter); its `current_timestep_callback` returns the scheduler timestep (0-1000) of
  the forward in progress (read once per forward by a pre-hook on the transformer; Flux's
  transformer is given timestep / 1000, as FluxPipeline does).
- `first_block_cache`: diffusers `FirstBlockCache`. Its state lives in a cache context, which
  `DiTTransformer2DModel` cannot enter itself (no `CacheMixin`): each generation runs inside
  diffusers' `CacheMixin.cache_context`, called on the transformer.
- `taylorseer`: diffusers `TaylorSeerCache` with the model's module names: target `attn1` is every
  layer's attention module (as for PAB), `ff` every block's MLP module (`ff`; Flux's dual-stream blocks
  also `ff_context`; Flux's single-stream MLP is a bare Linear fused into `proj_out`, no module of its
  own). Its default patterns (`re.fullmatch` of `^transformer_blocks.*attn`) match no module of a DiT,
  whose attention is named `attn1`. Cache context as above.
- `magcache`: diffusers `MagCache` with the magnitude ratios its own calibration mode prints,
  measured once on this model and step count (the caller runs the calibration generation).
- `cache_dit`: cache-dit's `enable_cache` (DBCache) on the transformer; optional (extra `peers`).

`attach` applies a peer to a transformer (the ablation always passes a fresh deep copy) and returns
an `Attached`: `generation()` resets the hooks' state and enters what the peer needs for one
generation, `detach()` removes every hook. `count_calls` (dqar.studies.peers.work) counts the block,
attention and MLP forwards that really ran over every layer the block adapter describes.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import importlib.util
import io
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch

from dqar.engine.adapter import describe
from dqar.engine.config import _choice, _in_range, _int_at_least, _suggest
from dqar.errors import DqarError, first_line
from dqar.studies.peers.work import COUNTED, computed_fractions, count_calls, layers  # noqa: F401  (re-exported)

CONTEXT_NAME = "dqar"  # the diffusers cache context every generation runs in (CFG is one batched forward)


# ----- peer configs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PAB:
    """diffusers PyramidAttentionBroadcast: `attn1` recomputes every `skip_range`-th call while lo < t < hi."""

    method: ClassVar[str] = "pab"
    title: ClassVar[str] = "PyramidAttentionBroadcast"
    skip_range: int = 2  # spatial_attention_block_skip_range: recompute once every this many evaluations
    timestep_range: tuple[int, int] = (100, 800)  # spatial_attention_timestep_skip_range (diffusers' default)

    def __post_init__(self) -> None:
        _int_at_least("pab.skip_range", self.skip_range, 2)
        _set_pair(self, "timestep_range")

    def attach(self, transformer: torch.nn.Module, steps: int, calibrate=None) -> "Attached":
        from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
        from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

        clock = _Clock(TIMESTEP_SCALE.get(type(transformer).__name__, 1.0))
        pre = transformer.register_forward_pre_hook(clock.read, with_kwargs=True)
        patterns = module_patterns(transformer, "attn1")
        apply_pyramid_attention_broadcast(transformer, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.skip_range,
            spatial_attention_timestep_skip_range=self.timestep_range,
            spatial_attention_block_identifiers=tuple(f"^{p}$" for p in patterns),
            current_timestep_callback=clock.now,
        ))
        return _diffusers_attached(self, transformer, (_PYRAMID_ATTENTION_BROADCAST_HOOK,), extra=pre.remove,
                                   implementation=f"apply_pyramid_attention_broadcast on {_names(patterns)}")


@dataclass(frozen=True)
class FirstBlockCache:
    """diffusers FirstBlockCache: when block 0's residual changed less than `threshold`, the other blocks reuse theirs."""

    method: ClassVar[str] = "first_block_cache"
    title: ClassVar[str] = "FirstBlockCache"
    threshold: float = 0.05  # relative mean-absolute change of block 0's residual below which the rest is skipped

    def __post_init__(self) -> None:
        _in_range("first_block_cache.threshold", self.threshold, 0.0, 10.0)

    def attach(self, transformer: torch.nn.Module, steps: int, calibrate=None) -> "Attached":
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        tail = layers(transformer)[-1]
        if getattr(tail, "context_pre_only", False):  # SD3 / 3.5: the last JointTransformerBlock drops the text stream
            raise DqarError(f"diffusers' FirstBlockCache subtracts the last block's text-stream output, which "
                            f"{type(transformer).__name__}'s last {type(tail).__name__} does not return (context_pre_only)",
                            "compare another peer on this model (pab, taylorseer, magcache)")
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=self.threshold))
        return _diffusers_attached(self, transformer, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
                                   implementation=f"apply_first_block_cache on {_lists(transformer)}, inside CacheMixin.cache_context")


TAYLORSEER_TARGETS = ("attn1", "ff")
FACTOR_DTYPES = ("model", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TaylorSeer:
    """diffusers TaylorSeerCache: outputs of `targets` forecast by a Taylor expansion between full computations."""

    method: ClassVar[str] = "taylorseer"
    title: ClassVar[str] = "TaylorSeerCache"
    cache_interval: int = 5  # a full computation every this many steps after the warm-up (diffusers' default)
    disable_cache_before_step: int = 3  # steps computed in full first
    disable_cache_after_step: int = -1  # from this step on, compute in full (-1: never)
    max_order: int = 1  # Taylor order
    targets: tuple[str, ...] = TAYLORSEER_TARGETS  # attn1: each layer's attention module; ff: each block's MLP module
    factors_dtype: str = "model"  # dtype of the stored Taylor factors (diffusers' default is bfloat16)

    def __post_init__(self) -> None:
        _int_at_least("taylorseer.cache_interval", self.cache_interval, 1)
        _int_at_least("taylorseer.disable_cache_before_step", self.disable_cache_before_step, 0)
        _int_at_least("taylorseer.disable_cache_after_step", self.disable_cache_after_step, -1)
        _int_at_least("taylorseer.max_order", self.max_order, 0)
        _choice("taylorseer.factors_dtype", self.factors_dtype, FACTOR_DTYPES)
        targets = tuple(self.targets) if isinstance(self.targets, (list, tuple)) else (self.targets,)
        if not targets:
            raise DqarError("taylorseer.targets is empty", f"list some of: {', '.join(TAYLORSEER_TARGETS)}")
        for t in targets:
            _choice("taylorseer target", t, TAYLORSEER_TARGETS)
        object.__setattr__(self, "targets", targets)

    def attach(self, transformer: torch.nn.Module, steps: int, calibrate=None) -> "Attached":
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        dtype = transformer.dtype if self.factors_dtype == "model" else getattr(torch, self.factors_dtype)
        patterns = [p for t in self.targets for p in module_patterns(transformer, t)]
        apply_taylorseer_cache(transformer, TaylorSeerCacheConfig(
            cache_interval=self.cache_interval,
            disable_cache_before_step=self.disable_cache_before_step,
            disable_cache_after_step=None if self.disable_cache_after_step < 0 else self.disable_cache_after_step,
            max_order=self.max_order,
            taylor_factors_dtype=dtype,
            cache_identifiers=patterns,
        ))
        return _diffusers_attached(self, transformer, (_TAYLORSEER_CACHE_HOOK,),
                                   implementation=f"apply_taylorseer_cache with cache_identifiers {_names(patterns)}, "
                                                  "inside CacheMixin.cache_context")


@dataclass(frozen=True)
class MagCache:
    """diffusers MagCache: skips all blocks while the accumulated magnitude-ratio error stays under `threshold`."""

    method: ClassVar[str] = "magcache"
    title: ClassVar[str] = "MagCache"
    threshold: float = 0.06  # accumulated error below which a step reuses the previous residual
    max_skip_steps: int = 3  # at most this many consecutive skipped steps
    retention_ratio: float = 0.2  # first fraction of the steps never skipped
    mag_ratios: tuple[float, ...] = ()  # per-step ratios; empty: calibrate with MagCache's calibration mode

    def __post_init__(self) -> None:
        _in_range("magcache.threshold", self.threshold, 0.0, 10.0)
        _int_at_least("magcache.max_skip_steps", self.max_skip_steps, 1)
        _in_range("magcache.retention_ratio", self.retention_ratio, 0.0, 1.0)
        ratios = tuple(self.mag_ratios) if isinstance(self.mag_ratios, (list, tuple)) else None
        if ratios is None or not all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in ratios):
            raise DqarError(f"magcache.mag_ratios = {self.mag_ratios!r}", "give a list of numbers, or leave it out to calibrate")
        object.__setattr__(self, "mag_ratios", tuple(float(r) for r in ratios))

    def attach(self, transformer: torch.nn.Module, steps: int, calibrate: Callable[[], Any] | None = None) -> "Attached":
        from diffusers.hooks import MagCacheConfig, apply_mag_cache
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

        names = (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)
        ratios = list(self.mag_ratios)
        info: dict[str, Any] = {"calibrated": False}
        if not ratios:
            if calibrate is None:
                raise DqarError("magcache has no mag_ratios and nothing to calibrate them on", "pass calibrate=, or mag_ratios")
            apply_mag_cache(transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps))
            cal = _diffusers_attached(self, transformer, names, implementation="")
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), cal.generation():
                calibrate()
            cal.detach()
            ratios = _printed_ratios(printed.getvalue(), steps)
            info = {"calibrated": True}  # ratios printed by MagCache's calibration mode (calibrate=True), one generation
        apply_mag_cache(transformer, MagCacheConfig(threshold=self.threshold, max_skip_steps=self.max_skip_steps,
                                                    retention_ratio=self.retention_ratio, num_inference_steps=steps,
                                                    mag_ratios=ratios))
        info["mag_ratios"] = [round(float(r), 6) for r in ratios]
        return _diffusers_attached(self, transformer, names, info=info,
                                   implementation=f"apply_mag_cache on {_lists(transformer)}, num_inference_steps={steps}")


@dataclass(frozen=True)
class CacheDit:
    """cache-dit DBCache (`cache_dit.enable_cache` on the transformer): F first blocks decide, the middle reuses residuals."""

    method: ClassVar[str] = "cache_dit"
    title: ClassVar[str] = "DBCache"
    fn_compute_blocks: int = 1  # Fn: first blocks always computed, their residual change decides (cache-dit's default 8 = every block of an 8-block DiT)
    bn_compute_blocks: int = 0  # Bn: last blocks always computed
    residual_diff_threshold: float = 0.08  # relative L1 change of the Fn residual below which the middle is cached
    max_warmup_steps: int = 8  # steps computed in full first
    max_cached_steps: int = -1  # at most this many cached steps per generation (-1: no limit)
    max_continuous_cached_steps: int = -1  # at most this many cached steps in a row (-1: no limit)

    def __post_init__(self) -> None:
        _int_at_least("cache_dit.fn_compute_blocks", self.fn_compute_blocks, 1)
        _int_at_least("cache_dit.bn_compute_blocks", self.bn_compute_blocks, 0)
        _in_range("cache_dit.residual_diff_threshold", self.residual_diff_threshold, 0.0, 10.0)
        _int_at_least("cache_dit.max_warmup_steps", self.max_warmup_steps, 0)
        _int_at_least("cache_dit.max_cached_steps", self.max_cached_steps, -1)
        _int_at_least("cache_dit.max_continuous_cached_steps", self.max_continuous_cached_steps, -1)

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("cache_dit") is None:
            return "cache-dit is not installed (optional: pip install --no-deps cache-dit, see docs/COMPARED.md)"
        return None

    def attach(self, transformer: torch.nn.Module, steps: int, calibrate=None) -> "Attached":
        count = len(layers(transformer))
        if self.fn_compute_blocks + self.bn_compute_blocks > count:
            raise DqarError(f"cache_dit: fn_compute_blocks + bn_compute_blocks > {count} blocks", "lower them")
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # cache-dit logs every call at INFO otherwise
        try:
            import cache_dit
        except Exception as exc:  # an optional package: any import failure means "not run"
            raise DqarError(f"cache-dit does not import ({type(exc).__name__}: {first_line(exc)})",
                            "install its dependencies, or drop the cache_dit peer") from None
        cfg = cache_dit.DBCacheConfig(
            Fn_compute_blocks=self.fn_compute_blocks, Bn_compute_blocks=self.bn_compute_blocks,
            residual_diff_threshold=self.residual_diff_threshold, max_warmup_steps=self.max_warmup_steps,
            max_cached_steps=self.max_cached_steps, max_continuous_cached_steps=self.max_continuous_cached_steps,
            enable_separate_cfg=not describe(transformer).is_dit,  # the DiT batches both CFG branches; Flux runs two forwards
            num_inference_steps=steps,
        )
        cache_dit.enable_cache(transformer, cache_config=copy.deepcopy(cfg))
        return Attached(
            peer=self, transformer=transformer,
            reset=lambda: cache_dit.refresh_context(transformer, cache_config=copy.deepcopy(cfg)),
            context=contextlib.nullcontext, remove=lambda: cache_dit.disable_cache(transformer),
            package=f"cache-dit {getattr(cache_dit, '__version__', '?')}",
            implementation="cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...)), refresh_context before each generation",
        )


PEERS: dict[str, type] = {p.method: p for p in (PAB, FirstBlockCache, TaylorSeer, MagCache, CacheDit)}


def from_table(table: Any, where: str = "peer") -> Any:
    """A peer config from a grid table `{method = "...", <setting> = value, ...}`; unknown methods and keys raise."""
    if not isinstance(table, dict):
        raise DqarError(f"{where} must be a table", 'write each peer as [[peer]] with method = "pab" (or another peer)')
    values = dict(table)
    method = values.pop("method", None)
    if method is None:
        raise DqarError(f"{where} has no method", f"add method = one of: {', '.join(PEERS)}")
    _choice("peer method", method, tuple(PEERS))
    cls = PEERS[method]
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in valid:
            raise DqarError(f"unknown key '{key}' for peer '{method}' in {where}",
                            f"{_suggest(key, valid)}valid keys: {', '.join(valid)}")
    return cls(**values)


def to_dict(peer: Any) -> dict:
    """The peer's method and every resolved setting (JSON-ready)."""
    return {"method": peer.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(peer).items()}}


def unavailable(peer: Any) -> str | None:
    """Why the peer cannot run here (its package is missing), or None."""
    check = getattr(peer, "unavailable", None)
    return check() if check is not None else None


def attach(peer: Any, transformer: torch.nn.Module, steps: int, calibrate: Callable[[], Any] | None = None) -> "Attached":
    """Apply `peer` to `transformer` (mutated: pass a copy) for generations of `steps` steps.

    `calibrate`: runs one generation on `transformer` (other seeds than the evaluated ones); peers
    that calibrate (MagCache without given ratios) call it once, before they are applied for real.
    """
    blocks = layers(transformer)
    attached = peer.attach(transformer, steps, calibrate)
    attached.blocks = blocks
    return attached


# ----- module names per family -------------------------------------------------------------------
TIMESTEP_SCALE = {"FluxTransformer2DModel": 1000.0, "QwenImageTransformer2DModel": 1000.0}  # their pipelines pass timestep / 1000
MLP_MODULES = ("ff", "ff_context", "ffn", "img_mlp", "txt_mlp")  # a block's MLP modules that TaylorSeer target 'ff' forecasts
# (DiT, PixArt, SD3, Flux dual-stream: ff [+ ff_context]; Wan: ffn; Qwen-Image: img_mlp, txt_mlp)


def module_patterns(transformer: torch.nn.Module, target: str) -> list[str]:
    """Regexes (for `re.fullmatch`) of the modules a target names: 'attn1' each layer's attention, 'ff' each MLP module."""
    out: list[str] = []
    for spec in describe(transformer).specs:
        block_list = spec.path.rpartition(".")[0]
        block = transformer.get_submodule(spec.path)
        attrs = [spec.attention] if target == "attn1" and spec.attention else \
            [m for m in MLP_MODULES if target == "ff" and hasattr(block, m)]
        for attr in attrs:
            pattern = rf"{re.escape(block_list)}\.\d+\.{attr}"
            if pattern not in out:
                out.append(pattern)
    if not out:
        raise DqarError(f"{type(transformer).__name__} has no module for target '{target}'", "choose another target")
    return out


def _names(patterns: Sequence[str]) -> str:
    """Patterns as readable module names (transformer_blocks.N.attn)."""
    return ", ".join(p.replace("\\.\\d+\\.", ".N.").replace("\\", "") for p in patterns)


def _lists(transformer: torch.nn.Module) -> str:
    """The block lists the block-level hooks walk (transformer_blocks + single_transformer_blocks)."""
    return " + ".join(dict.fromkeys(s.path.rpartition(".")[0] for s in describe(transformer).specs))


# ----- the attachment ------------------------------------------------------------------------------
@dataclass
class Attached:
    """A peer applied to one transformer."""

    peer: Any
    transformer: torch.nn.Module
    reset: Callable[[], None]  # reset the peer's state (called before every generation)
    context: Callable[[], Any]  # a context manager entered around every generation
    remove: Callable[[], None]  # remove everything the peer added
    package: str  # the library and its version, e.g. "diffusers 0.42.1"
    implementation: str  # which library call applied it, and where
    info: dict = field(default_factory=dict)  # e.g. MagCache's calibrated ratios
    blocks: list = field(default_factory=list)  # the transformer's blocks as they were before the peer was applied

    @contextlib.contextmanager
    def generation(self) -> Iterator[None]:
        """One generation: the peer's state reset first, its context entered around it."""
        self.reset()
        with self.context():
            yield

    def detach(self) -> None:
        """Remove the peer: the transformer computes exactly as before."""
        self.remove()


def _diffusers_attached(peer, transformer, hook_names: Sequence[str], implementation: str, extra=None, info=None) -> Attached:
    """An `Attached` for diffusers hooks: state reset through the root registry, diffusers' cache context per generation."""
    import diffusers
    from diffusers.hooks import HookRegistry
    from diffusers.models.cache_utils import CacheMixin

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.invalidate_child_registries_cache()  # what CacheMixin.enable_cache does after applying hooks

    def remove() -> None:
        for name in hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
        if extra is not None:
            extra()

    return Attached(peer=peer, transformer=transformer,
                    reset=lambda: registry.reset_stateful_hooks(recurse=True),
                    # DiTTransformer2DModel lacks CacheMixin; its cache_context only needs the module's hook registry
                    context=lambda: CacheMixin.cache_context(transformer, CONTEXT_NAME),
                    remove=remove, package=f"diffusers {diffusers.__version__}", implementation=implementation, info=dict(info or {}))


class _Clock:
    """The scheduler timestep of the transformer forward in progress, for PAB's `current_timestep_callback`."""

    def __init__(self, scale: float = 1.0) -> None:
        self.value: int | None = None
        self.scale = scale  # what the pipeline divided the timestep by before the transformer

    def read(self, module, args, kwargs) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)  # (B,) or a scalar
        self.value = None if t is None else round(float(torch.as_tensor(t).reshape(-1)[0]) * self.scale)  # one host read

    def now(self) -> int:
        if self.value is None:
            raise DqarError("PAB needs the timestep of each forward", "call the transformer with timestep=")
        return self.value


def _printed_ratios(text: str, steps: int) -> list[float]:
    """The ratio list MagCache's calibration mode prints at the end of a generation."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "Calibration Complete" in line:
            for cand in lines[i + 1:]:
                if cand.strip().startswith("["):
                    ratios = ast.literal_eval(cand.strip())
                    if len(ratios) == steps:
                        return [float(r) for r in ratios]
    raise DqarError(f"MagCache calibration printed no ratio list for {steps} steps",
                    "the calibration generation must run exactly num_inference_steps transformer forwards")


def _set_pair(obj, name: str) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if not ok or value[0] >= value[1]:
        raise DqarError(f"{obj.method}.{name} = {value!r} is invalid", "use two integers [lo, hi] with lo < hi")
    object.__setattr__(obj, name, tuple(value))
