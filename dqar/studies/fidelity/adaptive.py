"""The verifying decider against the best static plan, at matched mean work → docs/FIDELITY.md ("Adaptive").

`dqar fidelity --section adaptive` asks whether a decider that measures the true error of one probe block beats
the best static plan that skips the same FLOPs. At each target share of FLOPs skipped (50–80%, and full_dqar's own):

- static: full_dqar's history (INT8, whole blocks, forecast) with each forecaster (`forecast_kind`), refresh
  interval r and warm-up; the warm-up that brings each (kind, r) nearest the target is found on the host from the
  plan itself (FLOPs per layer measured once), candidates within the tolerance are scored on the probe seeds and
  the best is chosen there;
- verify: the `adaptive` preset with each forecaster, its τ scale bisected on the probe seeds to the target
  (`dqar.tuning.verify_tau.calibrate_tau`);

then every chosen configuration is scored on the evaluated seeds (other noise): paired PSNR against no reuse with
a 95% bootstrap interval of the per-sample difference to the best static plan, class accuracy and FD. The uncalibrated
`adaptive` preset and `full_dqar` are scored as shipped. The model is a setting (`--model`: the DiT or embedded-flux).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from dqar import metrics as M
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.engine.forecasters import FORECAST_KINDS
from dqar.engine.plan import build_plan
from dqar.errors import DqarError
from dqar.labels import cycle_labels
from dqar.studies.core import Study, embedded_evaluator, make_reference, other_seeds, study_row
from dqar.studies.measure.intervals import mean_ci

SECTION = "Adaptive"
COLUMNS = ("reuse", "flops_skipped", "host_syncs_per_evaluation", "psnr_db", "ssim", "class_accuracy", "fd")
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
    steps: int | None = None
    cfg: float = 4.0
    seed: int = 0
    out_dir: str = "docs"

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in FORECAST_KINDS]
        if bad or not self.kinds:
            raise DqarError(f"forecast kinds {list(self.kinds)} are invalid", f"use some of: {', '.join(FORECAST_KINDS)}")
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
    base = replace(preset("full_dqar"), forecast_order=0, warmup_frac=0.0, cooldown_frac=0.0)
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


def static_candidates(kind: str, target: float, steps: int, costs: np.ndarray, tolerance: float) -> list[tuple[str, ReuseConfig, float]]:
    """Per refresh interval, the warm-up whose share is nearest `target`, kept where it is within `tolerance`."""
    out = []
    for r in INTERVALS:
        options = [(abs(static_share(c, steps, costs) - target), w, c)
                   for w in range(0, steps // 2) for c in [static_config(kind, r, w, steps)]]
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
                      costs: np.ndarray) -> tuple[ReuseConfig, dict]:
    """The adaptive preset with `kind` and a reuse cap that can reach `target`, its τ scale bisected on the calibration
    seeds to `target`."""
    from dqar.studies.core import SEED_OFFSET
    from dqar.tuning.verify_tau import calibrate_tau

    labels = cycle_labels(loaded.num_classes, settings.calib_samples)
    m = max_interval_for(target, run.sample.steps, costs, settings.tolerance)
    cal_run = RunConfig(reuse=replace(preset("adaptive"), forecast_kind=kind, verify_max_interval=m), sample=run.sample)
    cal = calibrate_tau(loaded, [labels], cal_run, target, steps=settings.calib_steps, seed_offset=SEED_OFFSET)
    return cal.config, {"scale": cal.scale, "calibrated_share": cal.skipped, "reached": cal.reached, "trials": len(cal.trials),
                        "max_interval": m}


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
    return _verdicts(out, probe_choice=_probe_choice(out))


def _probe_choice(out: dict) -> str | None:
    """The static kind chosen on the probe seeds: the best probe PSNR over the kinds' chosen candidates."""
    best = {k: max(r["psnr_db"] for r in rows) for k, rows in out["probe"].items() if rows}
    return max(best, key=best.get) if best else None


def _verdicts(out: dict, probe_choice: str | None) -> dict:
    """The best static plan (kind chosen on probe seeds), and every verify row's paired difference to it."""
    base = out["static"].get(probe_choice) if probe_choice else None
    out["best_static_kind"] = probe_choice
    for row in [*out["verify"].values(), *out["static"].values()]:
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
    return {**out, "static": {k: _strip(v) for k, v in out["static"].items()},
            "verify": {k: _strip(v) for k, v in out["verify"].items()}}
