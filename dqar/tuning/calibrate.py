"""Calibrated plans: record signals in one full-compute pass, then pick the cheapest cells to reuse.

`record_trace` samples a few images with every layer computed and every output stored, and
records, per (evaluation, layer), the error of the reuse the engine would perform there at the
config's `forecast_order` — order 0: the relative change of the output against the previous
evaluation's; order 1/2: its relative error against the engine's own forecast from the layer's
history (`LayerCache.read`, age 1) — with the attention entropy and the SNR of each evaluation.

`derive_plan` turns these errors into a plan, with one of two structures:
- "cells": reusing layer l at evaluation e from the output computed at evaluation s costs (by
  the triangle inequality) at most `Σ_{i=s+1..e} change[i, l]`; cells are added greedily by
  smallest added cost — a reuse run only extends from a computed value and never exceeds
  `max_staleness` — until a target reuse fraction or an error budget is hit;
- "layers": after `first_evaluation` computed evaluations and before a computed last one, each
  layer recomputes once every k_l evaluations (k_l ≤ max_staleness + 1), k_l raised greedily on
  the layer whose estimated added error per reused cell is smallest; an order-N forecast over a
  gap of k evaluations is charged `error · k^(N+1)` (the extrapolation error of a smooth signal).
  A uniform k is the static constant-schedule plan; this only moves reuse between layers.
With `max_patterns` N the plan has at most N distinct rows (the graph executor's whole-model
graphs): derivation is repeated at a higher internal target, bisected, each plan bounded by
`dqar.engine.plan.bound_patterns` (rows only compute more), until the bounded plan reaches the
target reuse fraction (the smallest such internal target is kept; if none reaches it, the bounded
plan with the most reuse). Under an error budget the plan is only bounded: bounding shortens reuse
runs, so no cell's estimated error grows, and more reuse would not fit the budget.
The plan must be sampled with the config it was calibrated for (its key names the forecast order
and granularity). Sampling with the saved plan (`ReuseConfig(plan_file=...)`) makes no host syncs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from dqar.engine.config import RunConfig
from dqar.errors import DqarError
from dqar.engine.plan import Plan, apply_refresh, bound_patterns, load_plan, stream_layout
from dqar.engine.decider import TracingDecider
from dqar.engine.adapter import describe
from dqar.engine.signals import Trace
from dqar.generate import generate, loaded_plan_key
from dqar.tuning.block_trace import record_block_trace


def record_trace(loaded, labels: Sequence[int], run: RunConfig, *, entropy_rows: int | None = None, progress: bool = False) -> Trace:
    """Signals of one full-compute generation of `labels` under `run`'s sampling settings.

    DiT blocks: the engine's `TracingDecider` (entropy, change, SNR). Other families (Flux, SD3), whose signals the engine
    does not record: `dqar.tuning.block_trace` (the change a reuse would miss, per CFG branch; no entropy).
    """
    cfg = replace(run.reuse, enabled=True, gate=False, plan_file="", cfg_share="none", cache_dtype="model")
    if not describe(loaded.transformer).dit_blocks:
        return record_block_trace(loaded, labels, replace(run, reuse=cfg), progress=progress)
    decider = TracingDecider(entropy_rows or cfg.entropy_rows, forecast=cfg.forecast_order > 0)
    generate(loaded, labels, replace(run, reuse=cfg), decider=decider, progress=progress)
    return decider.trace()


# ----- plan derivation --------------------------------------------------------------------------
def _column_costs(change: np.ndarray, col: np.ndarray, limit: int, budget: float, first: int) -> np.ndarray:
    """Added estimated error of reusing each cell of one layer's column (inf where not allowed): (E,)."""
    e_count = len(col)
    costs = np.full(e_count, np.inf)
    known = np.isfinite(change)
    csum = np.concatenate([[0.0], np.cumsum(np.where(known, change, 0.0))])  # csum[i] = Σ change[:i]
    for e in range(first, e_count):
        if col[e] or not known[e]:
            continue
        s = e - 1
        while s >= 0 and col[s]:
            s -= 1  # the computed evaluation that would feed the run
        r = 0
        while e + 1 + r < e_count and col[e + 1 + r]:
            r += 1
        if s < 0 or (e - 1 - s) + 1 + r > limit:
            continue
        own = csum[e + 1] - csum[s + 1]  # error of this cell
        worst = csum[e + 1 + r] - csum[s + 1]  # error of the run's last cell after the merge
        if worst > budget:
            continue
        costs[e] = own * (1 + r)  # this cell, plus `own` added to each of the r cells after it
    return costs


STRUCTURES = ("cells", "layers")


def check_goal(target_fraction: float | None, error_budget: float | None, max_staleness: int, structure: str = "cells",
               first_evaluation: int = 1, max_patterns: int | None = None) -> None:
    """Refuse a plan goal that cannot be met, before any trace is recorded."""
    if max_patterns is not None and (isinstance(max_patterns, bool) or not isinstance(max_patterns, int) or max_patterns < 1):
        raise DqarError(f"max_patterns = {max_patterns!r} is invalid for a plan", "use an integer >= 1 (distinct plan rows)")
    if not isinstance(first_evaluation, int) or first_evaluation < 1:
        raise DqarError(f"first_evaluation = {first_evaluation!r} is invalid", "use an integer >= 1 (evaluation 0 always computes)")
    if structure not in STRUCTURES:
        raise DqarError(f"unknown plan structure '{structure}'", f"choose one of: {', '.join(STRUCTURES)}")
    if structure == "layers" and error_budget is not None:
        raise DqarError("a per-layer ('layers') plan is sized by a reuse fraction, not an error budget", "pass --target instead of --budget")
    if target_fraction is None and error_budget is None:
        raise DqarError("a calibrated plan needs a target reuse fraction or an error budget", "pass --target 0.5 or --budget 0.1")
    if target_fraction is not None and not 0.0 <= target_fraction <= 1.0:
        raise DqarError(f"target fraction {target_fraction} is out of range", "use a number in [0, 1]")
    if error_budget is not None and not error_budget >= 0:
        raise DqarError(f"error budget {error_budget} is invalid", "use a number >= 0")
    if not isinstance(max_staleness, int) or max_staleness < 1:
        raise DqarError(f"max_staleness = {max_staleness!r} is invalid for a plan", "use an integer >= 1")


SEARCH_STEPS = 8  # bisection steps of the internal target when a pattern bound costs reuse


def derive_plan(change: np.ndarray, *, target_fraction: float | None = None, error_budget: float | None = None,
                max_staleness: int = 3, first_evaluation: int = 1, key: dict[str, Any] | None = None,
                structure: str = "cells", order: int = 0, max_patterns: int | None = None) -> Plan:
    """Greedy plan from per-(evaluation, layer) reuse errors (E, L); NaN cells are never reused.

    "cells" stops at `target_fraction` of all cells, or when no cell fits `error_budget` (the
    largest estimated relative error any reused cell may carry), whichever comes first; "layers"
    (per-layer refresh intervals, `order` = the forecast order the plan is run with) stops at the
    first plan reaching `target_fraction`. `max_patterns`: at most this many distinct rows (module docstring).
    """
    check_goal(target_fraction, error_budget, max_staleness, structure, first_evaluation, max_patterns)
    derive = lambda target: _derive(change, target, error_budget, max_staleness, first_evaluation, key, structure, order)  # noqa: E731
    plan = derive(target_fraction)
    if max_patterns is None:
        return plan
    bounded = lambda p: Plan(mask=bound_patterns(p.mask, max_patterns), key={**p.key, "max_patterns": max_patterns})  # noqa: E731
    best = bounded(plan)
    if target_fraction is None or plan.num_patterns <= max_patterns:
        return best
    return _search_target(lambda t: bounded(derive(t)), best, target_fraction)


def _search_target(bounded_at, first: Plan, target: float) -> Plan:
    """Bisect the internal target in [target, 1] for the smallest one whose bounded plan reaches `target` reuse."""
    reaches = lambda p: p.mask.sum() >= round(target * p.mask.size)  # noqa: E731
    if reaches(first):
        return first  # bounding cost nothing the target needed
    best, lo, hi = first, target, 1.0
    for _ in range(SEARCH_STEPS):
        mid = (lo + hi) / 2
        plan = bounded_at(mid)
        if reaches(plan):
            best, hi = plan, mid
        else:
            lo = mid
            if not reaches(best) and plan.reuse_fraction > best.reuse_fraction:
                best = plan
    return best


def _derive(change: np.ndarray, target_fraction: float | None, error_budget: float | None, max_staleness: int,
            first_evaluation: int, key: dict[str, Any] | None, structure: str, order: int) -> Plan:
    """The unbounded plan of `derive_plan`."""
    if structure == "layers":
        return layer_plan(change, target_fraction, max_staleness, first_evaluation, order, key)
    change = np.asarray(change, dtype=np.float64)
    e_count, l_count = change.shape
    c = np.where(np.isfinite(change), change, np.nan)
    budget = np.inf if error_budget is None else float(error_budget)
    goal = e_count * l_count if target_fraction is None else int(round(target_fraction * e_count * l_count))
    mask = np.zeros((e_count, l_count), dtype=bool)
    costs = np.stack([_column_costs(c[:, l], mask[:, l], max_staleness, budget, first_evaluation) for l in range(l_count)], axis=1)
    for _ in range(goal):
        flat = int(np.argmin(costs))
        e, l = divmod(flat, l_count)
        if not np.isfinite(costs[e, l]):
            break
        mask[e, l] = True
        costs[:, l] = _column_costs(c[:, l], mask[:, l], max_staleness, budget, first_evaluation)
    return Plan(mask=mask, key=dict(key or {}))


def interval_mask(num_evaluations: int, interval: int, first_evaluation: int) -> np.ndarray:
    """(E,) bool: one layer reusing between `first_evaluation` and the last evaluation, recomputing every `interval`."""
    eligible = np.zeros((num_evaluations, 1), dtype=bool)
    eligible[first_evaluation: num_evaluations - 1] = True
    return apply_refresh(eligible, interval, interval - 1)[:, 0]


def layer_plan(change: np.ndarray, target_fraction: float, max_staleness: int, first_evaluation: int, order: int,
               key: dict[str, Any] | None) -> Plan:
    """Per-layer refresh intervals from reuse errors (E, L): raise the interval of the cheapest layer until the target."""
    change = np.asarray(change, dtype=np.float64)
    e_count, l_count = change.shape
    scale = np.nan_to_num(np.nanmean(np.where(np.isfinite(change[first_evaluation:]), change[first_evaluation:], np.nan), axis=0),
                          nan=np.inf)  # (L,) mean reuse error per layer; a layer never measured never reuses
    masks = [interval_mask(e_count, k, first_evaluation) for k in range(1, max_staleness + 2)]  # masks[k-1]: interval k
    cost = lambda l, k: scale[l] * k ** (order + 1) * masks[k - 1].sum()  # noqa: E731  estimated error summed over reused cells
    intervals = np.ones(l_count, dtype=np.int64)
    goal = target_fraction * e_count * l_count
    while sum(masks[k - 1].sum() for k in intervals) < goal:
        options = [((cost(l, k + 1) - cost(l, k)) / max(masks[k].sum() - masks[k - 1].sum(), 1), l)
                   for l, k in enumerate(intervals) if k <= max_staleness and np.isfinite(scale[l])]
        if not options:
            break
        intervals[min(options)[1]] += 1
    mask = np.stack([masks[k - 1] for k in intervals], axis=1)  # (E, L)
    return Plan(mask=mask, key={**(key or {}), "intervals": [int(k) for k in intervals]})


def estimated_error(change: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Estimated relative error of each reused cell (0 where computed): (E, L)."""
    change = np.nan_to_num(np.asarray(change, dtype=np.float64), nan=0.0)
    err = np.zeros_like(change)
    acc = np.zeros(change.shape[1])
    for e in range(change.shape[0]):
        acc = np.where(mask[e], acc + change[e], 0.0)
        err[e] = acc
    return err


@dataclass(frozen=True)
class Calibration:
    plan: Plan
    trace: Trace


def model_plan_key(loaded, run: RunConfig) -> dict[str, Any]:
    """`plan_key` of `loaded` under `run` with the sampler it really runs ("flow" for a flow model, as `generate` keys it,
    whatever `run.sample.sampler` says) and its layer layout (`streams`: each layer's output streams)."""
    return {**loaded_plan_key(loaded, run), "streams": stream_layout(loaded.transformer)}


def check_plan_file(loaded, run: RunConfig) -> None:
    """The plan file `run` names, against the loaded model: refused in one line where it was made for another model,
    sampler, step count, reuse or layer layout (a file that records no `streams`: its layer count only)."""
    if run.reuse.plan_file:
        load_plan(run.reuse.plan_file).check_key(**model_plan_key(loaded, run))


def calibration_key(loaded, run: RunConfig, structure: str) -> dict[str, Any]:
    """What a calibrated plan is valid for: model, sampler, steps, the reuse it was ranked for (granularity, forecast order, axis) and its structure."""
    return {**model_plan_key(loaded, run), "structure": structure}


def calibrate(loaded, labels: Sequence[int], run: RunConfig, *, target_fraction: float | None = None,
              error_budget: float | None = None, max_staleness: int | None = None, first_evaluation: int = 1,
              structure: str = "cells", max_patterns: int | None = None, progress: bool = False) -> Calibration:
    """Record a trace of `labels` under `run` (at its forecast order) and derive a plan keyed by what it is valid for.

    `max_patterns`: the plan has at most this many distinct rows (see the module docstring).
    """
    staleness = run.reuse.max_staleness if max_staleness is None else max_staleness
    check_goal(target_fraction, error_budget, staleness, structure, first_evaluation, max_patterns)
    trace = record_trace(loaded, labels, run, progress=progress)
    plan = derive_plan(trace.change, target_fraction=target_fraction, error_budget=error_budget, max_staleness=staleness,
                       first_evaluation=first_evaluation, key=calibration_key(loaded, run, structure),
                       structure=structure, order=run.reuse.forecast_order, max_patterns=max_patterns)
    return Calibration(plan=plan, trace=trace)
