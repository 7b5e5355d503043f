"""dqar: Dynamic and Quantization-Aware Attention Reuse for Diffusion Transformers."""
from __future__ import annotations

from dqar.engine.config import PRESETS, ReuseConfig, RunConfig, SampleConfig, load_toml, preset
from dqar.errors import DqarError

__version__ = "0.1.0"

__all__ = ["DqarError", "PRESETS", "ReuseConfig", "RunConfig", "SampleConfig", "enable", "load_toml", "preset"]


def enable(model, config=None, *, executor: str = "auto", decider=None, plan=None, key: dict | None = None):
    """Attach reuse to a diffusers pipeline or transformer (DiT, PixArt, SD3, Flux, Wan, …); returns a handle.

    `config`: a preset name, `ReuseConfig` or `RunConfig` (default `full_dqar`); `executor`: "auto" | "patch" |
    "fused" | "compiled" | "graph"; `decider`, `plan`, `key`: see `dqar.engine.api.enable`.
    """
    from dqar.engine.api import enable as _enable

    return _enable(model, config, executor=executor, decider=decider, plan=plan, key=key)
