"""What `dqar bench` does per model family: default steps and guidance, the stock loop, and the rows a family refuses."""
from __future__ import annotations

import copy
import functools
from dataclasses import replace

from dqar.engine.api import enable
from dqar.engine.config import ReuseConfig
from dqar.errors import DqarError

DEFAULTS = {"dit": (50, 4.0), "flux": (28, 1.0), "sd3": (28, 4.5)}  # (steps, cfg) when not given; Flux-dev: guidance 3.5, one forward


def family(loaded) -> str:
    """"dit", "flux" or "sd3" (dqar.models.LoadedModel.family)."""
    return getattr(loaded, "family", "dit")


def for_model(s, loaded):
    """Bench settings `s` with the family's steps and cfg where they were left None (DEFAULTS)."""
    steps, cfg = DEFAULTS[family(loaded)]
    return replace(s, steps=s.steps or steps, cfg=cfg if s.cfg is None else s.cfg)


def stock_supported(loaded) -> str | None:
    """Why diffusers' DiTPipeline cannot run this model, or None when it can."""
    if family(loaded) != "dit":
        return (f"a {loaded.family} flow model: dqar.sampling.sample_flow, bit-identical to its stock pipeline "
                "(tests/test_flow_sampling.py), fed seeded random prompt embeddings (no text encoders, no VAE)")
    if loaded.vae is None:
        return "no VAE (DiTPipeline always decodes)"
    if loaded.null_class != 1000:
        return f"{loaded.num_classes} classes (DiTPipeline hard-codes null class 1000)"
    return None


def refusal(loaded, cfg: ReuseConfig, executor: str) -> str | None:
    """Why dqar's `executor` refuses this flow model under `cfg` at enable (the engine's own line), or None; a DiT: None."""
    if family(loaded) == "dit":
        return None
    try:
        enable(loaded.transformer, cfg, executor=executor).disable()
    except DqarError as exc:
        return exc.problem
    return None


def flops(st) -> dict:
    """A row's skipped-FLOPs fraction and the speed-up it bounds, 1 / (1 - skipped) (None without dqar's stats)."""
    f = getattr(st, "flops_skipped_fraction", None) if st is not None else None
    return {"flops_skipped_fraction": f, "speedup_bound": None if f is None else 1 / max(1e-12, 1 - f)}


@functools.lru_cache(maxsize=8)
def compiled_twin(transformer, mode: str = "default"):
    """A shallow copy of a flow transformer whose calls run under torch.compile (static shapes): the same class, config,
    parameters and blocks (`sample_flow` takes the family from the class, which `torch.compile`'s wrapper hides); the
    original module's calls stay eager."""
    twin = copy.copy(transformer)  # a new module object over the same parameter, buffer and child dicts
    twin.compile(mode=mode, dynamic=False)
    return twin
