"""Loading DiT models: the embedded model, local folders, hub ids, and random DiT-XL/2, Flux.1-dev and SD3.5-medium
shapes for benchmarks.

The only module that knows diffusers' on-disk layouts. Accepted folders:
- DiTPipeline layout: `transformer/` (+ optional `vae/`, `scheduler/`, `model_index.json`);
- a bare transformer folder: `config.json` whose `_class_name` is a DiT transformer.
Weights must be safetensors. Without a scheduler config, `DIT_SCHEDULER_CONFIG` is used.
An optional `class_names.json` (a JSON list) in the folder names the classes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel

from dqar.errors import DqarError, quiet_logger

# DiT's scheduler (facebook/DiT-XL-2-256): linear betas 1e-4..0.02 over 1000 steps, no sample clipping.
DIT_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
}

# DiT-XL/2 at 256x256: 28 blocks, hidden 1152 = 16 heads x 72, 32x32x4 latents, patch 2, learned sigma.
DIT_XL2_CONFIG: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "sample_size": 32,
    "patch_size": 2,
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "dropout": 0.0,
    "norm_num_groups": 32,
}

# The VAE DiT decodes with (stabilityai/sd-vae-ft-ema): 8x downsampling, 4 latent channels.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
WEIGHTS = "diffusion_pytorch_model.safetensors"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FIX = (
    "on a connected machine run `hf download {id}` and copy the Hugging Face cache (~/.cache/huggingface) here, "
    "or pass --model /path/to/folder"
)


@dataclass(frozen=True)
class LoadedModel:
    """A DiT ready to sample from."""

    transformer: DiTTransformer2DModel  # eval mode, on the requested device and dtype
    vae: AutoencoderKL | None  # None: nothing to decode (pixel-space model, or a benchmark without a VAE)
    scheduler_config: dict  # feed to dqar.sampling.make_scheduler
    num_classes: int  # valid class ids are [0, num_classes)
    null_class: int  # the unconditional id used for guidance (= num_classes)
    name: str  # "embedded", a hub id, an absolute folder path, or a RANDOM_DIT_XL2 name
    pixel_space: bool  # True: the model denoises pixels; images are the final latents
    class_names: tuple[str, ...] | None  # one name per class id, when known
    family: str = "dit"  # "dit" (class-conditional, dqar.sampling.sample) | "flux" | "sd3" (flow matching, sample_flow)
    resolution: int | None = None  # flow models: the default image side in pixels
    text_tokens: int = 0  # flow models: prompt-embedding length T ((N, T, joint_attention_dim) embeddings)
    guidance: float | None = None  # guidance-distilled Flux: the guidance embedding's scale (Flux.1-dev: 3.5)
    prompts: dict | None = None  # a learned prompt table (embedded-flux): {'prompt_embeds': (C+1, T, D), 'pooled_prompt_embeds': (C+1, P)}


def load_model(model: str | os.PathLike | None = None, *, device="cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `model`: None / "embedded", "embedded-flux", a local folder, a random-weight shape (`RANDOM_NAMES`, e.g. "random-flux-dev",
    "random-sd35-medium@512"), or a hub id (HF cache first, then the network)."""
    if model is None or str(model) == "embedded":
        return _load_embedded(device, dtype)
    if str(model) == "embedded-flux":
        return _load_embedded_flux(device, dtype)
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DqarError(f"model path {path} is a file, not a folder", "pass a DiTPipeline or transformer folder")
        return _load_folder(path, device, dtype)
    if str(model).startswith("random-"):  # random weights of a known shape (RANDOM_NAMES); an existing folder wins
        return _load_random(str(model), device, dtype)
    if HUB_ID.match(str(model)):
        return _load_hub(str(model), device, dtype)
    raise DqarError(f"model '{model}' is neither an existing folder nor a hub id", "pass a folder path, a hub id like facebook/DiT-XL-2-256, or 'embedded'")


def _load_embedded(device, dtype) -> LoadedModel:
    try:
        from dqar.embedded import CLASS_NAMES, EMBEDDED_DIR
    except ImportError as exc:
        raise DqarError(f"the embedded model is unavailable ({exc})", "reinstall dqar, or pass --model /path/to/folder") from None
    if not Path(EMBEDDED_DIR, "transformer").is_dir():
        raise DqarError(f"the embedded model weights are missing under {EMBEDDED_DIR}", "reinstall dqar, or pass --model /path/to/folder")
    loaded = _load_folder(Path(EMBEDDED_DIR), device, dtype)
    return _with(loaded, name="embedded", class_names=tuple(CLASS_NAMES))


# Sampling defaults of a model by name, read before it loads (`dqar.cli.common.run_config`); flags override them.
SAMPLE_DEFAULTS = {"embedded-flux": {"steps": 28, "cfg": 4.0}}  # Flux's: 28 steps, true CFG 4 (separate forwards)


def _load_embedded_flux(device, dtype) -> LoadedModel:
    """The embedded Flux (dqar.embedded.flux): pixel space, class ids index its learned prompt table (row 10: null)."""
    from dqar.embedded import CLASS_NAMES
    from dqar.embedded.flux import NULL_PROMPT_ID, SAMPLE_PX, load_embedded_flux

    transformer, prompts, sched = load_embedded_flux(device, dtype)
    loaded = _loaded(transformer, None, sched, "embedded-flux", device, CLASS_NAMES, True, num_classes=NULL_PROMPT_ID)
    return _with(loaded, family="flux", resolution=SAMPLE_PX, text_tokens=prompts["prompt_embeds"].shape[1], prompts=prompts)


def _with(loaded: LoadedModel, **changes) -> LoadedModel:
    return LoadedModel(**{**loaded.__dict__, **changes})


def _load_folder(root: Path, device, dtype) -> LoadedModel:
    """Load a DiTPipeline-layout folder or a bare transformer folder."""
    root = root.resolve()
    if (root / "transformer").is_dir():
        tdir, vdir, sfile = root / "transformer", root / "vae", root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        tdir, vdir, sfile = root, None, root / "scheduler_config.json"
    else:
        raise DqarError(f"no DiT model in {root}", "expected a transformer/ subfolder (DiTPipeline layout) or a config.json of a DiT transformer")
    _check_transformer_config(tdir / "config.json")
    transformer = _from_pretrained(DiTTransformer2DModel, tdir, dtype)
    vae = _from_pretrained(AutoencoderKL, vdir, dtype) if vdir is not None and vdir.is_dir() else None
    scheduler_config = _read_json(sfile) if sfile.is_file() else dict(DIT_SCHEDULER_CONFIG)
    names = _read_json(root / "class_names.json") if (root / "class_names.json").is_file() else None
    return _loaded(transformer, vae, scheduler_config, str(root), device, names)


def _loaded(transformer, vae, scheduler_config, name, device, class_names=None, pixel_space=None,
            num_classes: int | None = None) -> LoadedModel:
    num_classes = int(transformer.config.num_embeds_ada_norm) if num_classes is None else num_classes
    if class_names is not None and len(class_names) != num_classes:
        raise DqarError(f"{len(class_names)} class names for {num_classes} classes in {name}", "fix class_names.json")
    return LoadedModel(
        transformer=transformer.to(device).eval(),
        vae=vae.to(device).eval() if vae is not None else None,
        scheduler_config=dict(scheduler_config),
        num_classes=num_classes,
        null_class=num_classes,
        name=name,
        pixel_space=vae is None if pixel_space is None else pixel_space,
        class_names=tuple(class_names) if class_names is not None else None,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DqarError(f"cannot read {path}: {_one_line(exc)}", "restore the file or re-save the model") from None


def _check_transformer_config(path: Path) -> None:
    if not path.is_file():
        raise DqarError(f"missing {path}", "save the transformer with save_pretrained (or dqar.models.save_pipeline_folder)")
    config = _read_json(path)
    if config.get("_class_name") not in TRANSFORMER_CLASSES or config.get("num_embeds_ada_norm") is None:
        raise DqarError(f"{path} is not a class-conditional DiT transformer (_class_name {config.get('_class_name')!r})", "pass a DiTTransformer2DModel folder")


def _check_weights(folder: Path) -> None:
    """Fail early, naming the file, when the safetensors weights are absent."""
    if (folder / WEIGHTS).is_file() or (folder / f"{WEIGHTS}.index.json").is_file():
        return
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if others:
        raise DqarError(f"{folder / others[0]} is not safetensors; only safetensors weights are loaded",
                        "convert it on a trusted machine: from_pretrained(...).save_pretrained(folder, safe_serialization=True)")
    raise DqarError(f"missing weights {folder / WEIGHTS}", "re-save the model with save_pretrained(safe_serialization=True)")


def _from_pretrained(cls, folder: Path, dtype):
    """Load one component from a local folder; any failure becomes a DqarError naming the file."""
    _check_weights(folder)
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # corrupt headers, truncated files, shape mismatches all surface differently
        raise DqarError(f"cannot load {folder / WEIGHTS}: {_one_line(exc)}", "the file is corrupt or does not match config.json; re-save or re-download it") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.strip().lower() in ("1", "true", "yes", "on")


def _hub_components(repo_id: str, dtype, local_only: bool):
    from diffusers import DDIMScheduler

    kw = {"torch_dtype": dtype, "use_safetensors": True, "local_files_only": local_only, "low_cpu_mem_usage": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")  # raised inside diffusers' hub calls
        transformer = DiTTransformer2DModel.from_pretrained(repo_id, subfolder="transformer", **kw)
        vae = AutoencoderKL.from_pretrained(repo_id, subfolder="vae", **kw)
        scheduler_config = dict(DDIMScheduler.load_config(repo_id, subfolder="scheduler", local_files_only=local_only))
    return transformer, vae, scheduler_config


def _load_hub(repo_id: str, device, dtype) -> LoadedModel:
    """A hub id: the local HF cache first; the network only when not offline."""
    try:
        parts = _hub_components(repo_id, dtype, local_only=True)
    except Exception as cached_exc:
        if _offline():
            raise DqarError(f"cannot load '{repo_id}': no such folder, not in the Hugging Face cache, and HF_HUB_OFFLINE is set ({_one_line(cached_exc)})",
                            HUB_FIX.format(id=repo_id)) from None
        try:
            parts = _hub_components(repo_id, dtype, local_only=False)
        except Exception as exc:
            raise DqarError(f"cannot load '{repo_id}': no such folder, and not loadable from the cache or the hub ({_one_line(exc)})",
                            HUB_FIX.format(id=repo_id)) from None
    return _loaded(*parts, name=repo_id, device=device)


RANDOM_DIT_XL2 = {"random-dit-xl2": 256, "random-dit-xl2-512": 512}  # model name -> image resolution (latents: 1/8)


def random_dit_xl2(device="cpu", dtype: torch.dtype = torch.float32, *, seed: int = 0, with_vae: bool = False,
                   resolution: int = 256) -> LoadedModel:
    """DiT-XL/2 with random weights at `resolution` 256 or 512 (and optionally a random SD VAE): speed benchmarks without weights.

    Built directly on `device` (no CPU copy); device="meta" allocates nothing.
    """
    names = {r: n for n, r in RANDOM_DIT_XL2.items()}
    if resolution not in names:
        raise DqarError(f"random DiT-XL/2 resolution {resolution!r} is not available", "use 256 or 512")
    torch.manual_seed(seed)
    with torch.device(device):
        transformer = DiTTransformer2DModel(**{**DIT_XL2_CONFIG, "sample_size": resolution // 8})
        vae = AutoencoderKL(**{**SD_VAE_CONFIG, "sample_size": resolution}) if with_vae else None
    with quiet_logger("diffusers.models.modeling_utils"):  # .to(dtype) warns about fp32-only modules; DiT and the VAE have none
        transformer = transformer.to(dtype)
        vae = vae.to(dtype) if vae is not None else None
    return _loaded(transformer, vae, DIT_SCHEDULER_CONFIG, names[resolution], device, pixel_space=False)


# Flux.1-dev (black-forest-labs/FLUX.1-dev transformer/config.json): 19 dual-stream + 38 single-stream blocks,
# hidden 3072 = 24 heads x 128, 64 packed latent channels (16 x 2x2), T5 4096-d text, CLIP 768-d pooled, guidance embedding.
FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# SD3.5-medium (stabilityai/stable-diffusion-3.5-medium): 24 joint blocks, hidden 1536 = 24 x 64, the first 13 with a
# second self-attention (MMDiT-X), q/k RMS norms, 16 latent channels, patch 2.
SD35_MEDIUM_CONFIG: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536, "pooled_projection_dim": 2048,
    "out_channels": 16, "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
FLUX_TINY_CONFIG: dict[str, Any] = {**FLUX_DEV_CONFIG, "in_channels": 16, "num_layers": 2, "num_single_layers": 2,
                                    "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                                    "pooled_projection_dim": 32, "axes_dims_rope": (4, 4, 8)}
SD3_TINY_CONFIG: dict[str, Any] = {**SD35_MEDIUM_CONFIG, "sample_size": 8, "patch_size": 1, "in_channels": 4, "num_layers": 2,
                                   "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 32,
                                   "caption_projection_dim": 32, "pooled_projection_dim": 64, "out_channels": 4,
                                   "pos_embed_max_size": 96, "dual_attention_layers": (0,)}


@dataclass(frozen=True)
class FlowShape:
    """A random-weight flow model: its transformer config and what its generations are fed."""

    family: str  # "flux" | "sd3"
    config: dict
    resolution: int  # default image side, px (latents: 1/8)
    text_tokens: int  # Flux: T5's 512 tokens; SD3: 77 CLIP + 256 T5 = 333
    guidance: float | None  # Flux-dev's distilled guidance scale; None: no guidance embedding


RANDOM_FLOW: dict[str, FlowShape] = {
    "random-flux-dev": FlowShape("flux", FLUX_DEV_CONFIG, 1024, 512, 3.5),
    "random-sd35-medium": FlowShape("sd3", SD35_MEDIUM_CONFIG, 1024, 333, None),
    "random-flux-tiny": FlowShape("flux", FLUX_TINY_CONFIG, 64, 8, 3.5),  # CPU tests: 2 + 2 blocks, hidden 32
    "random-sd3-tiny": FlowShape("sd3", SD3_TINY_CONFIG, 64, 8, None),  # CPU tests: 2 blocks (one dual), hidden 32
}
RANDOM_NAMES = (*RANDOM_DIT_XL2, *RANDOM_FLOW)
FLOW_PROMPTS = 1000  # a flow model's "class ids": seeds of random prompt embeddings (id FLOW_PROMPTS: the negative prompt)


def _load_random(name: str, device, dtype) -> LoadedModel:
    """A `random-*` name: DiT-XL/2 (256, 512 px) or a flow shape; `<name>@<px>` sets a flow model's resolution."""
    base, _, px = name.partition("@")
    if base in RANDOM_DIT_XL2 and not px:
        return random_dit_xl2(device, dtype, with_vae=True, resolution=RANDOM_DIT_XL2[base])
    if base not in RANDOM_FLOW:
        raise DqarError(f"unknown random model '{name}'", f"use one of: {', '.join(RANDOM_NAMES)} (flow models: <name>@<px>)")
    if px and not (px.isdigit() and int(px) > 0 and int(px) % 16 == 0):
        raise DqarError(f"resolution '{px}' in '{name}' is invalid", "use a positive multiple of 16 pixels, e.g. random-flux-dev@512")
    return random_flow(base, device, dtype, resolution=int(px) if px else None)


def random_flow(name: str, device="cpu", dtype: torch.dtype = torch.float32, *, seed: int = 0, resolution: int | None = None,
                **config) -> LoadedModel:
    """A Flux or SD3 transformer of `RANDOM_FLOW[name]`'s shape with random weights (no VAE, no text encoders).

    Built directly on `device` in `dtype` (default dtype set while constructing): Flux.1-dev is 11.9 B parameters,
    23.8 GB in bf16 and never on the host; device="meta" allocates nothing. `config`: keys overriding the shape's
    (e.g. num_layers=2 for a test). Generations feed it seeded random prompt embeddings (dqar.generate).
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from dqar.sampling import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG

    if name not in RANDOM_FLOW:
        raise DqarError(f"unknown random flow model '{name}'", f"use one of: {', '.join(RANDOM_FLOW)}")
    shape = RANDOM_FLOW[name]
    cls = FluxTransformer2DModel if shape.family == "flux" else SD3Transformer2DModel
    unknown = sorted(set(config) - set(shape.config))
    if unknown:
        raise DqarError(f"unknown {cls.__name__} config key '{unknown[0]}'", f"use some of: {', '.join(shape.config)}")
    if torch.device(device).type != "meta":
        _check_room(name, cls, {**shape.config, **config}, device, dtype)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in `dtype`: no float32 copy of a 12 B model
    try:
        with torch.device(device):
            transformer = cls(**{**shape.config, **config})
    finally:
        torch.set_default_dtype(default)
    with quiet_logger("diffusers.models.modeling_utils"):
        transformer = transformer.to(dtype)  # float32 buffers (SD3's pos_embed) as from_pretrained(torch_dtype=) casts them
    loaded = _loaded(transformer, None, FLUX_SCHEDULER_CONFIG if shape.family == "flux" else SD3_SCHEDULER_CONFIG,
                     name, device, pixel_space=False, num_classes=FLOW_PROMPTS)
    guidance = shape.guidance if transformer.config.get("guidance_embeds") else None
    return _with(loaded, family=shape.family, resolution=resolution or shape.resolution, text_tokens=shape.text_tokens,
                 guidance=guidance)


def free_bytes(dev: torch.device) -> int | None:
    """Free memory on a CUDA device or the host, in bytes (None where unknown)."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    if dev.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def _check_room(name: str, cls, config: dict, device, dtype: torch.dtype) -> None:
    """Refuse, before allocating, a random model whose weights do not fit the device's free memory (counted on meta)."""
    with torch.device("meta"):
        need = sum(p.numel() for p in cls(**config).parameters()) * torch.empty((), dtype=dtype).element_size()
    dev = torch.device(device)
    free = free_bytes(dev)
    if free is not None and need > 0.9 * free:
        raise DqarError(f"{name} needs {need / 1e9:.1f} GB for its weights in {str(dtype).replace('torch.', '')} on {dev}, "
                        f"{free / 1e9:.1f} GB free", "use a GPU with room and --dtype bf16, or random-flux-tiny / random-sd3-tiny")


def save_pipeline_folder(path, transformer, vae=None, scheduler_config: dict | None = None, *,
                         class_names=None, overwrite: bool = False) -> Path:
    """Save a model folder `load_model` reads (DiTPipeline layout; `model_index.json` only with a VAE).

    Written into a temporary sibling folder, then renamed into place.
    """
    path = Path(path).expanduser().resolve()
    if path.exists() and not overwrite:
        raise DqarError(f"{path} already exists", "choose a new folder or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_components(tmp, transformer, vae, dict(scheduler_config or DIT_SCHEDULER_CONFIG), class_names)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_components(root: Path, transformer, vae, scheduler_config: dict, class_names) -> None:
    transformer.save_pretrained(root / "transformer", safe_serialization=True)
    (root / "scheduler").mkdir()
    scheduler_config.setdefault("_class_name", "DDIMScheduler")
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2, sort_keys=True))
    if class_names is not None:
        (root / "class_names.json").write_text(json.dumps(list(class_names)))
    if vae is not None:
        vae.save_pretrained(root / "vae", safe_serialization=True)
        index = {
            "_class_name": "DiTPipeline",
            "transformer": ["diffusers", "DiTTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", scheduler_config["_class_name"]],
        }
        (root / "model_index.json").write_text(json.dumps(index, indent=2))
