"""The learned-policy study's report and command: plot, JSON and the docs/FIDELITY.md section of a
`policy_eval.run_policy_study` result, and `dqar policy evaluate` (`add_arguments`, `run_command`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dqar.engine.config import SampleConfig

SAMPLERS = {"flow": "flow matching", "ddim": "DDIM", "dpm": "DPM-Solver++"}  # a policy's recorded sampler, in words
from dqar.studies.fidelity.policy_eval import (FAMILIES, EvaluateSettings, present, run_policy_study, section_for,
                                               shipped_policy, stem_for, trained_setting)


def plot(result: dict, path: Path) -> None:
    from dqar.reporting.plots import fidelity_panels

    series = []
    markers = {"policy": "*", "policy_plan": "P", "gate_snr": "s", "gate_entropy": "D", "gate_probe": "v", "calibrated": "^",
               "static": "o"}
    for fam in present(result["rows"]):
        marker = markers[fam]
        rows = sorted((r for r in result["rows"] if r["family"] == fam), key=lambda r: r["reuse"])
        series.append({"label": FAMILIES[fam], "x": [100 * r["reuse"] for r in rows],
                       "psnr": [r["psnr_db"] for r in rows], "fd": [r["fd"] for r in rows],
                       "style": {"marker": marker, "linestyle": "-" if fam != "static" else "none",
                                 "markersize": 9 if fam == "policy" else 6}})
    fidelity_panels(series, result["baseline"]["fd"], "reuse (% of evaluation x layer cells)", "FD to Fashion-MNIST test", path)


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None or not np.isfinite(v) else format(v, spec)


def _reused(order: int) -> str:
    """What a reuse returns at `order`, in the label's formula."""
    return "o_(e−age)" if not order else f"the order-{order} forecast from o_(e−age), o_(e−age−1), …"


def _training_lines(report: dict | None) -> list[str]:
    if not report:
        return ["(no training report found next to the checkpoint)"]
    h, v, trained = report["heldout"], report.get("label_validation"), report["trained_for"]
    col = report.get("collect") or {}
    lines = [
        f"- MLP {trained.get('features') and len(trained['features'])} features → {' → '.join(map(str, report['settings']['hidden']))} → 1, "
        f"**{report['parameters']} parameters**, trained {report.get('seconds', 0):.0f}s on {report['split']['train_rows']} rows "
        f"({len(report['split']['train_generations'])} generations); held out: {len(report['split']['heldout_generations'])} "
        f"generations ({report['split']['heldout_rows']} rows, other seeds).",
        f"- Held-out fit of the log error: R² {h['r2_log']:.3f}, Spearman {h['spearman']:.3f} (one-feature baseline "
        f"*last change rate × age*: {h['spearman_naive']:.3f}).",
    ]
    for q, d in h["decisions"].items():
        if d["precision"] is not None:
            lines.append(f"- Held-out decisions at τ = the {100 * float(q):.0f}% quantile of the labels ({d['tau']:.2e}): the policy says "
                         f"reuse for {100 * d['predicted_safe']:.1f}% of cells; precision {100 * d['precision']:.1f}%, recall "
                         f"{100 * d['recall']:.1f}%.")
    if v:
        single = "n/a" if v["spearman_single_cells"] is None else f"{v['spearman_single_cells']:.3f}"
        lines.append(f"- Label vs final image: over {v['groups']} reuse runs (single cells and runs of up to {trained.get('max_age')} "
                     f"cells of one layer, {v['samples']} images, seeds {v['seed']}+), the summed labels rank the relative L2 error "
                     f"of the final images with Spearman **{v['spearman']:.3f}** (single cells only: {single}, {v['single_cells']} runs); "
                     f"the {'block residual' if trained.get('granularity') == 'block' else 'attention output'}'s plain relative "
                     "change (what calibrated plans use) reaches "
                     f"{_fmt(v.get('spearman_attention_change'), '.3f')} (single cells {_fmt(v.get('spearman_attention_change_single_cells'), '.3f')}).")
    if col:
        lines.append(f"- Traces: {col.get('generations')} generations × {col.get('batch')} samples (seeds {col.get('seed')}+), "
                     f"{SAMPLERS.get(trained.get('sampler'), str(trained.get('sampler', '')).upper())} {trained.get('steps')} "
                     f"steps, CFG {trained.get('cfg')}.")
    return lines


def markdown(result: dict, report: dict | None, plot_name: str) -> str:
    s, b, v = result["settings"], result["baseline"], result["verdict"]
    block = s.get("granularity") == "block"
    families = present(result["rows"])
    sampling = result.get("sampling") or f"{s['sampler'].upper()} {s['steps']} steps, CFG {s['cfg']}"
    lines = [
        f"## {section_for(s.get('forecast_order', 0), s.get('model'))}",
        "",
        f"Produced by `dqar policy evaluate` on the {result['model']} model with the policy `{Path(result['policy']).name}`: "
        f"{s['samples']} samples (labels cycling over the classes, seeds {s['seed']}…{s['seed'] + s['samples'] - 1} — none used "
        f"to train, validate or tune anything), {sampling}. "
        f"Policy, gate and calibrated plans share: {'whole blocks, ' if block else ''}every layer eligible, no warmup (evaluation 0 "
        "computes), refresh 4, max staleness 3"
        + (f", forecast {s['forecast_kind']}" if s.get("forecast_kind", "taylor") != "taylor" else "")
        + (f", forecast order {s['forecast_order']} (static schedules too)" if s.get("forecast_order") else "") + ". Knobs were "
        f"set per target reuse by {s['probe_iterations']} bisection steps on {s['probe_samples']} probe samples (seeds "
        f"{s['probe_seed']}+); calibrated plans come from a full-compute trace of {s['calib_samples']} samples (seeds "
        f"{s['calib_seed']}+, the policy's training range); static schedules are the grid configurations (constant/linear, "
        "refresh 2–4, warmup 0–30%, cooldown 0–20%) whose plans come closest, one without and one with a cooldown. "
        f"No reuse: FD **{b['fd']:.2f}**, class accuracy **{100 * b['class_accuracy']:.1f}%** (one image = "
        f"{100 / s['samples']:.0f} points). The policy's decisions at each threshold were also frozen into a plan on the "
        "calibration samples (`dqar policy distill`; rows *policy → plan*, no host syncs)."
        + (f" The study took {result['seconds']:.0f} s wall ({result.get('cpu_seconds', 0):.0f} s CPU)." if "seconds" in result else ""),
        "",
        "**How the policy was made** (label: the measured relative perturbation a reuse injects into the block's residual "
        + (f"streams, `max_s ‖ŷ_s − r_e,s‖ / ‖h_e,s‖` over the image and text streams, ŷ the {s.get('forecast_kind')} forecast "
           f"(order {s.get('forecast_order', 0)}) of the block residuals r computed at e−age, e−age−1, …, h the block's input; "
           "features: the model-agnostic block set" if block else
           f"stream, `‖gate_msa_e ⊙ ({_reused(s.get('forecast_order', 0))} − o_e)‖ / ‖h_e‖`")
        + ", from full-compute generations; see docs/POLICY.md):",
        "",
        *_training_lines(report),
        "",
        "| family | configuration | target % | reuse % | host syncs / eval | PSNR dB | SSIM | class acc % | FD |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| baseline | no reuse | — | 0.0 | 0.00 | — | {b['ssim']:.4f} | {100 * b['class_accuracy']:.1f} | {b['fd']:.2f} |",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["target"], list(FAMILIES).index(r["family"]))):
        lines.append(f"| {FAMILIES[r['family']]} | {r['name']} | {100 * r['target']:.0f} | {100 * r['reuse']:.1f} | "
                     f"{r['host_syncs_per_evaluation']:.2f} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | {100 * r['class_accuracy']:.1f} | "
                     f"{r['fd']:.2f} |")
    lines += [
        "",
        f"![policy vs other methods]({plot_name})",
        "",
        "**At matched reuse** (each family's PSNR interpolated on its own Pareto frontier at the exact target; — where the "
        "family never reuses that much):",
        "",
        "| target reuse % | " + " | ".join(FAMILIES[f] for f in families) + " | policy − best other |",
        "|---:|" + "---:|" * len(families) + "---|",
    ]
    for t in v["per_target"]:
        cells = " | ".join(_fmt(t["psnr_at"].get(f)) for f in families)
        best = FAMILIES.get(t["best_other"], "—")
        lines.append(f"| {100 * t['target']:.0f} | {cells} | {_fmt(t['policy_minus_best_db'], '+.2f')} dB vs {best} "
                     f"({'met' if t['met'] else 'missed'}) |")
    lines += ["", f"Target (the policy at least as good as the best other method at equal reuse): **{'met' if v['met'] else 'missed'}**"
              + ("" if v["met"] else " — see the rows above; the policy stays available as an option") + ".",
              "", f"Raw numbers: `{Path(plot_name).with_suffix('.json').name}`.", ""]
    return "\n".join(lines)


def write_policy_section(result: dict, out_dir: str | Path) -> Path:
    """Write the plot, the JSON and the FIDELITY.md section (other sections untouched); returns the Markdown path."""
    from dqar.io import atomic_write_json
    from dqar.reporting.documents import write_section

    out = Path(out_dir)
    order, model = result["settings"].get("forecast_order", 0), result["settings"].get("model")
    stem = stem_for(order, model)
    plot(result, out / f"{stem}.png")
    atomic_write_json(out / f"{stem}.json", result)
    side = Path(result["policy"]).with_suffix(".json")
    report = json.loads(side.read_text()) if side.is_file() else None
    return write_section(out / "FIDELITY.md", section_for(order, model), markdown(result, report, f"{stem}.png"))


# ----- command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvaluateSettings()
    p.add_argument("--policy", default="", help="policy checkpoint (default: the shipped policy of --model)")
    p.add_argument("--model", default=None, help="model the policy was trained for (default: embedded)")
    p.add_argument("--samples", type=int, default=d.samples, help=f"evaluated images (default {d.samples})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"base seed of the evaluated images (default {d.seed})")
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps (default {d.steps}; embedded-flux 28)")
    p.add_argument("--cfg", type=float, default=d.cfg, help=f"guidance scale (default {d.cfg})")
    p.add_argument("--targets", type=float, nargs="+", default=list(d.targets), help="reuse fractions to match (default 0.3 0.45 0.6)")
    p.add_argument("--probe-samples", type=int, default=d.probe_samples, help=f"knob-search images (default {d.probe_samples})")
    p.add_argument("--probe-iterations", type=int, default=d.probe_iterations, help=f"bisection steps (default {d.probe_iterations})")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help=f"calibration images (default {d.calib_samples})")
    p.add_argument("--out", default=d.out_dir, help=f"folder of FIDELITY.md, the plot and the JSON (default {d.out_dir})")
    p.add_argument("--forecast-order", type=int, default=None,
                   help="every method reuses at this forecast order; its own FIDELITY.md section (default: the policy's labels')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_command(args) -> int:
    """`dqar policy evaluate`: run the study and write the section."""
    import time

    import torch

    from dqar.engine.policy_net import load_policy
    from dqar.models import SAMPLE_DEFAULTS

    policy = args.policy or str(shipped_policy(args.model))
    trained = trained_setting(load_policy(policy).meta)
    steps = args.steps if args.steps is not None else SAMPLE_DEFAULTS.get(str(args.model), {}).get("steps", EvaluateSettings.steps)
    s = EvaluateSettings(policy=policy, model=args.model, samples=args.samples, seed=args.seed, steps=steps, cfg=args.cfg,
                         targets=tuple(args.targets), probe_samples=args.probe_samples, probe_iterations=args.probe_iterations,
                         calib_samples=args.calib_samples, out_dir=args.out,
                         forecast_order=trained["forecast_order"] if args.forecast_order is None else args.forecast_order,
                         granularity=trained["granularity"], forecast_kind=trained["forecast_kind"])
    SampleConfig(steps=s.steps, cfg=s.cfg, seed=s.seed)  # validate early
    torch.set_grad_enabled(False)
    start, cpu = time.perf_counter(), time.process_time()
    result = run_policy_study(s, progress=not args.quiet)
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    doc = write_policy_section(result, s.out_dir)
    print(f"wrote section '{section_for(s.forecast_order, s.model)}' of {doc} in {result['seconds']:.0f}s")
    for t in result["verdict"]["per_target"]:
        print(f"  reuse {100 * t['target']:.0f}%: policy {_fmt(t['psnr_at']['policy'])} dB, best other "
              f"{FAMILIES.get(t['best_other'], '—')} {_fmt(t['psnr_at'].get(t['best_other']) if t['best_other'] else None)} dB "
              f"({'met' if t['met'] else 'missed'})")
    return 0
