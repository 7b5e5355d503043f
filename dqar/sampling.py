"""DiT sampling (DDIM, DPM-Solver++ 2M) and flow-matching sampling (Flux, SD3), with classifier-free guidance.

`sample` reproduces `diffusers.DiTPipeline.__call__` bit for bit when no reuse
engine is attached: the same noise draw, the same batched 2N guidance forward
(conditional half first, null class = `num_embeds_ada_norm`), the same guidance
arithmetic, scheduler calls and VAE decode. Two deliberate differences that do
not change any value: the scheduler steps the N guided rows instead of two
identical copies of them, and the timesteps are moved to the model's device
once before the loop (no host-device copy per step).

Schedulers: DDIM (Song et al., 2021, arXiv:2010.02502) and DPM-Solver++(2M)
(Lu et al., 2022, arXiv:2211.01095).

`sample_flow` drives `FlowMatchEulerDiscreteScheduler` (rectified flow, Esser et al., 2024,
arXiv:2403.03206) as `FluxPipeline.__call__` and `StableDiffusion3Pipeline.__call__` do, and
reproduces their `output_type="latent"` output bit for bit (docs/SAMPLING.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from dqar.errors import DqarError

SCHEDULERS = ("ddim", "dpm", "flow")  # "flow": FlowMatchEulerDiscreteScheduler, for `sample_flow` only


@dataclass(frozen=True)
class SampleOutput:
    """What one call of `sample` produced."""

    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1], on the CPU
    latents: torch.Tensor  # (N, C_lat, h, w) final latents, on the model's device, in the sampling dtype
    num_evaluations: int  # transformer forwards made (one per scheduler step)


def make_scheduler(name: str, scheduler_config: dict) -> Any:
    """A fresh scheduler built from a scheduler config dict: "ddim" (DDIM), "dpm" (DPM-Solver++ 2M) or "flow"
    (FlowMatchEulerDiscreteScheduler, for `sample_flow`)."""
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "flow":
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    raise DqarError(f"unknown scheduler '{name}'", f"choose one of: {', '.join(SCHEDULERS)}")


def _labels(class_labels: Sequence[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Validated class ids as a 1-D int64 CPU tensor."""
    labels = class_labels.detach().cpu() if torch.is_tensor(class_labels) else torch.tensor(list(class_labels))
    labels = labels.reshape(-1)
    if labels.numel() == 0:
        raise DqarError("no class labels given", "pass at least one class id")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise DqarError(f"class labels must be integers, got {labels.dtype}", f"use class ids in [0, {num_classes - 1}]")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise DqarError(f"class label {int(bad[0])} is out of range", f"use class ids in [0, {num_classes - 1}]")
    return labels.long()


def _generators(generator, seed: int | None, n: int):
    """A generator, one generator per sample, or None; `seed` means sample i gets `seed + i`."""
    if seed is not None:
        if generator is not None:
            raise DqarError("both generator and seed were given", "pass one of them")
        return [torch.Generator().manual_seed(int(seed) + i) for i in range(n)]
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise DqarError(f"{len(generator)} generators for {n} samples", "pass one generator per sample")
        return list(generator)
    return generator


def _check(steps: int, cfg: float, eta: float, scheduler) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise DqarError(f"steps = {steps!r} is invalid", "use an integer >= 1")
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg) and cfg >= 0):
        raise DqarError(f"cfg = {cfg!r} is invalid", "use a guidance scale >= 0 (<= 1 disables guidance)")
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise DqarError("flow matching needs a flow-matching transformer (Flux, SD3), not a class-conditional DiT",
                        "sample a DiT with a ddim or dpm scheduler, or a Flux / SD3 transformer with sample_flow")
    if eta != 0 and not isinstance(scheduler, DDIMScheduler):
        raise DqarError(f"eta = {eta} applies to DDIM only", "use eta = 0 with this scheduler")


def _guide(noise_pred: torch.Tensor, n: int, channels: int, cfg: float, guided: bool, learned_sigma: bool) -> torch.Tensor:
    """The scheduler's model output for the N samples, computed exactly as DiTPipeline does."""
    if guided:  # noise_pred: (2N, C_out, h, w), conditional rows first
        eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)  # (N, C, h, w) each
        half_eps = uncond_eps + cfg * (cond_eps - uncond_eps)
        noise_pred = torch.cat([half_eps, rest[:n]], dim=1)  # (N, C_out, h, w)
    if learned_sigma:
        return noise_pred[:, :channels]  # (N, C, h, w): drop the learned-variance channels
    return noise_pred


def _decode(latents: torch.Tensor, vae) -> torch.Tensor:
    """(N, C, h, w) latents to (N, 3, H, W) float32 CPU images in [0, 1]; pixel-space models map latents directly."""
    if vae is not None:
        latents = 1 / vae.config.scaling_factor * latents  # the order DiTPipeline uses (bitwise parity)
        latents = vae.decode(latents.to(vae.dtype)).sample
    return (latents / 2 + 0.5).clamp(0, 1).float().cpu()


@torch.no_grad()
def sample(
    transformer,
    class_labels: Sequence[int] | torch.Tensor,
    *,
    scheduler,
    steps: int = 50,
    cfg: float = 4.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    seed: int | None = None,
    eta: float = 0.0,
    vae=None,
    null_class: int | None = None,
    reuse=None,
    progress: bool = False,
    dtype: torch.dtype | None = None,
) -> SampleOutput:
    """Draw one image per class label with `steps` scheduler steps and guidance scale `cfg` (<= 1: none).

    `generator`: a `torch.Generator` or a list with one per sample. `seed`
    instead: sample i uses its own CPU generator seeded `seed + i`, so a sample
    does not depend on how the labels are batched or sharded. `eta` is DDIM's
    (0 = deterministic). `vae`: decode latents; None for pixel-space models.
    `reuse`: an engine with `begin_generation(scheduler=, num_evaluations=, guided=)` and
    `end_generation()`; each transformer forward is one evaluation. `dtype`:
    latent dtype, default the transformer's.
    """
    num_classes = int(transformer.config.num_embeds_ada_norm)
    null_class = num_classes if null_class is None else int(null_class)
    labels = _labels(class_labels, num_classes)
    _check(steps, cfg, eta, scheduler)
    n = len(labels)
    generator = _generators(generator, seed, n)
    device, dtype = transformer.device, dtype or transformer.dtype
    channels = transformer.config.in_channels
    size = transformer.config.sample_size
    learned_sigma = transformer.config.out_channels // 2 == channels
    guided = cfg > 1

    latents = randn_tensor((n, channels, size, size), generator=generator, device=device, dtype=dtype)  # (N, C, h, w)
    labels = labels.to(device)
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, null_class)])  # (2N,) conditional first
    step_kwargs = {"eta": eta, "generator": generator} if isinstance(scheduler, DDIMScheduler) else {}

    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    timesteps_dev = timesteps.to(device)  # one copy, none per step
    num_evaluations = len(timesteps)
    if reuse is not None:
        reuse.begin_generation(scheduler=scheduler, num_evaluations=num_evaluations, guided=guided)
    try:
        for i, t in enumerate(tqdm(timesteps, disable=not progress, desc="sampling")):
            model_input = torch.cat([latents, latents]) if guided else latents  # (2N or N, C, h, w)
            model_input = scheduler.scale_model_input(model_input, t)
            t_batch = timesteps_dev[i].expand(model_input.shape[0])  # (2N or N,)
            noise_pred = transformer(model_input, timestep=t_batch, class_labels=labels).sample
            model_output = _guide(noise_pred, n, channels, cfg, guided, learned_sigma)  # (N, C, h, w)
            latents = scheduler.step(model_output, t, latents, **step_kwargs).prev_sample
    finally:
        if reuse is not None:
            reuse.end_generation()
    return SampleOutput(images=_decode(latents, vae), latents=latents, num_evaluations=num_evaluations)


# ----- flow matching: Flux and SD3 ----------------------------------------------------------------
FLUX_VAE_SCALE = 8  # pixels per latent cell the pipelines assume without a VAE (FluxPipeline, StableDiffusion3Pipeline)
FLUX_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                         "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}  # FLUX.1-dev's
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3-medium's and SD3.5's
FLOW_FAMILIES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}


@dataclass(frozen=True)
class FlowOutput:
    """What one call of `sample_flow` produced."""

    latents: torch.Tensor  # the pipeline's output_type="latent": Flux packed (N, h/2 * w/2, 4 C), SD3 (N, C, h, w)
    images: torch.Tensor | None  # (N, 3, H, W) float32 in [0, 1] on the CPU when a VAE was given, else None
    num_evaluations: int  # model evaluations = denoising steps (what plans count)
    forwards_per_step: int  # transformer forwards per evaluation: 1, or 2 with Flux's separate-forward CFG ("cond", "uncond")
    timesteps: torch.Tensor  # (steps,) in [0, 1000], the scheduler's, on the model's device
    sigmas: torch.Tensor  # (steps + 1,) the scheduler's (ending in 0), on the model's device


def flow_family(transformer) -> str:
    """"flux" or "sd3": the flow-matching family of a transformer (by class, subclasses included); others are refused."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in FLOW_FAMILIES:
            return FLOW_FAMILIES[cls.__name__]
    raise DqarError(f"flow matching needs a flow-matching transformer (Flux, SD3), got {type(transformer).__name__}",
                    "pass a FluxTransformer2DModel or SD3Transformer2DModel, or sample a DiT with sample (ddim, dpm)")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """The dynamic shift `mu`: linear in the image sequence length (diffusers' `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def set_flow_timesteps(scheduler, steps: int, *, family: str, image_seq_len: int, device=None,
                       mu: float | None = None) -> torch.Tensor:
    """Set `scheduler`'s sigmas and timesteps as FluxPipeline ("flux") or StableDiffusion3Pipeline ("sd3") does.

    Flux: sigmas linspace(1, 1/steps, steps) and a `mu` from the image sequence length (the scheduler applies it under
    `use_dynamic_shifting`, else its static `shift`). SD3: the scheduler's own spacing with its static `shift`; a `mu`
    only under `use_dynamic_shifting`. A given `mu` is used as is. Returns the (steps,) timesteps in [0, 1000].
    """
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise DqarError(f"flow sampling drives FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}",
                        "pass make_scheduler('flow', config) or the pipeline's own scheduler")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
        raise DqarError(f"steps = {steps!r} is invalid", "use an integer >= 1")
    if family not in FLOW_FAMILIES.values():
        raise DqarError(f"unknown flow family '{family}'", f"choose one of: {', '.join(FLOW_FAMILIES.values())}")
    c = scheduler.config
    # max_shift's fallback differs between the two pipelines (1.15 Flux, 1.16 SD3); configs that ship set it
    shift_args = (c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5))
    if family == "flux":
        mu = calculate_shift(image_seq_len, *shift_args, c.get("max_shift", 1.15)) if mu is None else mu
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    else:
        if mu is None and c.get("use_dynamic_shifting", None):
            mu = calculate_shift(image_seq_len, *shift_args, c.get("max_shift", 1.16))
        scheduler.set_timesteps(steps, device=device, **({} if mu is None else {"mu": mu}))
    scheduler.set_begin_index(0)  # as FluxPipeline: the first step finds its index without a device read
    return scheduler.timesteps


def evaluation_sigmas(scheduler) -> tuple[float, ...]:
    """The sigma of each evaluation (denoising step) of a set schedule, on the host (one read; once per generation)."""
    return tuple(float(s) for s in scheduler.sigmas[:-1].cpu())


def _check_embeds(transformer, pos: tuple, neg: tuple, guided: bool, family: str) -> None:
    """(N, T, D) prompt and (N, P) pooled embeddings that fit the transformer; negatives of the same shapes under CFG."""
    c = transformer.config
    embeds, pooled = pos
    if not (torch.is_tensor(embeds) and embeds.ndim == 3 and embeds.shape[-1] == c.joint_attention_dim):
        raise DqarError(f"prompt_embeds must be (N, T, {c.joint_attention_dim}), got "
                        f"{tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__}",
                        "pass the text encoders' output for this transformer")
    if not (torch.is_tensor(pooled) and tuple(pooled.shape) == (len(embeds), c.pooled_projection_dim)):
        raise DqarError(f"pooled_prompt_embeds must be ({len(embeds)}, {c.pooled_projection_dim}), got "
                        f"{tuple(pooled.shape) if torch.is_tensor(pooled) else type(pooled).__name__}",
                        "pass one pooled embedding per prompt")
    if guided and any(x is None for x in neg):
        what = "true CFG (cfg > 1) on Flux" if family == "flux" else "CFG (cfg > 1)"
        raise DqarError(f"{what} needs negative_prompt_embeds and negative_pooled_prompt_embeds",
                        "pass both (the embeddings of the negative or empty prompt), or use cfg <= 1")
    if guided and (tuple(neg[0].shape) != tuple(embeds.shape) or tuple(neg[1].shape) != tuple(pooled.shape)):
        raise DqarError(f"negative embeddings {tuple(neg[0].shape)}, {tuple(neg[1].shape)} differ from the prompt's "
                        f"{tuple(embeds.shape)}, {tuple(pooled.shape)}", "pad or truncate them to the same shapes")


def pack_flux(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) to Flux's packed (N, h/2 * w/2, 4 C): 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    n, c, h, w = latents.shape
    latents = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (N, h/2, w/2, C, 2, 2)
    return latents.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_flux(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed (N, h/2 * w/2, 4 C) back to (N, C, h, w) (FluxPipeline._unpack_latents)."""
    n, _, c4 = latents.shape
    latents = latents.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (N, C, h/2, 2, w/2, 2)
    return latents.reshape(n, c4 // 4, h, w)


def flux_image_ids(h2: int, w2: int, device, dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) Flux position ids: (0, row, column) per packed token."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


@torch.no_grad()
def sample_flow(
    transformer,
    scheduler,
    *,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    negative_pooled_prompt_embeds: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int = 28,
    cfg: float | None = None,
    guidance: float = 3.5,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    vae=None,
    vae_scale_factor: int | None = None,
    mu: float | None = None,
    reuse=None,
    progress: bool = False,
) -> FlowOutput:
    """Sample a Flux or SD3 transformer with flow matching, as its stock pipeline does with `prompt_embeds` given.

    `cfg`: Flux's `true_cfg_scale` (default 1: none; > 1 runs a "cond" and an "uncond" forward per step, each inside
    `transformer.cache_context`) or SD3's `guidance_scale` (default 7; > 1 batches [uncond; cond] rows, in that
    order). CFG needs the negative embeddings. `guidance`: the guidance embedding of a guidance-distilled Flux
    (`guidance_embeds`), ignored otherwise. `height`/`width` in pixels (default: the pipeline's). `latents`: initial
    noise in the pipeline's layout (Flux packed). `vae`: also decode. `reuse`: an engine with
    `begin_generation(scheduler=, num_evaluations=, guided=)` and `end_generation()`; one denoising step is one
    evaluation (`num_evaluations = steps`): separate-forward CFG runs it as two forwards in cache contexts "cond" and
    "uncond" (guided=False; the engine keeps one history per context), SD3's batched CFG as one (guided=True).
    """
    family = flow_family(transformer)
    flux = family == "flux"
    cfg = (1.0 if flux else 7.0) if cfg is None else cfg
    if not (isinstance(cfg, (int, float)) and math.isfinite(cfg) and cfg >= 0):
        raise DqarError(f"cfg = {cfg!r} is invalid", "use a guidance scale >= 0 (<= 1 disables guidance)")
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance)):
        raise DqarError(f"guidance = {guidance!r} is invalid", "use a finite guidance-embedding scale (Flux-dev: 3.5)")
    guided = cfg > 1
    neg = (negative_prompt_embeds, negative_pooled_prompt_embeds)
    _check_embeds(transformer, (prompt_embeds, pooled_prompt_embeds), neg, guided, family)
    n, device, dtype = len(prompt_embeds), transformer.device, prompt_embeds.dtype  # the pipelines' latent dtype
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise DqarError(f"{len(generator)} generators for {n} prompts", "pass one generator per prompt")
    scale = vae_scale_factor or (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else FLUX_VAE_SCALE)
    multiple = scale * (2 if flux else transformer.config.patch_size)
    default = scale * (128 if flux else transformer.config.sample_size)
    height, width = height or default, width or default
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % multiple:
            raise DqarError(f"{name} = {v!r} is invalid", f"use a positive multiple of {multiple} pixels")
    h, w = height // scale, width // scale  # latent size
    want = (n, (h // 2) * (w // 2), transformer.config.in_channels) if flux else (n, transformer.config.in_channels, h, w)
    if latents is not None and tuple(latents.shape) != want:
        raise DqarError(f"latents {tuple(latents.shape)} do not fit {height}x{width} px", f"pass latents of shape {want}, or none")
    embeds, pooled = prompt_embeds.to(device), pooled_prompt_embeds.to(device)
    neg_embeds, neg_pooled = (x.to(device) for x in neg) if guided else (None, None)

    if flux:
        if latents is None:
            noise = randn_tensor((n, transformer.config.in_channels // 4, h, w), generator=generator, device=device, dtype=dtype)
            latents = pack_flux(noise)  # (N, h/2 * w/2, 4 C)
        latents = latents.to(device=device, dtype=dtype)
        img_ids = flux_image_ids(h // 2, w // 2, device, dtype)  # (h/2 * w/2, 3)
        txt_ids = torch.zeros(embeds.shape[1], 3).to(device=device, dtype=transformer.dtype)  # (T, 3)
        seq_len = latents.shape[1]
        g = torch.full([1], guidance, device=device, dtype=torch.float32).expand(n) if transformer.config.guidance_embeds else None
    else:
        if latents is None:
            latents = randn_tensor((n, transformer.config.in_channels, h, w), generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype)  # (N, C, h, w)
        seq_len = (h // transformer.config.patch_size) * (w // transformer.config.patch_size)
        if guided:
            embeds, pooled = torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])  # (2N, ...) uncond first
    timesteps = set_flow_timesteps(scheduler, steps, family=family, image_seq_len=seq_len, device=device, mu=mu)
    per_step = 2 if flux and guided else 1
    num_evaluations = len(timesteps)  # denoising steps; each runs per_step forwards
    if reuse is not None:
        reuse.begin_generation(scheduler=scheduler, num_evaluations=num_evaluations, guided=guided and not flux)
    try:
        for t in tqdm(timesteps, disable=not progress, desc="sampling"):
            if flux:
                t_batch = t.expand(latents.shape[0]).to(latents.dtype) / 1000  # (N,) in [0, 1]
                common = dict(hidden_states=latents, timestep=t_batch, guidance=g, txt_ids=txt_ids, img_ids=img_ids,
                              joint_attention_kwargs={}, return_dict=False)
                with transformer.cache_context("cond"):
                    pred = transformer(pooled_projections=pooled, encoder_hidden_states=embeds, **common)[0]
                if guided:
                    with transformer.cache_context("uncond"):
                        neg_pred = transformer(pooled_projections=neg_pooled, encoder_hidden_states=neg_embeds, **common)[0]
                    pred = neg_pred + cfg * (pred - neg_pred)  # (N, h/2 * w/2, 4 C)
            else:
                model_input = torch.cat([latents] * 2) if guided else latents  # (2N or N, C, h, w)
                pred = transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                   encoder_hidden_states=embeds, pooled_projections=pooled, joint_attention_kwargs=None,
                                   return_dict=False)[0]
                if guided:
                    uncond, cond = pred.chunk(2)  # (N, C, h, w) each
                    pred = uncond + cfg * (cond - uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    finally:
        if reuse is not None:
            reuse.end_generation()
    images = None
    if vae is not None:
        x = unpack_flux(latents, h, w) if flux else latents  # (N, C, h, w)
        x = (x / vae.config.scaling_factor) + (vae.config.shift_factor or 0.0)
        images = (vae.decode(x, return_dict=False)[0] * 0.5 + 0.5).clamp(0, 1).float().cpu()  # (N, 3, H, W), as postprocess
    return FlowOutput(latents=latents, images=images, num_evaluations=num_evaluations, forwards_per_step=per_step,
                      timesteps=timesteps, sigmas=scheduler.sigmas)
