"""Learned policies against the best static plan at matched work → docs/FIDELITY.md "Adaptive" (its policy rows).

A policy reuses attention outputs only (its labels are attention perturbations), so it reaches a share of the FLOPs
that whole-block plans pass at once; the adaptive targets (50–80% of FLOPs skipped) are out of its reach. Here each
policy (`policies`: name → checkpoint, e.g. the shipped one and one trained with the probe feature) is compared where
it works: at each attention-reuse target its threshold is bisected on the knob-search seeds (`policy_eval.search`,
the policies' trained schedule), and the best static plan at the same FLOPs share is chosen on the probe seeds from
whole-block plans (`adaptive.static_candidates`, each forecast kind, warm-ups up to the last steps) and the static
attention schedules at the same reuse (`policy_eval.static_choices`). All are scored on the evaluated seeds: paired
PSNR with a 95% bootstrap interval of the difference to that static plan, and between the policies.

A block-feature policy (`features.BLOCK_FEATURES`, any family) reuses whole blocks and reaches the adaptive targets
themselves: `extend_with_policy` adds it to a saved `run_adaptive` result at each target and at full_dqar's share,
with full_dqar's history and the policy's forecaster, its threshold bisected on the knob-search seeds to the target's
FLOPs share, paired with the target's best static plan re-measured (`adaptive.remeasure`), as the gate rows are.
`dqar fidelity --section adaptive --extend policy` runs it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from dqar.engine.config import ReuseConfig, RunConfig
from dqar.errors import DqarError
from dqar.labels import cycle_labels
from dqar.studies.fidelity.adaptive import (AdaptiveSettings, _run, _setting, _strip, layer_costs, measure, paired_delta,
                                            remeasure, saved_setting, static_candidates)

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


# ----- block-feature policies at the adaptive targets ----------------------------------------------------------
def block_policy_config(path: str, threshold: float, meta: dict) -> ReuseConfig:
    """full_dqar's history under a block-feature policy: its forecaster, every layer a candidate up to its labelled age."""
    from dqar.engine.config import preset

    age = int(meta.get("max_age", 3))
    return replace(preset("full_dqar"), schedule="constant", refresh_interval=age + 1, max_staleness=age,
                   forecast_kind=meta.get("forecast_kind", "taylor"), forecast_order=int(meta.get("forecast_order") or 0),
                   policy=path, policy_threshold=threshold)


def block_threshold(loaded, run: RunConfig, path: str, meta: dict, share: float) -> tuple[float, float]:
    """(threshold, knob-search FLOPs share) bisected so the policy skips `share` of the FLOPs on the search seeds."""
    from dqar.generate import generate
    from dqar.studies.fidelity.policy_eval import Knob, search

    labels = cycle_labels(loaded.num_classes, PROBE_SAMPLES)
    sample = replace(run.sample, seed=PROBE_SEED)
    skipped = lambda cfg: generate(loaded, labels, RunConfig(reuse=cfg, sample=sample)).stats.flops_skipped_fraction  # noqa: E731
    knob = Knob("policy", 1e-5, 1.0, "log", lambda v: block_policy_config(path, v, meta), str)
    return search(knob, share, skipped, ITERATIONS)


def block_policies(policies: dict[str, str], model_name: str) -> dict[str, dict]:
    """name → checkpoint metadata, each a block-feature policy trained for `model_name`; refused in one line otherwise."""
    from dqar.engine.features import dit_only
    from dqar.engine.policy_net import load_policy
    from dqar.tuning.train import check_trained_for

    if not policies:
        raise DqarError("no policy to add", "pass a block-feature policy: --policy PATH (dqar policy collect --granularity block)")
    metas = {}
    for name, path in policies.items():
        meta = load_policy(path).meta
        check_trained_for(meta, model_name)
        if dit_only(meta.get("features", ())) or meta.get("granularity") != "block":
            raise DqarError(f"policy {path} reuses attention outputs: the adaptive targets need a block-feature policy",
                            f"collect one: dqar policy collect --model {model_name} --granularity block")
        metas[name] = meta
    return metas


def extend_with_policy(saved: dict, settings: AdaptiveSettings, policies: dict[str, str], progress: bool = True) -> dict:
    """`saved` (a `run_adaptive` result at `settings`) with each block-feature policy's row at each target (module
    docstring); between two policies, their paired difference too."""
    import copy

    from tqdm import tqdm

    ev, costs = saved_setting(saved, settings)
    loaded = ev.study.loaded
    metas = block_policies(policies, loaded.name)
    result = copy.deepcopy(saved)
    result["block_policies"] = {n: {"path": p, "features": list(metas[n]["features"]), "max_age": metas[n].get("max_age"),
                                    "forecast_kind": metas[n].get("forecast_kind")} for n, p in policies.items()}
    comps = [result["at_full_dqar"], *result["targets"]]
    bar = tqdm(disable=not progress, desc="adaptive policy rows", total=len(comps) * len(policies))
    tol = settings.tolerance
    for comp in comps:
        base = remeasure(ev, comp["static"][comp["best_static_kind"]], comp["target"])
        rows = {}
        for name, path in policies.items():
            bar.set_postfix_str(f"{comp['target']:.0%} {name}")
            value, probe_share = block_threshold(loaded, ev.run, path, metas[name], comp["target"])
            row = measure(ev, f"policy {name}, threshold {value:.3g}, ≤ {metas[name].get('max_age', 3)} reuses",
                          block_policy_config(path, value, metas[name]), {"decider": "policy", "policy": name, "threshold": value})
            row["calibration"] = {"reached": abs(probe_share - comp["target"]) <= tol, "calibrated_share": probe_share}
            rows[name] = {**row, **paired_delta(row, base)}
            bar.update(1)
        names = list(rows)
        if len(names) == 2:
            comp["policy_between"] = {"first": names[0], "second": names[1], **paired_delta(rows[names[1]], rows[names[0]])}
        comp["policy"] = {k: _strip(v) for k, v in rows.items()}
        comp["policy_base_psnr_db"] = base["psnr_db"]
    bar.close()
    return result
