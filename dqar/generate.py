"""One generation with a run config: scheduler + reuse handle + sampler, composed.

Every study, the calibrator, policy collection and bench sample through `generate`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from dqar.engine.api import enable
from dqar.engine.config import RunConfig
from dqar.engine.plan import Plan
from dqar.engine.stats import ReuseStats
from dqar.sampling import SampleOutput, make_scheduler, sample


@dataclass(frozen=True)
class Generation:
    output: SampleOutput
    stats: ReuseStats | None  # None for the baseline (nothing attached)
    executor: str | None = None  # the executor that ran ("auto" resolved); None for the baseline


def plan_key(model_name: str | None, run: RunConfig) -> dict:
    """What a run checks a plan against: model, sampler, step count, and the reuse a forecast plan was ranked for.

    A plan's key may hold fewer names (a copy-reuse plan records no forecast order); `Plan.check_key` compares the names it
    has and skips a None value (`model_name = None` before the model is loaded).
    """
    r = run.reuse
    return {"model": model_name, "sampler": run.sample.sampler, "steps": run.sample.steps,
            "granularity": r.granularity, "forecast_order": r.forecast_order, "forecast_axis": r.forecast_axis}


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
    scheduler = make_scheduler(run.sample.sampler, loaded.scheduler_config)
    s = run.sample
    seeding = {"seed": s.seed} if generator is None else {"generator": generator}
    kwargs = dict(scheduler=scheduler, steps=s.steps, cfg=s.cfg, eta=s.eta, vae=loaded.vae,
                  null_class=loaded.null_class, progress=progress, **seeding)
    given = {k: v for k, v in (("decider", decider), ("plan", plan), ("executor", executor)) if v is not None}
    if not run.reuse.enabled and decider is None and plan is None and executor in (None, "auto", "patch"):
        return Generation(sample(loaded.transformer, labels, **kwargs), None)
    with enable(loaded.transformer, run.reuse, key=plan_key(loaded.name, run), **given) as handle:
        out = sample(loaded.transformer, labels, reuse=handle, **kwargs)
        return Generation(out, handle.stats, handle.executor)
