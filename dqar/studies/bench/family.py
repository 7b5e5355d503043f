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
    """Bench settings `s` with the model's steps and cfg where they were left None (dqar.models.SAMPLE_DEFAULTS by name,
    else the family's DEFAULTS)."""
    from dqar.models import SAMPLE_DEFAULTS

    steps, cfg = DEFAULTS[family(loaded)]
    own = SAMPLE_DEFAULTS.get(getattr(loaded, "name", None), {})
    steps, cfg = own.get("steps", steps), own.get("cfg", cfg)
    return replace(s, steps=s.steps or steps, cfg=cfg if s.cfg is None else s.cfg)


def bench_model(model: str | None, resolution: int | None) -> str | None:
    """The model `dqar bench --model M --resolution PX` loads, checked before it loads: a random flow shape at `M@PX`, a random
    DiT-XL/2 at its 256 or 512 px shape; any other DiT (and embedded-flux, trained at one size) is refused in one line."""
    from dqar.models import RANDOM_DIT_XL2, RANDOM_FLOW

    if resolution is None:
        return model
    if resolution < 16 or resolution % 16:
        raise DqarError(f"--resolution {resolution} is invalid", "use a positive multiple of 16 pixels, e.g. --resolution 512")
    name = str(model or "embedded")
    base, _, px = name.partition("@")
    if base in RANDOM_DIT_XL2 and not px:
        shapes = {r: n for n, r in RANDOM_DIT_XL2.items()}
        if resolution not in shapes:
            raise DqarError(f"random DiT-XL/2 shapes come at {' and '.join(map(str, shapes))} px, not {resolution}",
                            f"use --resolution {' or '.join(map(str, shapes))}")
        return shapes[resolution]
    if base not in RANDOM_FLOW:
        raise DqarError(f"--resolution sets a random model's image side; {name} samples at the resolution it was built or trained at",
                        f"drop --resolution, or use one of: {', '.join((*RANDOM_DIT_XL2, *RANDOM_FLOW))}")
    if px and px != str(resolution):
        raise DqarError(f"--resolution {resolution} contradicts the model name {name}", f"pass one of them, e.g. --model {base}")
    c = RANDOM_FLOW[base].config
    if c.get("pos_embed_max_size") and resolution // 8 // c["patch_size"] > c["pos_embed_max_size"]:  # SD3 crops a fixed grid
        top = c["pos_embed_max_size"] * c["patch_size"] * 8
        raise DqarError(f"{base}'s position embedding covers at most {top} px, not {resolution}", f"use --resolution {top} or less")
    return f"{base}@{resolution}"


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
    """Why dqar's `executor` refuses this flow model under `cfg` at enable (the engine's own line), or None; a DiT: None,
    except on flow_compiled (the compiled path of the other families, which refuses the class-conditional DiT) and for
    the verifying decider (its executors' checks at enable)."""
    if family(loaded) == "dit" and executor != "flow_compiled" and cfg.decider != "verify":
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
