"""Learned policies against the best static plan at matched work → docs/FIDELITY.md "Adaptive" (its policy rows).

A policy reuses attention outputs only (its labels are attention perturbations), so it reaches a share of the FLOPs
that whole-block plans pass at once; the adaptive targets (50–80% of FLOPs skipped) are out of its reach. Here each
policy (`policies`: name → checkpoint, e.g. the shipped one and one trained with the probe feature) is compared where
it works: at each attention-reuse target its threshold is bisected on the knob-search seeds (`policy_eval.search`,
the policies' trained schedule), and the best static plan at the same FLOPs share is chosen on the probe seeds from
whole-block plans (`adaptive.static_candidates`, each forecast kind, warm-ups up to the last steps) and the static
attention schedules at the same reuse (`policy_eval.static_choices`). All are scored on the evaluated seeds: paired
PSNR with a 95% bootstrap interval of the difference to that static plan, and between the policies.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from dqar.engine.config import ReuseConfig, RunConfig
from dqar.errors import DqarError
from dqar.labels import cycle_labels
from dqar.studies.fidelity.adaptive import (AdaptiveSettings, _run, _setting, _strip, layer_costs, measure, paired_delta,
                                            static_candidates)

TARGETS = (0.30, 0.45, 0.60)  # attention cells reused (the policy study's targets)
PROBE_SEED, PROBE_SAMPLES, ITERATIONS = 30_000, 4, 8  # the policy study's knob search (`policy_eval.EvaluateSettings`)


def attention_share(loaded, run: RunConfig) -> float:
    """FLOPs skipped per attention cell reused, as a share of all FLOPs (one 1-sample generation reusing attention)."""
    from dqar.generate import generate

    reuse = ReuseConfig(schedule="constant", warmup_frac=0.0, refresh_interval=run.sample.steps, max_staleness=run.sample.steps)
    stats = generate(loaded, [0], RunConfig(reuse=reuse, sample=run.sample), executor="patch").stats
    return stats.flops_skipped_fraction / stats.reuse_fraction


def policy_config(path: str, threshold: float) -> ReuseConfig:
    """A policy at `threshold` on the schedule it was trained for (`policy_eval.DYNAMIC`)."""
    from dqar.studies.fidelity.policy_eval import DYNAMIC

    return ReuseConfig(**DYNAMIC, policy=path, policy_threshold=threshold)


def tuned_threshold(loaded, run: RunConfig, path: str, target: float) -> tuple[float, float]:
    """(threshold, knob-search reuse) bisected so the policy reuses `target` of the attention cells on the search seeds."""
    from dqar.generate import generate
    from dqar.studies.fidelity.policy_eval import Knob, search

    labels = cycle_labels(loaded.num_classes, PROBE_SAMPLES)
    sample = replace(run.sample, seed=PROBE_SEED)
    reuse_of = lambda cfg: generate(loaded, labels, RunConfig(reuse=cfg, sample=sample)).stats.reuse_fraction  # noqa: E731
    knob = Knob("policy", 1e-5, 1.0, "log", lambda v: policy_config(path, v), str)
    return search(knob, target, reuse_of, ITERATIONS)


def static_pool(steps: int, target: float, attn: float, costs, settings: AdaptiveSettings) -> list:
    """(name, config, planned FLOPs share) of the static plans at `target` × `attn` of the FLOPs: whole-block plans per
    kind and the static attention schedules reusing `target` of the cells."""
    from dqar.engine.plan import build_plan
    from dqar.studies.fidelity.policy_eval import static_choices

    share, layers = target * attn, len(costs)
    pool = [c for kind in settings.kinds for c in static_candidates(kind, share, steps, costs, settings.tolerance, steps - 1)]
    for name, cfg, _ in static_choices(steps, layers, target):
        pool.append((f"static attention, {name}", cfg, build_plan(cfg, steps, layers).reuse_fraction * attn))
    return pool


def run_policy_rows(policies: dict[str, str], settings: AdaptiveSettings = AdaptiveSettings(), targets=TARGETS,
                    progress: bool = True, tick: Callable[[str], None] | None = None) -> dict:
    """Per attention-reuse target: each policy tuned and scored, the best static plan at the FLOPs share, paired Δ."""
    from dqar.models import load_model
    from dqar.studies.core import other_seeds
    from dqar.tuning.collect import check_policy_family

    if not policies:
        raise DqarError("no policy to compare", "pass e.g. {'shipped': 'dqar/embedded/weights/policy.safetensors'}")
    loaded = load_model(settings.model)
    check_policy_family(loaded)
    run = _run(loaded, settings)
    tick = tick or (lambda what: print(what, flush=True) if progress else None)
    ev = _setting(loaded, cycle_labels(loaded.num_classes, settings.samples), run)
    probe = _setting(loaded, cycle_labels(loaded.num_classes, settings.probe_samples), other_seeds(run))
    costs, attn = layer_costs(loaded, run), attention_share(loaded, run)
    out = {"attention_share": attn, "policies": dict(policies), "targets": []}
    for target in targets:
        comp = {"target": target, "share": target * attn, "policy": {}, "probe": []}
        rows = {}
        for name, path in policies.items():
            tick(f"{target:.0%} policy {name}: threshold search")
            value, searched = tuned_threshold(loaded, run, path, target)
            rows[name] = measure(ev, f"policy {name}, threshold {value:.4g}", policy_config(path, value),
                                 {"decider": "policy", "policy": name, "threshold": value, "search_reuse": searched})
        pool = static_pool(run.sample.steps, target, attn, costs, settings)
        tick(f"{target:.0%}: {len(pool)} static plans on probe seeds")
        probed = [measure(probe, n, c, {"planned_share": s}) for n, c, s in pool]
        comp["probe"] = [_strip(r) for r in probed]
        if probed:
            pick = max(probed, key=lambda r: r["psnr_db"])
            base = measure(ev, pick["name"], next(c for n, c, _ in pool if n == pick["name"]), {"decider": "static"})
            for row in rows.values():
                row.update(paired_delta(row, base))
            comp["static"] = _strip(base)
        names = list(rows)
        if len(names) == 2:  # the second policy against the first, paired
            comp["between"] = {"first": names[0], "second": names[1], **paired_delta(rows[names[1]], rows[names[0]])}
        comp["policy"] = {k: _strip(v) for k, v in rows.items()}
        out["targets"].append(comp)
    return out
