"""Class-conditional DiT sampling (DDIM, DPM-Solver++ 2M) with classifier-free guidance.

`sample` reproduces `diffusers.DiTPipeline.__call__` bit for bit when no reuse
engine is attached: the same noise draw, the same batched 2N guidance forward
(conditional half first, null class = `num_embeds_ada_norm`), the same guidance
arithmetic, scheduler calls and VAE decode. Two deliberate differences that do
not change any value: the scheduler steps the N guided rows instead of two
identical copies of them, and the timesteps are moved to the model's device
once before the loop (no host-device copy per step).

Schedulers: DDIM (Song et al., 2021, arXiv:2010.02502) and DPM-Solver++(2M)
(Lu et al., 2022, arXiv:2211.01095).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from dqar.errors import DqarError

SCHEDULERS = ("ddim", "dpm")


@dataclass(frozen=True)
class SampleOutput:
    """What one call of `sample` produced."""

    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1], on the CPU
    latents: torch.Tensor  # (N, C_lat, h, w) final latents, on the model's device, in the sampling dtype
    num_evaluations: int  # transformer forwards made (one per scheduler step)


def make_scheduler(name: str, scheduler_config: dict) -> Any:
    """A fresh scheduler: "ddim" (DDIM) or "dpm" (DPM-Solver++ 2M) built from a scheduler config dict."""
    if name == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
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
