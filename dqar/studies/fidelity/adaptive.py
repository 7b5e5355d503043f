"""The verifying decider against the best static plan, at matched mean work → docs/FIDELITY.md ("Adaptive").

`dqar fidelity --section adaptive` asks whether a decider that measures the true error of one probe block beats
the best static plan that skips the same FLOPs. At each target share of FLOPs skipped (50–80%, and full_dqar's own):

- static: full_dqar's history (INT8, whole blocks, forecast) with each forecaster (`forecast_kind`), refresh
  interval r and warm-up; the warm-up that brings each (kind, r) nearest the target is found on the host from the
  plan itself (FLOPs per layer measured once), candidates within the tolerance are scored on the probe seeds and
  the best is chosen there;
- verify: the `adaptive` preset with each forecaster, its τ scale bisected on the probe seeds to the target
  (`dqar.tuning.verify_tau.calibrate_tau`);

- gate: the online gate on the verify signal (`gate_signal = "probe_error"`, `dqar.engine.gate`) with the adaptive
  preset's history and forecast, each layer schedule in `gate_schedules` and a staleness cap that can reach the
  target, its τ scale bisected on the calibration seeds to the target as the verifying decider's is;

then every chosen configuration is scored on the evaluated seeds (other noise): paired PSNR against no reuse with
a 95% bootstrap interval of the per-sample difference to the best static plan, class accuracy and FD. The uncalibrated
`adaptive` preset and `full_dqar` are scored as shipped. The model is a setting (`--model`: the DiT or embedded-flux).
`extend_with_gate` adds the gate rows to a saved result (re-measuring only each target's best static plan, for the
paired differences) instead of running every row again.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from dqar import metrics as M
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, build, preset
from dqar.engine.forecasters import FORECAST_KINDS
from dqar.engine.plan import build_plan
from dqar.engine.verify import probe_index
from dqar.errors import DqarError
from dqar.labels import cycle_labels
from dqar.studies.core import Study, embedded_evaluator, make_reference, other_seeds, study_row
from dqar.studies.measure.intervals import mean_ci

SECTION = "Adaptive"
COLUMNS = ("reuse", "flops_skipped", "host_syncs_per_evaluation", "psnr_db", "ssim", "class_accuracy", "fd")
GATE_SCHEDULES = ("constant", "linear", "linear_reverse", "exponential", "step")  # layer schedules the gate rows may use
INTERVALS = (2, 3, 4, 6, 8, 12)  # static refresh intervals tried at every target (only those reaching it within the tolerance are scored)


@dataclass(frozen=True)
class AdaptiveSettings:
    """What the adaptive comparison measures (None: the model's sampling default)."""

    model: str | None = None  # None: the embedded DiT
    samples: int = 100  # evaluated images, labels cycling over the classes
    probe_samples: int = 20  # images on other seeds that choose the static plan
    calib_samples: int = 10  # images on other seeds that calibrate τ
    calib_steps: int = 6  # bisection steps of the τ scale
    targets: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)  # FLOPs-skipped shares
    tolerance: float = 0.02  # matched work: within ± this share
    kinds: tuple[str, ...] = FORECAST_KINDS
    gate_kinds: tuple[str, ...] = ("taylor", "bdf2_heun")  # forecast kinds of the probe-error gate rows (empty: none)
    gate_schedules: tuple[str, ...] = ("constant", "linear")  # layer schedules of the probe-error gate rows
    steps: int | None = None
    cfg: float = 4.0
    seed: int = 0
    out_dir: str = "docs"

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in FORECAST_KINDS]
        if bad or not self.kinds:
            raise DqarError(f"forecast kinds {list(self.kinds)} are invalid", f"use some of: {', '.join(FORECAST_KINDS)}")
        if any(k not in FORECAST_KINDS for k in self.gate_kinds):
            raise DqarError(f"gate kinds {list(self.gate_kinds)} are invalid", f"use some of: {', '.join(FORECAST_KINDS)}")
        if any(g not in GATE_SCHEDULES for g in self.gate_schedules) or (self.gate_kinds and not self.gate_schedules):
            raise DqarError(f"gate schedules {list(self.gate_schedules)} are invalid", f"use some of: {', '.join(GATE_SCHEDULES)}")
        if not self.targets or any(not 0.0 < t < 1.0 for t in self.targets):
            raise DqarError(f"targets {list(self.targets)} are invalid", "use FLOPs-skipped shares in (0, 1)")
        if min(self.samples, self.probe_samples) < 2 or self.calib_samples < 1:
            raise DqarError("the comparison needs >= 2 evaluated and probe samples (FD) and >= 1 calibration sample",
                            "pass e.g. samples 100, probe samples 20, calibration samples 10")


# ----- static plans: their share from the plan, on the host ------------------------------------------------
def layer_costs(loaded, run: RunConfig) -> np.ndarray:
    """(L,) share of all FLOPs one reused evaluation of layer l skips: one 1-sample generation per layer."""
    from dqar.engine.adapter import describe
    from dqar.generate import generate

    layers, steps = len(describe(loaded.transformer).blocks), run.sample.steps
    base = replace(preset("full_dqar"), forecast_kind="taylor", forecast_order=0, warmup_frac=0.0, cooldown_frac=0.0)
    costs = np.zeros(layers)
    for layer in range(layers):
        reuse = replace(base, schedule="custom", custom_layers=(layer,))
        count = build_plan(reuse, steps, layers).mask[:, layer].sum()
        stats = generate(loaded, [0], RunConfig(reuse=reuse, sample=run.sample),
                         executor="patch").stats
        costs[layer] = stats.flops_skipped_fraction / max(int(count), 1)
    return costs


def static_config(kind: str, interval: int, warmup_steps: int, steps: int) -> ReuseConfig:
    """full_dqar's history and forecast with `kind`, refresh `interval` and `warmup_steps` computed evaluations."""
    return replace(preset("full_dqar"), forecast_kind=kind, refresh_interval=interval, max_staleness=interval - 1,
                   warmup_frac=warmup_steps / steps)


def static_share(cfg: ReuseConfig, steps: int, costs: np.ndarray) -> float:
    """FLOPs-skipped share of a static plan: its reused cells weighted by the layers' costs."""
    mask = build_plan(cfg, steps, len(costs)).mask  # (E, L)
    return float((mask.sum(axis=0) * costs).sum())


def static_candidates(kind: str, target: float, steps: int, costs: np.ndarray, tolerance: float,
                      max_warmup: int | None = None) -> list[tuple[str, ReuseConfig, float]]:
    """Per refresh interval, the warm-up (below `max_warmup`, default half the steps) whose share is nearest `target`,
    kept where it is within `tolerance`."""
    out = []
    for r in INTERVALS:
        options = [(abs(static_share(c, steps, costs) - target), w, c)
                   for w in range(0, max_warmup or steps // 2) for c in [static_config(kind, r, w, steps)]]
        gap, w, cfg = min(options, key=lambda o: (o[0], o[1]))
        if gap <= tolerance:
            out.append((f"static {kind}, refresh {r}, warm-up {w}", cfg, static_share(cfg, steps, costs)))
    return out


# ----- measuring -------------------------------------------------------------------------------------------
@dataclass
class _Setting:
    study: Study
    run: RunConfig


def _setting(loaded, labels, run: RunConfig) -> _Setting:
    return _Setting(Study(loaded, make_reference(loaded, labels, run, embedded_evaluator(loaded))), run)


def measure(s: _Setting, name: str, reuse: ReuseConfig, head: dict | None = None) -> dict:
    """One configuration on `s`'s seeds: the row, plus per-sample PSNR (for paired intervals)."""
    gen, scores = s.study.measure(replace(s.run, reuse=reuse), executor="patch")
    per = M.psnr_per_sample(gen.output.images, s.study.reference.images).clamp(max=M.PSNR_CAP_DB).tolist()
    return study_row({"name": name, **(head or {})}, COLUMNS, gen.stats, scores, config=asdict(reuse), psnr_per_sample=per)


def paired_delta(row: dict, base: dict) -> dict:
    """Mean per-sample PSNR difference `row` − `base` on the same seeds, with its 95% bootstrap interval."""
    d = np.asarray(row["psnr_per_sample"]) - np.asarray(base["psnr_per_sample"])
    return {"delta_db": float(d.mean()), "delta_ci": mean_ci(d)}


MAX_INTERVALS = (3, 5, 8, 12, 16, 24)  # the verifying decider's consecutive-reuse caps tried, least first


def max_interval_for(target: float, steps: int, costs: np.ndarray, tolerance: float) -> int:
    """The least `verify_max_interval` that lets the adaptive preset reach `target`: its share with τ → ∞ (every non-probe
    layer reusing `m` times in a row, the probe computing) is a static plan's, read from the plan on the host."""
    base, layers = preset("adaptive"), len(costs)
    for m in MAX_INTERVALS:
        cap = replace(base, decider="plan", schedule="custom", custom_layers=tuple(range(1, layers)), refresh_interval=m + 1,
                      max_staleness=m)
        if static_share(cap, steps, costs) >= target + tolerance / 2:
            return m
    return MAX_INTERVALS[-1]


def calibrated_verify(loaded, run: RunConfig, kind: str, target: float, settings: AdaptiveSettings,
                      costs: np.ndarray, per_sample: bool = False) -> tuple[ReuseConfig, dict]:
    """The adaptive preset with `kind` and a reuse cap that can reach `target` (`per_sample`: each sample refreshes on its
    own error), its τ scale bisected on the calibration seeds to `target`."""
    from dqar.studies.core import SEED_OFFSET
    from dqar.tuning.verify_tau import calibrate_tau

    labels = cycle_labels(loaded.num_classes, settings.calib_samples)
    m = max_interval_for(target, run.sample.steps, costs, settings.tolerance)
    cal_run = RunConfig(reuse=replace(preset("adaptive"), forecast_kind=kind, verify_max_interval=m, verify_per_sample=per_sample),
                        sample=run.sample)
    cal = calibrate_tau(loaded, [labels], cal_run, target, steps=settings.calib_steps, seed_offset=SEED_OFFSET)
    return cal.config, {"scale": cal.scale, "calibrated_share": cal.skipped, "reached": cal.reached, "trials": len(cal.trials),
                        "max_interval": m}


# ----- the gate on the verify signal ---------------------------------------------------------------------------
def gate_config(kind: str, schedule: str, cap: int) -> ReuseConfig:
    """The adaptive preset's history, forecast and τ knots under the probe-error gate: `schedule`'s eligible layers, at
    most `cap` reuses in a row."""
    return replace(preset("adaptive"), decider="plan", gate=True, gate_signal="probe_error", schedule=schedule,
                   forecast_kind=kind, refresh_interval=cap + 1, max_staleness=cap)


def gate_open_share(cfg: ReuseConfig, steps: int, costs: np.ndarray) -> float:
    """FLOPs-skipped share of the probe-error gate at τ = ∞: the schedule's plan with the probe computing, on the host."""
    mask = build_plan(replace(cfg, gate=False, gate_signal="entropy"), steps, len(costs)).mask.copy()  # (E, L)
    mask[:, probe_index(cfg.verify_probe, len(costs))] = False
    return float((mask.sum(axis=0) * costs).sum())


def gate_cap_for(kind: str, schedule: str, target: float, steps: int, costs: np.ndarray, tolerance: float) -> int | None:
    """The least staleness cap (of `MAX_INTERVALS`) whose τ = ∞ share passes `target` by half the tolerance, else the
    largest where it comes within the tolerance; None where none does."""
    for cap in MAX_INTERVALS:
        if gate_open_share(gate_config(kind, schedule, cap), steps, costs) >= target + tolerance / 2:
            return cap
    last = MAX_INTERVALS[-1]
    return last if gate_open_share(gate_config(kind, schedule, last), steps, costs) >= target - tolerance else None


def calibrated_gate(loaded, run: RunConfig, kind: str, schedule: str, target: float, settings: AdaptiveSettings,
                    costs: np.ndarray) -> tuple[ReuseConfig | None, dict]:
    """The probe-error gate with a cap that can reach `target`, `verify_scale` bisected on the calibration seeds as the
    verifying decider's is (`verify_tau.calibrate_tau`). (None, {"open_share"}) where no cap reaches the target."""
    from dqar.studies.core import SEED_OFFSET
    from dqar.tuning.verify_tau import calibrate_tau

    steps = run.sample.steps
    cap = gate_cap_for(kind, schedule, target, steps, costs, settings.tolerance)
    if cap is None:
        return None, {"open_share": gate_open_share(gate_config(kind, schedule, MAX_INTERVALS[-1]), steps, costs)}
    cal_run = RunConfig(reuse=gate_config(kind, schedule, cap), sample=run.sample)
    labels = cycle_labels(loaded.num_classes, settings.calib_samples)
    cal = calibrate_tau(loaded, [labels], cal_run, target, steps=settings.calib_steps, seed_offset=SEED_OFFSET)
    return cal.config, {"scale": cal.scale, "calibrated_share": cal.skipped, "reached": abs(cal.skipped - target) <= settings.tolerance,
                        "trials": len(cal.trials), "max_interval": cap}


def gate_rows(target: float, ev: _Setting, costs: np.ndarray, settings: AdaptiveSettings,
              tick: Callable[[str], None]) -> tuple[dict, dict]:
    """({kind/schedule: scored row, per-sample PSNR kept}, {kind/schedule: τ = ∞ share} where no cap reaches `target`)."""
    rows, unreachable = {}, {}
    for kind in settings.gate_kinds:
        for schedule in settings.gate_schedules:
            key = f"{kind}/{schedule}"
            tick(f"{target:.0%} gate {key}: calibrating τ")
            cfg, cal = calibrated_gate(ev.study.loaded, ev.run, kind, schedule, target, settings, costs)
            if cfg is None:
                unreachable[key] = cal["open_share"]
                continue
            name = f"gate ε {kind}, {schedule}, τ × {cal['scale']:.3g}, ≤ {cal['max_interval']} reuses"
            rows[key] = measure(ev, name, cfg, {"kind": kind, "decider": "gate", "schedule": schedule, "calibration": cal})
    return rows, unreachable


def _strip(row: dict | None) -> dict | None:
    return None if row is None else {k: v for k, v in row.items() if k != "psnr_per_sample"}


def compare_at(target: float, probe: _Setting, ev: _Setting, costs: np.ndarray, settings: AdaptiveSettings,
               tick: Callable[[str], None], fixed: tuple[str, ReuseConfig] | None = None) -> dict:
    """At one target: the static plans chosen on the probe seeds and the calibrated verifying decider, per kind, scored."""
    steps, loaded = ev.run.sample.steps, ev.study.loaded
    out = {"target": target, "static": {}, "verify": {}, "probe": {}}
    for kind in settings.kinds:
        if fixed is not None and kind == fixed[1].forecast_kind:
            cands = [(fixed[0], fixed[1], static_share(fixed[1], steps, costs))]
        else:
            cands = static_candidates(kind, target, steps, costs, settings.tolerance)
        tick(f"{target:.0%} {kind}: {len(cands)} static candidates on probe seeds")
        probed = [measure(probe, name, cfg, {"planned_share": share}) for name, cfg, share in cands]
        out["probe"][kind] = [_strip(r) for r in probed]
        if probed:
            pick = max(probed, key=lambda r: r["psnr_db"])
            cfg = next(c for n, c, _ in cands if n == pick["name"])
            out["static"][kind] = measure(ev, pick["name"], cfg, {"kind": kind, "decider": "static"})
        tick(f"{target:.0%} {kind}: calibrating τ")
        try:
            cfg, cal = calibrated_verify(loaded, ev.run, kind, target, settings, costs)
        except DqarError as exc:  # the engine refuses the verifying decider on this model: say so, once per kind
            out["verify"][kind], out.setdefault("refused", {})[kind] = None, str(exc)
            continue
        out["verify"][kind] = measure(ev, f"verify {kind}, τ × {cal['scale']:.3g}, ≤ {cal['max_interval']} reuses", cfg,
                                      {"kind": kind, "decider": "verify", "calibration": cal})
    out["gate"], out["gate_unreachable"] = gate_rows(target, ev, costs, settings, tick)
    return _verdicts(out, probe_choice=_probe_choice(out))


def _probe_choice(out: dict) -> str | None:
    """The static kind chosen on the probe seeds: the best probe PSNR over the kinds' chosen candidates."""
    best = {k: max(r["psnr_db"] for r in rows) for k, rows in out["probe"].items() if rows}
    return max(best, key=best.get) if best else None


def _verdicts(out: dict, probe_choice: str | None) -> dict:
    """The best static plan (kind chosen on probe seeds), and every verify row's paired difference to it."""
    base = out["static"].get(probe_choice) if probe_choice else None
    out["best_static_kind"] = probe_choice
    for row in [*out["verify"].values(), *out.get("gate", {}).values(), *out["static"].values()]:
        if base is not None and row is not None:
            row.update(paired_delta(row, base))
    return out


# ----- the study -------------------------------------------------------------------------------------------
def _run(loaded, settings: AdaptiveSettings) -> RunConfig:
    from dqar.models import SAMPLE_DEFAULTS

    steps = settings.steps or SAMPLE_DEFAULTS.get(loaded.name, {}).get("steps", 50)
    return RunConfig(sample=SampleConfig(steps=steps, cfg=settings.cfg, seed=settings.seed))


def run_adaptive(settings: AdaptiveSettings = AdaptiveSettings(), progress: bool = True,
                 checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Every target's comparison, the shipped presets, on one model; `checkpoint(result)` after each target."""
    from dqar.models import load_model
    from tqdm import tqdm

    loaded = load_model(settings.model)
    run = _run(loaded, settings)
    bar = tqdm(disable=not progress, desc="adaptive", total=len(settings.targets) + 2)
    tick = lambda what: bar.set_postfix_str(what[:60])  # noqa: E731
    labels = cycle_labels(loaded.num_classes, settings.samples)
    ev = _setting(loaded, labels, run)
    probe = _setting(loaded, cycle_labels(loaded.num_classes, settings.probe_samples), other_seeds(run))
    costs = layer_costs(loaded, run)
    result = {"settings": asdict(settings), "model": loaded.name, "steps": run.sample.steps, "cfg": run.sample.cfg,
              "evaluated": len(ev.study.labels), "probed": len(probe.study.labels),
              "layer_costs": costs.tolist(), "reference": {"class_accuracy": ev.study.reference.accuracy,
                                                           "fd": ev.study.reference.fd}, "targets": []}
    shipped = {"full_dqar": measure(ev, "full_dqar", preset("full_dqar"))}
    try:
        shipped["adaptive"] = measure(ev, "adaptive", preset("adaptive"))
        shipped["adaptive"].update(paired_delta(shipped["adaptive"], shipped["full_dqar"]))
    except DqarError as exc:
        result["adaptive_refused"] = str(exc)
    result["shipped"] = {k: _strip(v) for k, v in shipped.items()}
    bar.update(1)
    fd_share = shipped["full_dqar"]["flops_skipped"]
    at_fd = compare_at(fd_share, probe, ev, costs, settings, tick, fixed=("full_dqar", preset("full_dqar")))
    result["at_full_dqar"] = _clean(at_fd)
    bar.update(1)
    for target in settings.targets:
        result["targets"].append(_clean(compare_at(target, probe, ev, costs, settings, tick)))
        bar.update(1)
        if checkpoint:
            checkpoint(result)
    bar.close()
    return result


def _clean(out: dict) -> dict:
    """A comparison as JSON keeps per-sample PSNR out (the intervals hold what they say)."""
    return {**out, **{d: {k: _strip(v) for k, v in out[d].items()} for d in ("static", "verify", "gate") if d in out}}


REMEASURE_DB = 0.1  # the re-measured best static plan's PSNR may differ from the saved one by this much (engine changes since)


def saved_setting(saved: dict, settings: AdaptiveSettings) -> tuple[_Setting, np.ndarray]:
    """The evaluated seeds of `saved` (a `run_adaptive` result) re-made at `settings`, and its layer costs; refused where
    the settings are not the saved ones."""
    from dqar.models import load_model

    loaded = load_model(settings.model)
    run = _run(loaded, settings)
    s = saved["settings"]
    if (saved["model"], saved["steps"], saved["cfg"], s["samples"], s["seed"], s["calib_samples"], s["tolerance"]) != (
            loaded.name, run.sample.steps, run.sample.cfg, settings.samples, settings.seed, settings.calib_samples,
            settings.tolerance):
        raise DqarError("the saved adaptive result was measured at other settings (model, steps, CFG, seed, counts)",
                        "pass the settings it was run with, or run the whole comparison")
    return _setting(loaded, cycle_labels(loaded.num_classes, settings.samples), run), np.asarray(saved["layer_costs"])


def remeasure(ev: _Setting, kept: dict, target: float) -> dict:
    """A saved row re-measured on the evaluated seeds (per-sample PSNR kept); refused where its PSNR is not the saved one
    to `REMEASURE_DB` (the saved result does not describe this run)."""
    row = measure(ev, kept["name"], build(ReuseConfig, dict(kept["config"]), "a saved adaptive row"))
    if abs(row["psnr_db"] - kept["psnr_db"]) > REMEASURE_DB:
        raise DqarError(f"'{kept['name']}' at {target:.1%} re-measures {row['psnr_db']:.3f} dB, saved {kept['psnr_db']:.3f} dB",
                        "run the whole comparison on this machine")
    return row


def extend_with_gate(saved: dict, settings: AdaptiveSettings, progress: bool = True,
                     checkpoint: Callable[[dict], None] | None = None) -> dict:
    """`saved` (a `run_adaptive` result at `settings`' model, steps, CFG, seed and counts) with the gate rows added at each
    of its targets. Each target's best static plan is re-measured on the evaluated seeds for the paired differences
    (`remeasure`: the gate's differences are paired with the re-measured plan, on this run)."""
    import copy

    from tqdm import tqdm

    ev, costs = saved_setting(saved, settings)
    result = copy.deepcopy(saved)
    result["settings"] = {**saved["settings"], "gate_kinds": list(settings.gate_kinds), "gate_schedules": list(settings.gate_schedules)}
    comps = [result["at_full_dqar"], *result["targets"]]
    bar = tqdm(disable=not progress, desc="adaptive gate rows", total=len(comps))
    tick = lambda what: bar.set_postfix_str(what[:60])  # noqa: E731
    for comp in comps:
        base = remeasure(ev, comp["static"][comp["best_static_kind"]], comp["target"])
        rows, comp["gate_unreachable"] = gate_rows(comp["target"], ev, costs, settings, tick)
        for row in rows.values():
            row.update(paired_delta(row, base))
        comp["gate"], comp["gate_base_psnr_db"] = {k: _strip(v) for k, v in rows.items()}, base["psnr_db"]
        bar.update(1)
        if checkpoint:
            checkpoint(result)
    bar.close()
    return result
