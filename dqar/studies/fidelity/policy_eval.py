"""Evidence for the learned policy → docs/FIDELITY.md ("Learned policy").

`dqar policy evaluate` compares, at matched reuse, the learned policy with the online gate,
calibrated plans and static schedules on seeds no method was tuned or trained on. Each
method's knob is set to hit each target reuse fraction: the policy's threshold and the gate's
SNR bound / entropy τ by bisection on a small probe batch (other seeds), calibrated plans by
their target fraction, static schedules by picking the grid configurations whose plans come
closest. Every run is scored against the no-reuse run of the same seeds (paired PSNR/SSIM),
the embedded classifier (class accuracy) and the test split (FD on classifier features); each
family's PSNR is then read off its Pareto frontier at the exact targets.

Every method reuses what the policy was labelled on (`trained_setting`): attention outputs for the DiT's policies,
whole blocks with the policy's forecaster for a block-feature policy (any family). On a model without DiT blocks
(embedded-flux) the entropy and SNR gates cannot run; the gate there reads the probe block's forecast error
(`gate_signal = "probe_error"`, knob: its τ scale). The report and the command are `policy_report`.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.labels import cycle_labels
from dqar.studies.core import Study, baseline_row, embedded_classifier, frontier, make_reference, study_row, y_at

SECTION = "Learned policy"
DYNAMIC = dict(schedule="constant", warmup_frac=0.0, refresh_interval=4, max_staleness=3)  # shared by policy, gate, plans
FAMILIES = {"policy": "learned policy", "policy_plan": "policy → plan", "gate_snr": "gate (SNR bound)",
            "gate_entropy": "gate (entropy τ)", "gate_probe": "gate (probe error)", "calibrated": "calibrated plan",
            "static": "static schedule"}
OTHERS = ("gate_snr", "gate_entropy", "gate_probe", "calibrated", "static")  # what the policy is compared with
SHIPPED = {"embedded": "policy.safetensors", "embedded-flux": "policy_flux.safetensors"}  # the shipped policy per model
SHIPPED_BLOCK = {"embedded": ("policy_block.safetensors",), "embedded-flux": ("policy_flux.safetensors",)}  # block-feature ones


def shipped_policy(model: str | None = None) -> Path:
    """The shipped checkpoint of `model` (None: the embedded DiT; a model without one: the DiT's, which refuses it);
    relative to the working directory when inside it (so reports name no machine paths)."""
    from dqar.embedded import EMBEDDED_DIR

    path = Path(EMBEDDED_DIR) / SHIPPED.get(str(model or "embedded"), SHIPPED["embedded"])
    rel = Path(os.path.relpath(path))
    return path if rel.parts[:1] == ("..",) else rel


def shipped_block_policies(model: str | None) -> dict[str, str]:
    """name (file stem) → path of the block-feature policies shipped for `model` (those present)."""
    folder = shipped_policy().parent
    files = [folder / f for f in SHIPPED_BLOCK.get(str(model or "embedded"), ())]
    return {f.stem: str(f) for f in files if f.is_file()}


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
    granularity: str = "attention"  # what every method reuses: the policy's (`trained_setting`); "block" on flow models
    forecast_kind: str = "taylor"  # the forecaster every method reuses with: the policy's

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
        return {**DYNAMIC, "forecast_order": self.forecast_order, "granularity": self.granularity,
                "forecast_kind": self.forecast_kind}

    def run(self, seed: int, reuse: ReuseConfig = ReuseConfig(enabled=False)) -> RunConfig:
        return RunConfig(reuse=reuse, sample=SampleConfig(steps=self.steps, cfg=self.cfg, sampler=self.sampler, seed=seed))


def section_for(order: int, model: str | None = None) -> str:
    """The FIDELITY.md section of a study at `order` on `model` (order 0 on the DiT keeps the shipped policy's section)."""
    name = SECTION if not order else f"{SECTION} at forecast order {order}"
    return name if str(model or "embedded") == "embedded" else f"{name} ({model})"


def stem_for(order: int, model: str | None = None) -> str:
    """File name stem of the study's plot and JSON at `order` on `model`."""
    stem = "fidelity_policy" + (f"_order{order}" if order else "")
    return stem if str(model or "embedded") == "embedded" else f"{stem}_{model}"


def trained_setting(meta: dict) -> dict:
    """What the policy was labelled on, which every method of its study shares: granularity, forecast kind and order."""
    from dqar.engine.policy import TRAINED_DEFAULTS

    return {"granularity": meta.get("granularity", TRAINED_DEFAULTS["granularity"]),
            "forecast_kind": meta.get("forecast_kind", TRAINED_DEFAULTS["forecast_kind"]),
            "forecast_order": int(meta.get("forecast_order") or 0)}


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


def knobs(policy: str, dyn: dict = DYNAMIC, dit: bool = True) -> list[Knob]:
    """Each dynamic method's knob over the shared settings `dyn` (`EvaluateSettings.dynamic`). `dit`: DiT blocks, where
    the entropy and SNR gates run; elsewhere the gate reads the probe block's forecast error (`gate_signal`)."""
    policy_knob = Knob("policy", 1e-5, 1.0, "log", lambda v: ReuseConfig(**dyn, policy=policy, policy_threshold=v),
                       lambda v: f"threshold {v:.4f}")
    if not dit:
        return [policy_knob, Knob("gate_probe", 1e-3, 1e3, "log",
                                  lambda v: ReuseConfig(**dyn, gate=True, gate_signal="probe_error", verify_scale=v),
                                  lambda v: f"probe error, τ × {v:.3g}")]
    return [
        policy_knob,
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


def static_grid(order: int = 0, **shared) -> list[tuple[str, ReuseConfig]]:
    """The static schedules (`shared`: the study's granularity and forecast kind)."""
    out = []
    for sched in ("constant", "linear"):
        for refresh in (2, 3, 4):
            for warm in (0.0, 0.1, 0.2, 0.3):
                for cool in (0.0, 0.1, 0.2):
                    cfg = ReuseConfig(schedule=sched, refresh_interval=refresh, max_staleness=3, warmup_frac=warm, cooldown_frac=cool,
                                      forecast_order=order, **shared)
                    out.append((f"{sched}, refresh {refresh}, warmup {warm:.0%}, cooldown {cool:.0%}", cfg))
    return out


def static_choices(steps: int, layers: int, target: float, order: int = 0, **shared) -> list[tuple[str, ReuseConfig, float]]:
    """The grid configurations whose plans come closest to `target`: one without and one with a cooldown."""
    from dqar.engine.plan import build_plan

    scored = [(name, cfg, build_plan(cfg, steps, layers).reuse_fraction) for name, cfg in static_grid(order, **shared)]
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

    from dqar.tuning.calibrate import derive_plan, model_plan_key, record_trace
    from dqar.models import load_model
    from dqar.tuning.distill import distill_plan
    from dqar.engine.policy_net import load_policy
    from dqar.engine.adapter import describe
    from dqar.tuning.collect import check_policy_family
    from dqar.tuning.train import check_trained_for

    policy = settings.policy or str(shipped_policy(settings.model))
    ckpt = load_policy(policy)  # fail early
    check_trained_for(ckpt.meta, settings.model)
    loaded = load_model(settings.model)
    check_policy_family(loaded, ckpt.meta.get("features", ()))  # DiT features exist on DiT blocks only
    layout = describe(loaded.transformer)
    layers, dit = len(layout.blocks), layout.dit_blocks
    labels = cycle_labels(loaded.num_classes, settings.samples)
    n_static = 2
    order = settings.forecast_order
    shared = {"granularity": settings.granularity, "forecast_kind": settings.forecast_kind}
    methods = knobs(policy, settings.dynamic, dit)
    total = 2 + len(settings.targets) * (len(methods) * (1 + settings.probe_iterations) + 2 + n_static)
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
            for knob in methods:
                bar.set_postfix_str(f"{knob.family} @ {target:.0%}")
                value, probe = search(knob, target, lambda cfg: (bar.update(1), reuse_of(cfg))[1], settings.probe_iterations)
                rows.append(measure(study, settings, knob.family, knob.label(value), knob.make(value), target,
                                    {"knob": value, "probe_reuse": probe}))
                bar.update(1)
                if knob.family == "policy":
                    plan = distill_plan(loaded, calib_labels, settings.run(settings.calib_seed, knob.make(value)))
                    path = study.save_plan(plan, f"distilled_{round(100 * target)}")
                    rows.append(measure(study, settings, "policy_plan", f"{knob.label(value)}, decisions on the calibration samples",
                                        ReuseConfig(plan_file=path, forecast_order=order, **shared), target, {"knob": value}))
                    bar.update(1)
            key = model_plan_key(loaded, settings.run(settings.seed, ReuseConfig(**settings.dynamic)))
            plan = derive_plan(trace.change, target_fraction=target, max_staleness=DYNAMIC["max_staleness"], key=key)
            path = study.save_plan(plan, f"plan_{round(100 * target)}")
            rows.append(measure(study, settings, "calibrated", f"target {target:.0%}",
                                ReuseConfig(plan_file=path, forecast_order=order, **shared), target))
            bar.update(1)
            for name, cfg, _ in static_choices(settings.steps, layers, target, order, **shared):
                rows.append(measure(study, settings, "static", name, cfg, target))
                bar.update(1)
    from dqar.studies.fidelity.sections import sampling_words

    return {"settings": asdict(settings), "policy": policy, "policy_meta": ckpt.meta, "model": loaded.name,
            "sampling": sampling_words(loaded, settings.steps, settings.cfg), "baseline": baseline, "rows": rows,
            "verdict": verdict(rows, settings.targets)}


# ----- analysis --------------------------------------------------------------------------------------
def psnr_at(rows: list[dict], target: float) -> float:
    """A family's PSNR at `target` reuse, interpolated on its Pareto frontier (NaN beyond its most reuse)."""
    return y_at(frontier(rows, "reuse"), target)


def present(rows: list[dict]) -> list[str]:
    """The families measured (`FAMILIES` order): the gates that run on the model."""
    return [f for f in FAMILIES if any(r["family"] == f for r in rows)]


def verdict(rows: list[dict], targets) -> dict:
    """Per target: each family's interpolated PSNR, the best other method, and whether the policy matches it."""
    out = []
    for t in targets:
        at = {f: psnr_at([r for r in rows if r["family"] == f], t) for f in present(rows)}
        others = {f: v for f, v in at.items() if f in OTHERS and np.isfinite(v)}
        best = max(others, key=others.get) if others else None
        gap = at["policy"] - others[best] if best and np.isfinite(at["policy"]) else float("nan")
        out.append({"target": t, "psnr_at": at, "best_other": best, "policy_minus_best_db": gap, "met": bool(gap >= 0)})
    return {"per_target": out, "met": all(v["met"] for v in out)}
