"""Distilling a learned policy into a plan: the decisions it takes on a few samples, frozen for zero host syncs."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dqar.engine.config import RunConfig
from dqar.errors import DqarError
from dqar.engine.plan import Plan


def check_distillable(run: RunConfig) -> None:
    """A run config that names a policy (checked before any model is loaded)."""
    if not run.reuse.policy:
        raise DqarError("distilling needs a policy", "set policy = \"path/to/policy.safetensors\" in [reuse] or pass --policy")


def distill_plan(loaded, labels: Sequence[int], run: RunConfig, progress: bool = False) -> Plan:
    """Sample `labels` under `run` (whose reuse config names a policy) and return the executed decisions as a plan.

    The plan is keyed by model, sampler and steps like a calibrated plan; sampling with it
    (`plan_file = ...`) makes no host syncs and no policy evaluations.
    """
    from dqar.generate import generate, plan_key

    check_distillable(run)
    gen = generate(loaded, labels, run, progress=progress)
    mask = np.array(gen.stats.reuse_mask, dtype=bool)  # (E, L)
    return Plan(mask=mask, key={**plan_key(loaded.name, run), "distilled_from": run.reuse.policy,
                                "policy_threshold": run.reuse.policy_threshold})

