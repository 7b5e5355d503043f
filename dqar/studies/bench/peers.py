"""`dqar bench` peer rows: a diffusers caching method on its own copy of the transformer, under the best compile it tolerates.

Each peer (dqar.studies.peers.methods) is attached to a deep copy of the transformer on its first call (the
warm-up; MagCache calibrates its ratios there, on other seeds), and that copy is tried under
`torch.compile` (default mode, static shapes) with the peer's hooks attached — diffusers' hooks break
the graph where they decide on tensors. If the compiled generation raises in the warm-up, the row
falls back to eager and its `setting` says why; a failure after the warm-up is an error.

Flow models: each peer is diffusers' own config for the family through `transformer.enable_cache` (Flux; SD3's
transformer has no `enable_cache` in diffusers 0.42.1, so its peer rows are not applicable, `flow_peer_refusal`), at
diffusers' defaults (`flow_peer`): FirstBlockCache (threshold 0.05), TaylorSeerCache (its default attention patterns),
PyramidAttentionBroadcast (its default block patterns, skip range 2, timesteps 100-800 on the scheduler's [0, 1000]
scale) and MagCache with ratios from its own calibration mode, measured once on this model (other seeds).
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from typing import Any, Callable

import torch

from dqar.errors import DqarError, first_line
from dqar.generate import generate
from dqar.sampling import FLOW_FAMILIES
from dqar.studies.peers import methods as P
from dqar.studies.bench.family import compiled_twin
from dqar.studies.core import other_seeds
from dqar.studies.peers.rows import attach_peer, model_copy

PEERS: dict[str, Callable[[], Any]] = {m: P.PEERS[m] for m in ("pab", "first_block_cache", "taylorseer", "magcache")}  # diffusers' own, default settings
PREFIX = "peer_"
COMPILED = ("torch.compile (default mode, static shapes) with the peer's diffusers hooks attached (graph breaks at the hooks; "
            "frames past dynamo's recompile limit run eagerly)")
EAGER = "eager (compile rows off)"
EAGER_TWIN = "eager: the peer without torch.compile, beside its compiled row"


def check_peers(names) -> None:
    """Refuse an unknown peer name (one line)."""
    for name in names:
        if name not in PEERS:
            raise DqarError(f"unknown peer '{name}'", f"use some of: {', '.join(PEERS)}")


def compile_model(transformer: torch.nn.Module) -> torch.nn.Module:
    """The peer's transformer under torch.compile (its hooks run inside the compiled call); a flow model's keeps its class."""
    if any(c.__name__ in FLOW_FAMILIES for c in type(transformer).__mro__):  # sample_flow reads the family off the class
        return compiled_twin(transformer)
    return torch.compile(transformer, dynamic=False)


class PeerCase:
    """One generation closure for a peer; `setting` says how it ran (compiled, or eager and why)."""

    def __init__(self, loaded, labels, run, name: str, compile: bool):
        self.loaded, self.labels, self.run, self.name, self.compile = loaded, list(labels), run, name, compile
        self.attached = self.model = self.eager = None
        self.setting = COMPILED if compile else EAGER
        self.calls = 0

    def _attach(self) -> None:
        """Copy the transformer and apply the peer (MagCache: calibrated here, eagerly, on other seeds)."""
        if getattr(self.loaded, "family", "dit") != "dit":
            self.eager = model_copy(self.loaded)
            self.attached = flow_peer(self.name, self.eager, self.labels, self.run)
        else:
            row = attach_peer(PEERS[self.name](), model_copy(self.loaded), self.labels, self.run)
            self.attached, self.eager = row.attached, row.loaded
        self.model = replace(self.eager, transformer=compile_model(self.eager.transformer)) if self.compile else self.eager

    def _generate(self):
        with self.attached.generation():
            return generate(self.model, self.labels, self.run)

    def __call__(self):
        first = self.calls == 0
        self.calls += 1
        if first:
            self._attach()
        try:
            return self._generate()
        except Exception as exc:  # noqa: BLE001 - compiling foreign hooks: fall back in the warm-up only
            if not first or self.model is self.eager:
                raise
            self.model = self.eager
            self.setting = f"eager: torch.compile failed in the warm-up ({_why(exc)})"[:300]
            return self._generate()


def _why(exc: BaseException) -> str:
    """The error in one line, with its root cause where it wraps one (dynamo's BackendCompilerFailed does)."""
    root, seen = exc, {id(exc)}
    while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None and id(inner) not in seen:
        root = inner
        seen.add(id(root))
    own = f"{type(exc).__name__}: {first_line(exc)}"
    return own if root is exc else f"{own} {type(root).__name__}: {first_line(root)}"


def flow_peer_refusal(loaded) -> str | None:
    """Why diffusers' caching peers do not run on this flow model (no `enable_cache`), or None."""
    from diffusers.models.cache_utils import CacheMixin

    if isinstance(loaded.transformer, CacheMixin):
        return None
    import diffusers

    return (f"{type(loaded.transformer).__name__} has no enable_cache (CacheMixin) in diffusers "
            f"{diffusers.__version__} (diffusers does not offer its caching hooks for this family)")


def flow_peer(name: str, model, labels, run) -> P.Attached:
    """`name` on a flow model's transformer (a copy) through its `enable_cache`, with diffusers' config for the peer."""
    import diffusers
    from diffusers.hooks import (FirstBlockCacheConfig, HookRegistry, MagCacheConfig, PyramidAttentionBroadcastConfig,
                                 TaylorSeerCacheConfig)
    from diffusers.models.cache_utils import CacheMixin

    t, steps = model.transformer, run.sample.steps
    registry = HookRegistry.check_if_exists_or_initialize(t)
    clock, info, remove = _FlowClock(model.family), {}, []
    if name == "first_block_cache":
        config = FirstBlockCacheConfig(threshold=P.FirstBlockCache().threshold)
    elif name == "taylorseer":
        config = TaylorSeerCacheConfig(taylor_factors_dtype=t.dtype)  # diffusers' patterns; factors in the model dtype
    elif name == "pab":
        remove.append(t.register_forward_pre_hook(clock.read, with_kwargs=True).remove)
        config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=P.PAB().skip_range,
                                                 spatial_attention_timestep_skip_range=P.PAB().timestep_range,
                                                 current_timestep_callback=clock.now)
    else:  # magcache: its calibration mode prints the ratios of one generation on other seeds
        t.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), CacheMixin.cache_context(t, P.CONTEXT_NAME):
            generate(model, labels, other_seeds(run))
        t.disable_cache()
        ratios = P._printed_ratios(printed.getvalue(), steps)
        info = {"calibrated": True, "mag_ratios": [round(float(r), 6) for r in ratios]}
        m = P.MagCache()
        config = MagCacheConfig(threshold=m.threshold, max_skip_steps=m.max_skip_steps, retention_ratio=m.retention_ratio,
                                num_inference_steps=steps, mag_ratios=ratios)
    t.enable_cache(config)
    return P.Attached(peer=PEERS[name](), transformer=t, reset=lambda: registry.reset_stateful_hooks(recurse=True),
                      context=lambda: CacheMixin.cache_context(t, P.CONTEXT_NAME),  # SD3's loop sets none; Flux's sets "cond"
                      remove=lambda: (t.disable_cache(), *(r() for r in remove)), package=f"diffusers {diffusers.__version__}",
                      implementation=f"transformer.enable_cache({type(config).__name__}(...)), inside cache_context", info=info)


class _FlowClock:
    """The scheduler timestep (in [0, 1000]) of the forward in progress, for PAB; Flux's transformer gets t / 1000."""

    def __init__(self, family: str) -> None:
        self.scale, self.value = (1000.0 if family == "flux" else 1.0), None

    def read(self, module, args, kwargs) -> None:
        t = kwargs.get("timestep")
        self.value = None if t is None else int(round(float(t.reshape(-1)[0]) * self.scale))  # one host read per forward

    def now(self) -> int:
        if self.value is None:
            raise DqarError("PAB needs the timestep of each forward", "call the transformer with timestep=")
        return self.value
