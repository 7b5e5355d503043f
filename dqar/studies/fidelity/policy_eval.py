"""Evidence for the learned policy → docs/FIDELITY.md ("Learned policy").

`dqar policy evaluate` compares, at matched reuse, the learned policy with the online gate,
calibrated plans and static schedules on seeds no method was tuned or trained on. Each
method's knob is set to hit each target reuse fraction: the policy's threshold and the gate's
SNR bound / entropy τ by bisection on a small probe batch (other seeds), calibrated plans by
their target fraction, static schedules by picking the grid configurations whose plans come
closest. Every run is scored against the no-reuse run of the same seeds (paired PSNR/SSIM),
the embedded classifier (class accuracy) and the test split (FD on classifier features); each
family's PSNR is then read off its Pareto frontier at the exact targets.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.errors import DqarError
from dqar.generate import generate, plan_key
from dqar.labels import cycle_labels
from dqar.studies.core import Study, baseline_row, embedded_classifier, frontier, make_reference, study_row, y_at

SECTION = "Learned policy"
DYNAMIC = dict(schedule="constant", warmup_frac=0.0, refresh_interval=4, max_staleness=3)  # shared by policy, gate, plans
FAMILIES = {"policy": "learned policy", "policy_plan": "policy → plan", "gate_snr": "gate (SNR bound)",
            "gate_entropy": "gate (entropy τ)", "calibrated": "calibrated plan", "static": "static schedule"}
OTHERS = ("gate_snr", "gate_entropy", "calibrated", "static")  # what the policy is compared with


def shipped_policy() -> Path:
    """The shipped checkpoint; relative to the working directory when inside it (so reports name no machine paths)."""
    from dqar.embedded import EMBEDDED_DIR

    path = Path(EMBEDDED_DIR) / "policy.safetensors"
    rel = Path(os.path.relpath(path))
    return path if rel.parts[:1] == ("..",) else rel


@dataclass(frozen=True)
class EvaluateSettings:
    """What the policy study measures."""

    policy: str = ""  # checkpoint; "" = the shipped policy of the embedded model
    samples: int = 20  # evaluated images (seeds seed..seed+samples-1, labels cycling over the classes)
    seed: int = 0
    steps: int = 50
    cfg: float = 4.0
    sampler: str = "ddim"
    targets: tuple[float, ...] = (0.30, 0.45, 0.60)  # reuse fractions to match
    probe_samples: int = 4  # images of the knob-search batch
    probe_seed: int = 30_000
    probe_iterations: int = 8  # bisection steps per (method, target): the log-threshold range is 11.5 wide, 8 steps resolve ~5%
    calib_samples: int = 10  # calibration trace for the plans (same seed range as the policy's training traces)
    calib_seed: int = 10_000
    out_dir: str = "docs"
    model: str | None = None  # None: the embedded model
    forecast_order: int = 0  # every method reuses at this forecast order (the policy should be trained on its labels)

    def __post_init__(self) -> None:
        if self.forecast_order not in (0, 1, 2):
            raise DqarError(f"forecast_order = {self.forecast_order!r} is invalid", "use --forecast-order 0, 1 or 2")
        if self.samples < 2 or self.probe_samples < 1 or self.calib_samples < 1 or self.probe_iterations < 1:
            raise DqarError("the study needs >= 2 samples, >= 1 probe and calibration sample, >= 1 probe iteration",
                            "raise --samples / --probe-samples / --calib-samples")
        if not self.targets or any(not 0 < t < 1 for t in self.targets):
            raise DqarError(f"targets {self.targets} are invalid", "use reuse fractions in (0, 1), e.g. --targets 0.3 0.45 0.6")

    @property
    def dynamic(self) -> dict:
        """What policy, gate, calibrated plans and static schedules share."""
        return {**DYNAMIC, "forecast_order": self.forecast_order}

    def run(self, seed: int, reuse: ReuseConfig = ReuseConfig(enabled=False)) -> RunConfig:
        return RunConfig(reuse=reuse, sample=SampleConfig(steps=self.steps, cfg=self.cfg, sampler=self.sampler, seed=seed))


def section_for(order: int) -> str:
    """The FIDELITY.md section of a study at `order` (order 0 keeps the shipped policy's section)."""
    return SECTION if not order else f"{SECTION} at forecast order {order}"


def stem_for(order: int) -> str:
    """File name stem of the study's plot and JSON at `order`."""
    return "fidelity_policy" + (f"_order{order}" if order else "")


# ----- knobs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Knob:
    """A method's operating-point knob: reuse grows with the value; searched in `space` between lo and hi."""

    family: str
    lo: float
    hi: float
    space: str  # "log" | "linear"
    make: Callable[[float], ReuseConfig]
    label: Callable[[float], str]

    def value(self, u: float) -> float:
        return math.exp(u) if self.space == "log" else u

    def bounds(self) -> tuple[float, float]:
        return (math.log(self.lo), math.log(self.hi)) if self.space == "log" else (self.lo, self.hi)


def knobs(policy: str, dyn: dict = DYNAMIC) -> list[Knob]:
    """Each dynamic method's knob over the shared settings `dyn` (`EvaluateSettings.dynamic`)."""
    return [
        Knob("policy", 1e-5, 1.0, "log", lambda v: ReuseConfig(**dyn, policy=policy, policy_threshold=v),
             lambda v: f"threshold {v:.4f}"),
        Knob("gate_snr", 1e-5, 1e5, "log", lambda v: ReuseConfig(**dyn, gate=True, entropy_tau=1.0, snr_max=v),
             lambda v: f"τ 1, SNR ≤ {v:.3g}"),
        Knob("gate_entropy", 0.0, 1.0, "linear", lambda v: ReuseConfig(**dyn, gate=True, entropy_tau=v, snr_max=1e9),
             lambda v: f"τ {v:.4f}, SNR open"),
    ]


def search(knob: Knob, target: float, reuse_of: Callable[[ReuseConfig], float], iterations: int) -> tuple[float, float]:
    """Bisection on the knob for `target` reuse; returns (value, probe reuse) of the closest probe."""
    lo, hi = knob.bounds()
    best = None
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        r = reuse_of(knob.make(knob.value(mid)))
        if best is None or abs(r - target) < abs(best[1] - target):
            best = (knob.value(mid), r)
        lo, hi = (mid, hi) if r < target else (lo, mid)
    return best


def static_grid(order: int = 0) -> list[tuple[str, ReuseConfig]]:
    out = []
    for sched in ("constant", "linear"):
        for refresh in (2, 3, 4):
            for warm in (0.0, 0.1, 0.2, 0.3):
                for cool in (0.0, 0.1, 0.2):
                    cfg = ReuseConfig(schedule=sched, refresh_interval=refresh, max_staleness=3, warmup_frac=warm, cooldown_frac=cool,
                                      forecast_order=order)
                    out.append((f"{sched}, refresh {refresh}, warmup {warm:.0%}, cooldown {cool:.0%}", cfg))
    return out


def static_choices(steps: int, layers: int, target: float, order: int = 0) -> list[tuple[str, ReuseConfig, float]]:
    """The grid configurations whose plans come closest to `target`: one without and one with a cooldown."""
    from dqar.engine.plan import build_plan

    scored = [(name, cfg, build_plan(cfg, steps, layers).reuse_fraction) for name, cfg in static_grid(order)]
    out = []
    for cooled in (False, True):
        pool = [s for s in scored if (s[1].cooldown_frac > 0) == cooled]
        out.append(min(pool, key=lambda s: abs(s[2] - target)))
    return out


# ----- measurement ---------------------------------------------------------------------------------
COLUMNS = ("reuse", "attention_skipped", "host_syncs_per_evaluation", "psnr_db", "ssim", "class_accuracy", "fd")


def measure(study: Study, settings: EvaluateSettings, family: str, name: str, reuse: ReuseConfig, target: float,
            extra: dict | None = None) -> dict:
    gen, scores = study.measure(settings.run(settings.seed, reuse))
    return study_row({"family": family, "name": name, "target": target}, COLUMNS, gen.stats, scores,
                     config=asdict(reuse), **(extra or {}))


def probe_reuse(loaded, settings: EvaluateSettings) -> Callable[[ReuseConfig], float]:
    labels = cycle_labels(loaded.num_classes, settings.probe_samples)
    return lambda reuse: generate(loaded, labels, settings.run(settings.probe_seed, reuse)).stats.reuse_fraction


def run_policy_study(settings: EvaluateSettings = EvaluateSettings(), progress: bool = True) -> dict:
    """Measure every method at every target against the baseline; returns a JSON-ready dict (nothing written)."""
    from tqdm.auto import tqdm

    from dqar.tuning.calibrate import derive_plan, record_trace
    from dqar.models import load_model
    from dqar.tuning.distill import distill_plan
    from dqar.engine.policy_net import load_policy
    from dqar.tuning.collect import check_policy_family
    from dqar.tuning.train import check_trained_for

    policy = settings.policy or str(shipped_policy())
    ckpt = load_policy(policy)  # fail early
    check_trained_for(ckpt.meta, settings.model)
    loaded = load_model(settings.model)
    check_policy_family(loaded)  # the policy's signals exist on DiT blocks only
    layers = len(loaded.transformer.transformer_blocks)
    labels = cycle_labels(loaded.num_classes, settings.samples)
    n_static = 2
    order = settings.forecast_order
    total = 2 + len(settings.targets) * (len(knobs(policy, settings.dynamic)) * (1 + settings.probe_iterations) + 2 + n_static)
    rows: list[dict] = []
    with tqdm(total=total, desc="policy study", disable=not progress) as bar, tempfile.TemporaryDirectory() as tmp:
        study = Study(loaded, make_reference(loaded, labels, settings.run(settings.seed), embedded_classifier()), Path(tmp))
        bar.update(1)
        calib_labels = cycle_labels(loaded.num_classes, settings.calib_samples)
        trace = record_trace(loaded, calib_labels, settings.run(settings.calib_seed, ReuseConfig(**settings.dynamic)))
        bar.update(1)
        baseline = baseline_row({"family": "baseline", "name": "no reuse"}, COLUMNS, study.reference)
        reuse_of = probe_reuse(loaded, settings)
        for target in settings.targets:
            for knob in knobs(policy, settings.dynamic):
                bar.set_postfix_str(f"{knob.family} @ {target:.0%}")
                value, probe = search(knob, target, lambda cfg: (bar.update(1), reuse_of(cfg))[1], settings.probe_iterations)
                rows.append(measure(study, settings, knob.family, knob.label(value), knob.make(value), target,
                                    {"knob": value, "probe_reuse": probe}))
                bar.update(1)
                if knob.family == "policy":
                    plan = distill_plan(loaded, calib_labels, settings.run(settings.calib_seed, knob.make(value)))
                    path = study.save_plan(plan, f"distilled_{round(100 * target)}")
                    rows.append(measure(study, settings, "policy_plan", f"{knob.label(value)}, decisions on the calibration samples",
                                        ReuseConfig(plan_file=path, forecast_order=order), target, {"knob": value}))
                    bar.update(1)
            key = plan_key(loaded.name, settings.run(settings.seed, ReuseConfig(**settings.dynamic)))
            plan = derive_plan(trace.change, target_fraction=target, max_staleness=DYNAMIC["max_staleness"], key=key)
            path = study.save_plan(plan, f"plan_{round(100 * target)}")
            rows.append(measure(study, settings, "calibrated", f"target {target:.0%}", ReuseConfig(plan_file=path, forecast_order=order),
                                target))
            bar.update(1)
            for name, cfg, _ in static_choices(settings.steps, layers, target, order):
                rows.append(measure(study, settings, "static", name, cfg, target))
                bar.update(1)
    return {"settings": asdict(settings), "policy": policy, "policy_meta": ckpt.meta, "model": loaded.name,
            "baseline": baseline, "rows": rows, "verdict": verdict(rows, settings.targets)}


# ----- analysis --------------------------------------------------------------------------------------
def psnr_at(rows: list[dict], target: float) -> float:
    """A family's PSNR at `target` reuse, interpolated on its Pareto frontier (NaN beyond its most reuse)."""
    return y_at(frontier(rows, "reuse"), target)


def verdict(rows: list[dict], targets) -> dict:
    """Per target: each family's interpolated PSNR, the best other method, and whether the policy matches it."""
    out = []
    for t in targets:
        at = {f: psnr_at([r for r in rows if r["family"] == f], t) for f in FAMILIES}
        others = {f: v for f, v in at.items() if f in OTHERS and np.isfinite(v)}
        best = max(others, key=others.get) if others else None
        gap = at["policy"] - others[best] if best and np.isfinite(at["policy"]) else float("nan")
        out.append({"target": t, "psnr_at": at, "best_other": best, "policy_minus_best_db": gap, "met": bool(gap >= 0)})
    return {"per_target": out, "met": all(v["met"] for v in out)}


# ----- writing -----------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    from dqar.reporting.plots import fidelity_panels

    series = []
    markers = {"policy": "*", "policy_plan": "P", "gate_snr": "s", "gate_entropy": "D", "calibrated": "^", "static": "o"}
    for fam, marker in markers.items():
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
                     f"the attention output's plain relative change (what calibrated plans use) reaches "
                     f"{_fmt(v.get('spearman_attention_change'), '.3f')} (single cells {_fmt(v.get('spearman_attention_change_single_cells'), '.3f')}).")
    if col:
        lines.append(f"- Traces: {col.get('generations')} generations × {col.get('batch')} samples (seeds {col.get('seed')}+), "
                     f"{trained.get('sampler', '').upper()} {trained.get('steps')} steps, CFG {trained.get('cfg')}.")
    return lines


def markdown(result: dict, report: dict | None, plot_name: str) -> str:
    s, b, v = result["settings"], result["baseline"], result["verdict"]
    lines = [
        f"## {section_for(s.get('forecast_order', 0))}",
        "",
        f"Produced by `dqar policy evaluate` on the {result['model']} model with the policy `{Path(result['policy']).name}`: "
        f"{s['samples']} samples (labels cycling over the classes, seeds {s['seed']}…{s['seed'] + s['samples'] - 1} — none used "
        f"to train, validate or tune anything), {s['sampler'].upper()} {s['steps']} steps, CFG {s['cfg']}. Policy, gate and "
        "calibrated plans share: every layer eligible, no warmup (evaluation 0 computes), refresh 4, max staleness 3"
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
        f"stream, `‖gate_msa_e ⊙ ({_reused(s.get('forecast_order', 0))} − o_e)‖ / ‖h_e‖`, from full-compute generations; see docs/POLICY.md):",
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
        "| target reuse % | " + " | ".join(FAMILIES.values()) + " | policy − best other |",
        "|---:|" + "---:|" * len(FAMILIES) + "---|",
    ]
    for t in v["per_target"]:
        cells = " | ".join(_fmt(t["psnr_at"][f]) for f in FAMILIES)
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
    order = result["settings"].get("forecast_order", 0)
    stem = stem_for(order)
    plot(result, out / f"{stem}.png")
    atomic_write_json(out / f"{stem}.json", result)
    side = Path(result["policy"]).with_suffix(".json")
    report = json.loads(side.read_text()) if side.is_file() else None
    return write_section(out / "FIDELITY.md", section_for(order), markdown(result, report, f"{stem}.png"))


# ----- command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EvaluateSettings()
    p.add_argument("--policy", default="", help="policy checkpoint (default: the shipped policy of the embedded model)")
    p.add_argument("--model", default=None, help="model the policy was trained for (default: embedded)")
    p.add_argument("--samples", type=int, default=d.samples, help=f"evaluated images (default {d.samples})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"base seed of the evaluated images (default {d.seed})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"sampler steps (default {d.steps})")
    p.add_argument("--cfg", type=float, default=d.cfg, help=f"guidance scale (default {d.cfg})")
    p.add_argument("--targets", type=float, nargs="+", default=list(d.targets), help="reuse fractions to match (default 0.3 0.45 0.6)")
    p.add_argument("--probe-samples", type=int, default=d.probe_samples, help=f"knob-search images (default {d.probe_samples})")
    p.add_argument("--probe-iterations", type=int, default=d.probe_iterations, help=f"bisection steps (default {d.probe_iterations})")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help=f"calibration images (default {d.calib_samples})")
    p.add_argument("--out", default=d.out_dir, help=f"folder of FIDELITY.md, the plot and the JSON (default {d.out_dir})")
    p.add_argument("--forecast-order", type=int, default=d.forecast_order,
                   help="every method reuses at this forecast order; its own FIDELITY.md section (default 0: the shipped policy's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_command(args) -> int:
    """`dqar policy evaluate`: run the study and write the section."""
    import time

    import torch

    s = EvaluateSettings(policy=args.policy, model=args.model, samples=args.samples, seed=args.seed, steps=args.steps, cfg=args.cfg,
                         targets=tuple(args.targets), probe_samples=args.probe_samples, probe_iterations=args.probe_iterations,
                         calib_samples=args.calib_samples, out_dir=args.out, forecast_order=args.forecast_order)
    SampleConfig(steps=s.steps, cfg=s.cfg, seed=s.seed)  # validate early
    torch.set_grad_enabled(False)
    start, cpu = time.perf_counter(), time.process_time()
    result = run_policy_study(s, progress=not args.quiet)
    result["seconds"], result["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
    doc = write_policy_section(result, s.out_dir)
    print(f"wrote section '{section_for(s.forecast_order)}' of {doc} in {result['seconds']:.0f}s")
    for t in result["verdict"]["per_target"]:
        print(f"  reuse {100 * t['target']:.0f}%: policy {_fmt(t['psnr_at']['policy'])} dB, best other "
              f"{FAMILIES.get(t['best_other'], '—')} {_fmt(t['psnr_at'].get(t['best_other']) if t['best_other'] else None)} dB "
              f"({'met' if t['met'] else 'missed'})")
    return 0
