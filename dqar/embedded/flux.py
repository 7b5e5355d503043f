"""The embedded Flux: a small diffusers `FluxTransformer2DModel` trained with rectified flow on Fashion-MNIST.

Pixel space with a trivially packed "latent": a 28×28×1 image is the 28×28 latent that Flux packs 2×2 into
14×14 = 196 tokens of 4 channels (`in_channels=4`). With no VAE, FluxPipeline's `vae_scale_factor` is 8, so the
image is sampled as `height=width=224` "pixels". Each class has a learned "prompt": `PROMPT_TOKENS`
`encoder_hidden_states` tokens and a pooled vector; row `NULL_PROMPT_ID` (= 10) is the null prompt used by true CFG.

Everything loads from safetensors / json only (docs/EMBEDDED.md, "The embedded Flux"). Training: flux_train.py.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from dqar.errors import DqarError
from dqar.sampling import flux_image_ids, pack_flux, unpack_flux
from dqar.embedded.data import IMAGE_SIZE, NUM_CLASSES

FLUX_DIR = Path(__file__).resolve().parent / "weights" / "flux"
NULL_PROMPT_ID = NUM_CLASSES  # the 11th prompt row: the negative / empty prompt of true CFG
PROMPTS_FILE = "prompts.safetensors"
SCHEDULER_FILE = "scheduler_config.json"
MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
SAMPLE_PX = IMAGE_SIZE * 8  # 224: FluxPipeline's height/width for a 28×28 latent when there is no VAE (scale 8)
DEFAULT_STEPS = 28
DEFAULT_CFG = 4.0
FLUX_TRAIN_COMMAND = ("python -m dqar.embedded.flux_train --out {out} --minutes 60 --batch-size 32 --lr 1e-3 "
                      "--seed 0 --threads 1 --device cpu")

__all__ = [
    "DEFAULT_CFG", "DEFAULT_STEPS", "FLUX_DIR", "NULL_PROMPT_ID", "SAMPLE_PX", "EmbeddedFlux", "FluxModelConfig",
    "PromptTable", "class_prompts", "load_embedded_flux", "make_flux_scheduler", "pack_images", "unpack_latents",
    "sample_embedded_flux",
]


def _strict(cls, data: dict):
    """Build a frozen config from a dict, refusing keys it does not know."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DqarError(f"unknown {cls.__name__} keys: {', '.join(unknown)}", f"use only: {', '.join(sorted(known))}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class FluxModelConfig:
    """Shape of the embedded Flux (diffusers `FluxTransformer2DModel`) and its prompt table."""

    num_layers: int = 1  # dual-stream (MMDiT) blocks
    num_single_layers: int = 4  # single-stream blocks
    heads: int = 2  # attention heads
    head_dim: int = 48  # width = heads * head_dim = 96
    axes_dims_rope: tuple[int, int, int] = (8, 20, 20)  # RoPE axes (index, row, column); sums to head_dim
    joint_attention_dim: int = 64  # width of a prompt token (encoder_hidden_states)
    pooled_projection_dim: int = 64  # width of the pooled prompt vector
    prompt_tokens: int = 4  # encoder_hidden_states tokens per prompt
    num_classes: int = NUM_CLASSES  # prompts 0..9; row num_classes is the null prompt

    def __post_init__(self):
        if sum(self.axes_dims_rope) != self.head_dim:
            raise DqarError(f"axes_dims_rope {self.axes_dims_rope} sums to {sum(self.axes_dims_rope)}, not head_dim "
                            f"{self.head_dim}", "make the RoPE axes sum to head_dim")
        if min(self.num_layers, self.num_single_layers) < 1:
            raise DqarError("the embedded Flux needs at least one dual-stream and one single-stream block",
                            "use num_layers >= 1 and num_single_layers >= 1")

    @classmethod
    def from_dict(cls, data: dict) -> "FluxModelConfig":
        return _strict(cls, data)

    def build(self) -> nn.Module:
        """A freshly initialised `FluxTransformer2DModel` (adaLN-zero style init), eval mode."""
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(
            patch_size=1, in_channels=4, out_channels=4, num_layers=self.num_layers,
            num_single_layers=self.num_single_layers, attention_head_dim=self.head_dim,
            num_attention_heads=self.heads, joint_attention_dim=self.joint_attention_dim,
            pooled_projection_dim=self.pooled_projection_dim, guidance_embeds=False,
            axes_dims_rope=tuple(self.axes_dims_rope),
        )
        flux_init_(model)
        return model.eval()


def flux_init_(model: nn.Module) -> None:
    """Xavier linears, N(0, 0.02) timestep MLP, zeroed adaLN modulations and output projection (DiT's recipe)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    emb = model.time_text_embed.timestep_embedder
    nn.init.normal_(emb.linear_1.weight, std=0.02)
    nn.init.normal_(emb.linear_2.weight, std=0.02)
    for block in model.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            nn.init.zeros_(norm.linear.weight)
            nn.init.zeros_(norm.linear.bias)
    for block in model.single_transformer_blocks:
        nn.init.zeros_(block.norm.linear.weight)
        nn.init.zeros_(block.norm.linear.bias)
    nn.init.zeros_(model.norm_out.linear.weight)
    nn.init.zeros_(model.norm_out.linear.bias)
    nn.init.zeros_(model.proj_out.weight)
    nn.init.zeros_(model.proj_out.bias)


class PromptTable(nn.Module):
    """Learned prompts: `embeds` (classes + 1, T, joint_attention_dim), `pooled` (classes + 1, pooled_projection_dim)."""

    def __init__(self, cfg: FluxModelConfig):
        super().__init__()
        rows = cfg.num_classes + 1
        self.embeds = nn.Parameter(torch.randn(rows, cfg.prompt_tokens, cfg.joint_attention_dim) * 0.5)
        self.pooled = nn.Parameter(torch.randn(rows, cfg.pooled_projection_dim) * 0.5)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) prompt ids → (N, T, D) prompt_embeds and (N, P) pooled_prompt_embeds."""
        return self.embeds[ids], self.pooled[ids]


class EmbeddedFlux(nn.Module):
    """The transformer and its prompt table as one module (what trains, what the EMA averages)."""

    def __init__(self, cfg: FluxModelConfig):
        super().__init__()
        self.transformer = cfg.build()
        self.prompts = PromptTable(cfg)


def pack_images(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 28, 28) images → Flux's packed (N, 196, 4) latents."""
    return pack_flux(x)


def unpack_latents(latents: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Packed (N, 196, 4) latents → (N, 1, 28, 28) images in model space ([-1, 1])."""
    return unpack_flux(latents, size, size)


def image_ids(size: int = IMAGE_SIZE, device=None, dtype=torch.float32) -> torch.Tensor:
    """(196, 3) Flux position ids (0, row, column) of the packed tokens, as FluxPipeline makes them."""
    return flux_image_ids(size // 2, size // 2, device, dtype)


def scheduler_config() -> dict:
    """`FlowMatchEulerDiscreteScheduler` with Flux's dynamic shift (mu from the 196-token sequence length)."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }


def _require(path: Path, what: str, root: Path) -> None:
    if not path.is_file():
        raise DqarError(f"{what} not found at {path}", f"train it with `{FLUX_TRAIN_COMMAND.format(out=root)}`")


def _bad(root: Path, exc: BaseException) -> DqarError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DqarError(f"cannot load the embedded Flux from {root} ({msg[:200]})",
                     f"retrain it with `{FLUX_TRAIN_COMMAND.format(out=root)}`")


def load_flux_prompts(folder=None, device="cpu", dtype=torch.float32) -> dict:
    """The prompt table: {'prompt_embeds': (11, T, D), 'pooled_prompt_embeds': (11, P)}; row 10 is the null prompt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = FLUX_DIR if folder is None else Path(folder)
    path = root / PROMPTS_FILE
    _require(path, "embedded Flux prompt table", root)
    try:
        table = load_file(str(path))
        embeds, pooled = table["prompt_embeds"], table["pooled_prompt_embeds"]
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise _bad(root, exc) from None
    if embeds.ndim != 3 or pooled.ndim != 2 or len(embeds) != len(pooled) or len(embeds) != NUM_CLASSES + 1:
        raise _bad(root, ValueError(f"prompt table of shapes {tuple(embeds.shape)}, {tuple(pooled.shape)}"))
    return {"prompt_embeds": embeds.to(device=device, dtype=dtype),
            "pooled_prompt_embeds": pooled.to(device=device, dtype=dtype)}


def load_flux_scheduler_config(folder=None) -> dict:
    """The shipped sampling scheduler config; use `FlowMatchEulerDiscreteScheduler.from_config`."""
    root = FLUX_DIR if folder is None else Path(folder)
    path = root / SCHEDULER_FILE
    _require(path, "embedded Flux scheduler config", root)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _bad(root, exc) from None


def load_embedded_flux(device="cpu", dtype=torch.float32, folder=None):
    """(transformer, prompts, scheduler_config): the embedded `FluxTransformer2DModel` (eval, no grad), the prompt
    table of `load_flux_prompts` on `device`/`dtype`, and the `FlowMatchEulerDiscreteScheduler` config dict.

    Sample it with `sample_embedded_flux`, `dqar.sampling.sample_flow(..., height=224, width=224)` or a stock
    FluxPipeline (`output_type="latent"`, then `unpack_latents`)."""
    root = FLUX_DIR if folder is None else Path(folder)
    for name in MODEL_FILES:
        _require(root / name, "embedded Flux " + ("config" if name.endswith(".json") else "weights"), root)
    from diffusers import FluxTransformer2DModel

    try:
        model = FluxTransformer2DModel.from_pretrained(  # safetensors only; low_cpu_mem_usage=False: no accelerate
            str(root), local_files_only=True, use_safetensors=True, torch_dtype=dtype, low_cpu_mem_usage=False
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _bad(root, exc) from None
    except Exception as exc:  # safetensors' own header errors
        if type(exc).__name__ != "SafetensorError":
            raise
        raise _bad(root, exc) from None
    prompts = load_flux_prompts(root, device=device, dtype=dtype)
    return model.to(device).eval().requires_grad_(False), prompts, load_flux_scheduler_config(root)


def make_flux_scheduler(config: dict | None = None):
    """A `FlowMatchEulerDiscreteScheduler` from `config` (default: the shipped one's settings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(config or scheduler_config())


def class_prompts(prompts: dict, labels) -> dict:
    """sample_flow / FluxPipeline keyword arguments for `labels`: the classes' prompts and the null prompt as negative."""
    ids = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= NUM_CLASSES:
        raise DqarError(f"class labels must lie in 0..{NUM_CLASSES - 1}, got {ids.tolist()}",
                        f"pass class ids 0..{NUM_CLASSES - 1}")
    embeds, pooled = prompts["prompt_embeds"], prompts["pooled_prompt_embeds"]
    null = torch.full_like(ids, NULL_PROMPT_ID)
    idx, nidx = ids.to(embeds.device), null.to(embeds.device)
    return {"prompt_embeds": embeds[idx], "pooled_prompt_embeds": pooled[idx],
            "negative_prompt_embeds": embeds[nidx], "negative_pooled_prompt_embeds": pooled[nidx]}


def sample_embedded_flux(transformer, prompts: dict, labels, *, scheduler=None, steps: int = DEFAULT_STEPS,
                         cfg: float = DEFAULT_CFG, seed: int = 0, reuse=None) -> torch.Tensor:
    """(N, 1, 28, 28) images in [0, 1] of `labels`: Flux's default sampling (dynamic shift, 28 steps, true CFG 4 as
    two forwards per step), one generator per sample seeded seed, seed + 1, ... (as dqar's DiT sampling)."""
    from dqar.sampling import sample_flow

    ids = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    gens = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(ids))]
    noise = torch.stack([torch.randn(1, IMAGE_SIZE, IMAGE_SIZE, generator=g) for g in gens])  # (N, 1, 28, 28)
    latents = pack_images(noise).to(device=transformer.device, dtype=transformer.dtype)  # (N, 196, 4)
    out = sample_flow(transformer, scheduler or make_flux_scheduler(), **class_prompts(prompts, ids),
                      height=SAMPLE_PX, width=SAMPLE_PX, steps=steps, cfg=cfg, latents=latents, reuse=reuse)
    return ((unpack_latents(out.latents.float()) + 1.0) * 0.5).clamp(0.0, 1.0).cpu()


def model_config_dict(cfg: FluxModelConfig) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
