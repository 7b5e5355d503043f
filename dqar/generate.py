"""One generation with a run config: scheduler + reuse handle + sampler, composed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from dqar.engine.api import enable
from dqar.engine.config import RunConfig
from dqar.sampling import SampleOutput, make_scheduler, sample
from dqar.engine.stats import ReuseStats


@dataclass(frozen=True)
class Generation:
    output: SampleOutput
    stats: ReuseStats | None  # None for the baseline (nothing attached)


def plan_key(model_name: str, run: RunConfig) -> dict:
    """What a plan is valid for: model, sampler and step count."""
    return {"model": model_name, "sampler": run.sample.sampler, "steps": run.sample.steps}


def generate(loaded, labels: Sequence[int], run: RunConfig, *, progress: bool = False, generator=None) -> Generation:
    """Sample `labels` from a loaded model under `run`; reuse is attached only for this call.

    `generator`: one `torch.Generator` per label, replacing the default seeds `run.sample.seed + i`.
    """
    scheduler = make_scheduler(run.sample.sampler, loaded.scheduler_config)
    s = run.sample
    seeding = {"seed": s.seed} if generator is None else {"generator": generator}
    kwargs = dict(scheduler=scheduler, steps=s.steps, cfg=s.cfg, eta=s.eta, vae=loaded.vae,
                  null_class=loaded.null_class, progress=progress, **seeding)
    if not run.reuse.enabled:
        return Generation(sample(loaded.transformer, labels, **kwargs), None)
    with enable(loaded.transformer, run.reuse, key=plan_key(loaded.name, run)) as handle:
        out = sample(loaded.transformer, labels, reuse=handle, **kwargs)
        return Generation(out, handle.stats)
