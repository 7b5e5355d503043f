"""Per-sample refresh against the batch verifying decider, at the matched work of a saved "Adaptive" comparison.

`extend_with_per_sample(saved, settings)` adds to each target of a `run_adaptive` result the verifying decider with
`verify_per_sample = true` (each sample refreshes on its own probe error; the batch splits after the probe block,
`dqar.engine.verify_rows`), for each forecaster in `kinds`, its τ scale bisected on the calibration seeds to the
target as the batch decider's is. Each row is scored on the evaluated seeds and paired twice: with the re-measured
best static plan, and with the re-measured batch verifying decider of the same kind (both refused where they no
longer score as saved). `dqar fidelity --section adaptive --extend per-sample` runs it on the saved result.
"""
from __future__ import annotations

import copy
from typing import Callable

from dqar.studies.fidelity.adaptive import (AdaptiveSettings, calibrated_verify, measure, paired_delta, remeasure,
                                            saved_setting)

KINDS = ("bdf2_heun",)  # the adaptive preset's forecaster


def per_sample_row(comp: dict, kind: str, ev, costs, settings: AdaptiveSettings, base: dict) -> dict | None:
    """At one saved comparison: the per-sample decider with `kind`, calibrated and scored, paired with `base` (the best
    static plan) and with the batch decider of the same kind; None where the saved comparison has no batch row."""
    kept = comp["verify"].get(kind)
    if kept is None:
        return None
    batch = remeasure(ev, kept, comp["target"])
    cfg, cal = calibrated_verify(ev.study.loaded, ev.run, kind, comp["target"], settings, costs, per_sample=True)
    row = measure(ev, f"per-sample verify {kind}, τ × {cal['scale']:.3g}, ≤ {cal['max_interval']} reuses", cfg,
                  {"kind": kind, "decider": "verify per sample", "calibration": cal})
    row.update(paired_delta(row, base))
    vs = paired_delta(row, batch)
    row.update(batch_name=batch["name"], batch_flops_skipped=batch["flops_skipped"], batch_psnr_db=batch["psnr_db"],
               delta_vs_batch_db=vs["delta_db"], delta_vs_batch_ci=vs["delta_ci"])
    row.pop("psnr_per_sample")
    return row


def extend_with_per_sample(saved: dict, settings: AdaptiveSettings, kinds: tuple[str, ...] = KINDS, progress: bool = True,
                           checkpoint: Callable[[dict], None] | None = None) -> dict:
    """`saved` with a "per_sample" entry at each target (module docstring); the saved result itself is not changed."""
    from tqdm import tqdm

    ev, costs = saved_setting(saved, settings)
    result = copy.deepcopy(saved)
    result["settings"] = {**saved["settings"], "per_sample_kinds": list(kinds)}
    comps = [result["at_full_dqar"], *result["targets"]]
    bar = tqdm(disable=not progress, desc="adaptive per-sample rows", total=len(comps))
    for comp in comps:
        bar.set_postfix_str(f"{comp['target']:.0%}")
        base = remeasure(ev, comp["static"][comp["best_static_kind"]], comp["target"])
        rows = {kind: per_sample_row(comp, kind, ev, costs, settings, base) for kind in kinds}
        comp["per_sample"] = {k: v for k, v in rows.items() if v is not None}
        bar.update(1)
        if checkpoint:
            checkpoint(result)
    bar.close()
    return result
