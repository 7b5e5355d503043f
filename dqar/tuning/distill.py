"""Distilling a dynamic decider into a plan: the decisions it takes on a few samples, frozen for zero host syncs."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dqar.engine.config import RunConfig
from dqar.errors import DqarError
from dqar.engine.plan import Plan
from dqar.generate import generate
from dqar.tuning.calibrate import model_plan_key


def check_distillable(run: RunConfig) -> None:
    """A run config that names a policy (checked before any model is loaded)."""
    if not run.reuse.policy:
        raise DqarError("distilling needs a policy", "set policy = \"path/to/policy.safetensors\" in [reuse] or pass --policy")


def executed_plan(loaded, labels: Sequence[int], run: RunConfig, progress: bool = False) -> Plan:
    """Sample `labels` under `run` and return the decisions its decider executed (gate, policy or plan) as a plan.

    The plan is keyed by model, sampler, steps and layer layout like a calibrated plan; sampling with it makes no
    host syncs and evaluates neither gate nor policy.
    """
    gen = generate(loaded, labels, run, progress=progress)
    return Plan(mask=np.array(gen.stats.reuse_mask, dtype=bool), key=model_plan_key(loaded, run))  # mask (E, L)


def distill_plan(loaded, labels: Sequence[int], run: RunConfig, progress: bool = False) -> Plan:
    """The executed decisions of the policy `run`'s reuse config names, as a plan (`plan_file = ...`) naming that policy."""
    check_distillable(run)
    plan = executed_plan(loaded, labels, run, progress)
    return Plan(mask=plan.mask, key={**plan.key, "distilled_from": run.reuse.policy, "policy_threshold": run.reuse.policy_threshold})
