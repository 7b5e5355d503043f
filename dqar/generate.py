"""One generation with a run config: scheduler + reuse handle + sampler, composed.

Every study, the calibrator, policy collection and bench sample through `generate`. A DiT samples class labels with
`dqar.sampling.sample`; a flow model (Flux, SD3: `loaded.family`) samples with `sample_flow`, and its "labels" are prompt
ids: random-weight models have no text encoder, so id i is a seeded random prompt embedding (`prompt_embeddings`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from dqar.engine.api import enable
from dqar.engine.config import RunConfig
from dqar.engine.plan import Plan
from dqar.engine.stats import ReuseStats
from dqar.errors import DqarError
from dqar.sampling import FLUX_VAE_SCALE, FlowOutput, SampleOutput, make_scheduler, sample, sample_flow, unpack_flux

PROMPT_SEED = 1_000_003  # prompt id i's embeddings come from torch.Generator().manual_seed(PROMPT_SEED + i)


@dataclass(frozen=True)
class Generation:
    output: SampleOutput | FlowOutput  # FlowOutput for a flow model (images None without a VAE)
    stats: ReuseStats | None  # None for the baseline (nothing attached)
    executor: str | None = None  # the executor that ran ("auto" resolved); None for the baseline


def plan_key(model_name: str | None, run: RunConfig) -> dict:
    """What a run checks a plan against: model, sampler, step count, and the reuse (granularity, forecast order, axis and
    kind) a forecast plan was ranked for.

    A plan's key may hold fewer names (a copy-reuse plan records no forecast order); `Plan.check_key` compares the names it
    has and skips a None value (`model_name = None` before the model is loaded).
    """
    r = run.reuse
    return {"model": model_name, "sampler": run.sample.sampler, "steps": run.sample.steps,
            "granularity": r.granularity, "forecast_order": r.forecast_order, "forecast_axis": r.forecast_axis,
            "forecast_kind": r.forecast_kind}


def loaded_plan_key(loaded, run: RunConfig) -> dict:
    """`plan_key` of a loaded model under `run`: its name, and the sampler it really runs ("flow" for a flow model,
    whatever `run.sample.sampler` says)."""
    key = plan_key(loaded.name, run)
    return key | {"sampler": "flow"} if getattr(loaded, "family", "dit") != "dit" else key


def generate(loaded, labels: Sequence[int], run: RunConfig, *, decider: Any = None, plan: Plan | None = None,
             executor: str | None = None, progress: bool = False, generator=None) -> Generation:
    """Sample `labels` from a loaded model under `run`; reuse is attached only for this call.

    `decider`, `plan`, `executor`: what `dqar.enable` takes; None means what `run.reuse` asks for
    (its decider and plan, the default executor "auto": graph on CUDA where it applies, else patch).
    Reuse is attached when `run.reuse` is enabled, a decider or plan is given, or an executor other
    than "auto" / "patch" (a disabled config under the compiled executor is the compiled no-reuse
    path; under "auto" or "patch" it is the stock model: nothing attached, stats None).
    `generator`: one `torch.Generator` per label, replacing the default seeds `run.sample.seed + i`.
    """
    if getattr(loaded, "family", "dit") != "dit":
        return _generate_flow(loaded, labels, run, decider, plan, executor, progress, generator)
    scheduler = make_scheduler(run.sample.sampler, loaded.scheduler_config)
    s = run.sample
    seeding = {"seed": s.seed} if generator is None else {"generator": generator}
    kwargs = dict(scheduler=scheduler, steps=s.steps, cfg=s.cfg, eta=s.eta, vae=loaded.vae,
                  null_class=loaded.null_class, progress=progress, **seeding)
    given = {k: v for k, v in (("decider", decider), ("plan", plan), ("executor", executor)) if v is not None}
    if not run.reuse.enabled and decider is None and plan is None and executor in (None, "auto", "patch"):
        return Generation(sample(loaded.transformer, labels, **kwargs), None)
    with enable(loaded.transformer, run.reuse, key=loaded_plan_key(loaded, run), **given) as handle:
        out = sample(loaded.transformer, labels, reuse=handle, **kwargs)
        return Generation(out, handle.stats, handle.executor)


def prompt_embeddings(loaded, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, T, joint_attention_dim), (N, pooled_projection_dim)) embeddings of prompt ids: rows of the model's learned
    prompt table where it has one, else seeded unit-Gaussian ones on the model's device in its dtype (cached)."""
    c, t = loaded.transformer.config, loaded.transformer
    ids = tuple(int(i) for i in ids)
    bad = [i for i in ids if not 0 <= i <= loaded.null_class]
    if not ids or bad:
        what = "its learned prompt" if loaded.prompts is not None else "one seeded random prompt"
        raise DqarError(f"prompt id {bad[0] if bad else 'list'} is invalid for {loaded.name}",
                        f"use ids in [0, {loaded.num_classes - 1}] ({what} each)")
    if loaded.prompts is not None:  # a learned table (embedded-flux): row i is class i's prompt, row null_class the null one
        idx = torch.tensor(ids, device=loaded.prompts["prompt_embeds"].device)
        return loaded.prompts["prompt_embeds"][idx], loaded.prompts["pooled_prompt_embeds"][idx]  # (N, T, D), (N, P)
    return _embeddings(ids, loaded.text_tokens, c.joint_attention_dim, c.pooled_projection_dim, t.device, t.dtype)


@functools.lru_cache(maxsize=4)
def _embeddings(ids: tuple, tokens: int, dim: int, pooled: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gens = [torch.Generator().manual_seed(PROMPT_SEED + i) for i in ids]
    embeds = torch.stack([torch.randn(tokens, dim, generator=g) for g in gens])  # (N, T, D)
    pools = torch.stack([torch.randn(pooled, generator=g) for g in gens])  # (N, P)
    return embeds.to(device=device, dtype=dtype), pools.to(device=device, dtype=dtype)


def _generate_flow(loaded, labels, run: RunConfig, decider, plan, executor, progress, generator) -> Generation:
    """Flow matching (`sample_flow`): labels are prompt ids; CFG (cfg > 1) uses the negative prompt id `null_class`.

    Flux: cfg <= 1 is one forward per step with the guidance embedding (`loaded.guidance`); cfg > 1 is true CFG
    (two forwards). SD3: cfg > 1 batches [uncond; cond]. Noise: sample i draws from seed `run.sample.seed + i`.
    """
    s = run.sample
    scheduler = make_scheduler("flow", loaded.scheduler_config)
    embeds, pooled = prompt_embeddings(loaded, labels)
    neg = prompt_embeddings(loaded, [loaded.null_class] * len(embeds)) if s.cfg > 1 else (None, None)
    gens = generator if generator is not None else [torch.Generator().manual_seed(s.seed + i) for i in range(len(embeds))]
    kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg[0],
                  negative_pooled_prompt_embeds=neg[1], height=loaded.resolution, width=loaded.resolution, steps=s.steps,
                  cfg=s.cfg, guidance=loaded.guidance if loaded.guidance is not None else 3.5, generator=gens,
                  vae=loaded.vae, progress=progress)
    given = {k: v for k, v in (("decider", decider), ("plan", plan), ("executor", executor)) if v is not None}
    if not run.reuse.enabled and decider is None and plan is None and executor in (None, "auto", "patch"):
        return Generation(_pixels(loaded, sample_flow(loaded.transformer, scheduler, **kwargs)), None)
    with enable(loaded.transformer, run.reuse, key=loaded_plan_key(loaded, run), **given) as handle:
        out = sample_flow(loaded.transformer, scheduler, reuse=handle, **kwargs)
        return Generation(_pixels(loaded, out), handle.stats, handle.executor)


def _pixels(loaded, out: FlowOutput) -> FlowOutput:
    """A pixel-space Flux's (embedded-flux) images: its unpacked final latents, [-1, 1] → (N, C, H, W) in [0, 1] on the CPU."""
    if out.images is not None or not loaded.pixel_space or loaded.family != "flux":
        return out
    side = loaded.resolution // FLUX_VAE_SCALE  # the latent side: 28 for embedded-flux's 224 "pixels"
    images = ((unpack_flux(out.latents, side, side).float() + 1.0) * 0.5).clamp(0.0, 1.0).cpu()  # (N, C, side, side)
    return replace(out, images=images)
