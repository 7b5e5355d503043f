"""dqar: Dynamic and Quantization-Aware Attention Reuse for Diffusion Transformers."""
from dqar.engine.config import PRESETS, ReuseConfig, RunConfig, SampleConfig, load_toml, preset
from dqar.errors import DqarError

__version__ = "0.1.0"

__all__ = ["DqarError", "PRESETS", "ReuseConfig", "RunConfig", "SampleConfig", "enable", "load_toml", "preset"]


def enable(model, config=None, **kwargs):
    """Attach attention reuse to a `DiTPipeline` or `DiTTransformer2DModel`; returns a handle (see dqar.engine.api.enable)."""
    from dqar.engine.api import enable as _enable

    return _enable(model, config, **kwargs)
