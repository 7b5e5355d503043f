"""Forecast reuse on the embedded model → docs/FIDELITY.md ("Forecast").

`dqar fidelity --section forecast` samples a fixed set of labels without reuse and under every
configuration: forecast order 0 (copy), 1 and 2 × attention and block granularity × refresh
interval, the INT8 history against the model-dtype one, `full_dqar`, and the peers run through
their own packages. Each run counts the `attn1` and `ff` forwards that really ran (as the peers'
rows do), so "work skipped" means the same for dqar and for peers. At three matched shares of
skipped `attn1` + `ff` work, dqar's best block-forecast plan and diffusers' TaylorSeerCache at its
best setting are both chosen on probe seeds (other noise) and then scored on the evaluated seeds.
A DPM-Solver++ part compares the two forecast axes. Every verdict is computed from the rows.

The model is a setting (`--model`, e.g. embedded-flux): counts and work weights run over every layer the
block adapter describes (`dqar.studies.peers.work`). A flow model (Flux) has no DDIM/DPM choice: its
sampler is flow matching, and the forecast-axis part ("evaluation" vs "timestep", its shifted sigmas)
runs at the main sampling setting instead of a DPM-Solver++ one.
"""
from __future__ import annotations

import itertools
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.labels import cycle_labels
from dqar.studies.peers import methods as P
from dqar.studies.peers import work as W
from dqar.studies.peers.rows import attach_peer, model_copy
from dqar.studies.core import Study, baseline_row, embedded_evaluator, make_reference, other_seeds, study_row

SECTION = "Forecast"
SHARES = (0.45, 0.60, 0.70)  # matched shares of skipped attn1 + ff work
SHARE_TOLERANCE = 0.035
COLUMNS = ("reuse", "flops_skipped", "quant_error", "psnr_db", "ssim", "class_accuracy", "fd")


@dataclass(frozen=True)
class ForecastSettings:
    """What the forecast study measures."""

    samples: int = 100  # evaluated images, labels cycling over the classes
    probe_samples: int = 20  # images on other seeds that choose the matched-share settings
    steps: int = 50
    cfg: float = 4.0
    seed: int = 0  # sample i uses seed + i
    dpm_steps: int = 20  # the DPM-Solver++ part (0: skip it)
    peers: bool = True  # run the peers (TaylorSeer tuning, FirstBlockCache, MagCache, PAB, cache-dit)
    tuned: tuple[str, ...] = ("taylorseer",)  # peers tuned on probe seeds at each matched share (TUNED names them)
    grid: bool = True  # the order × granularity × refresh table (off: full_dqar, the axes and the matched shares only)
    untuned: bool = True  # the peers at their library defaults (default_peers), besides the tuned ones
    out_dir: str = "docs"
    model: str | None = None  # None: the embedded model


# ----- configurations ----------------------------------------------------------------------------
def forecast_config(order: int, granularity: str, refresh: int, warmup: int, steps: int, refresh_end: int = 0,
                    staleness: int | None = None, **extra) -> ReuseConfig:
    """Every layer eligible after `warmup` evaluations, the last evaluation computed, a refresh every `refresh`
    (or an interval ramped linearly from `refresh` to `refresh_end`); staleness capped at interval − 1 unless given."""
    cap = max(refresh, refresh_end) - 1 if staleness is None else staleness
    return ReuseConfig(schedule="constant", granularity=granularity, forecast_order=order, refresh_interval=refresh,
                       refresh_interval_end=refresh_end, max_staleness=max(cap, 1), warmup_frac=warmup / steps,
                       cooldown_frac=1 / steps, **extra)


def _interval_name(refresh: int, refresh_end: int) -> str:
    return f"refresh {refresh}→{refresh_end}" if refresh_end else f"refresh {refresh}"


def grid_cases(steps: int) -> list[tuple[str, dict, ReuseConfig]]:
    """Copy vs order 1 vs order 2 at attention and block granularity, refresh 2–4, model-dtype cache, two warm-up evaluations."""
    cells = [("block", 3, o) for o in (0, 1, 2)] + [("block", k, 2) for k in (2, 4)] + [("attention", 3, o) for o in (0, 2)]
    return [(f"{gran}, order {order}, refresh {refresh}", {"order": order, "granularity": gran, "refresh": refresh, "cache": "model"},
             forecast_config(order, gran, refresh, 2, steps)) for gran, refresh, order in cells]


def extra_cases(steps: int) -> list[tuple[str, dict, ReuseConfig]]:
    """The full_dqar preset (the grid's block / order 2 / refresh 3 plan, its own forecaster, its history in INT8 per channel)
    and its twin with the history in the model dtype: the same plan and forecaster, so their difference is the cache alone."""
    fd = preset("full_dqar")
    return [("full_dqar preset", {"preset": "full_dqar", "cache": "int8", "refresh": 3}, fd),
            ("full_dqar preset, model-dtype history", {"preset": "full_dqar", "cache": "model", "refresh": 3}, replace(fd, cache_dtype="model"))]


SHARE_KINDS = ("taylor", "bdf2_heun")  # the second-order forecasters dqar may pick at a matched share (hermite never won)


def dqar_share_candidates(steps: int) -> list[tuple[str, ReuseConfig]]:
    """Block plans with a second-order forecast (each of `SHARE_KINDS`) that dqar may pick at a matched share (warm-up,
    refresh, ramp end, staleness cap)."""
    cells = [(w, k, 0, None) for w, k in itertools.product((1, 2), (2, 3, 4, 5))] + [(5, 3, 0, None)]
    cells += [(1, 4, 2, None), (1, 5, 2, None), (1, 4, 3, None), (1, 5, 3, 3), (1, 6, 2, 4), (2, 2, 3, None)]  # ramped intervals
    cells += [(1, 2, 6, None), (1, 3, 5, None), (1, 3, 6, None)]  # ramped up: dense early, sparse late
    return [(("block, order 2" if kind == "taylor" else f"block, {kind}") + f", warm-up {w}, {_interval_name(k, end)}"
             + (f", staleness ≤ {cap}" if cap else ""),
             forecast_config(2, "block", k, w, steps, refresh_end=end, staleness=cap, forecast_kind=kind))
            for kind in SHARE_KINDS for w, k, end, cap in cells]


def taylorseer_candidates() -> list[P.TaylorSeer]:
    """diffusers TaylorSeerCache settings (orders 1 and 2, warm-up and interval) on attn1 and ff."""
    return [P.TaylorSeer(max_order=o, disable_cache_before_step=w, cache_interval=k)
            for o, w, k in itertools.product((1, 2), (2, 3), (2, 3, 4, 5))]


def first_block_cache_candidates() -> list[P.FirstBlockCache]:
    """diffusers FirstBlockCache thresholds, gentle to aggressive (0.12–0.16: between 0.1 and 0.2, which skip 30% and 50%
    of embedded-flux's work, so 45% has a setting near it)."""
    return [P.FirstBlockCache(threshold=t) for t in (0.05, 0.1, 0.12, 0.14, 0.16, 0.2, 0.3, 0.5, 0.8)]


def magcache_candidates() -> list[P.MagCache]:
    """diffusers MagCache thresholds × consecutive-skip caps (ratios calibrated on the probe seeds each time). The low
    thresholds and the caps 1–2 reach below the 60% that every threshold >= 0.1 at cap 3 skips on embedded-flux; the
    retention ratios 0.3–0.4 (steps never skipped at the start; diffusers' default 0.2) give it 12–13 skips of 28
    steps, near 45%, and 0.1 more skips at the same threshold."""
    base = [P.MagCache(threshold=t, max_skip_steps=k) for t, k in itertools.product((0.02, 0.05, 0.1, 0.25, 0.5), (1, 2, 3, 5))]
    return base + [P.MagCache(threshold=t, max_skip_steps=k, retention_ratio=r)
                   for r, t, k in itertools.product((0.1, 0.3, 0.4), (0.05, 0.1), (2, 3))]


TUNED = {"taylorseer": taylorseer_candidates, "first_block_cache": first_block_cache_candidates, "magcache": magcache_candidates}


def default_peers() -> list[Any]:
    return [P.FirstBlockCache(), P.FirstBlockCache(threshold=0.02), P.MagCache(), P.PAB(), P.CacheDit()]


AXIS_PRESET = ("full_dqar preset, timestep axis", {"preset": "full_dqar", "order": 2, "refresh": 3, "axis": "timestep"})


def axis_cases(steps: int) -> list[tuple[str, dict, ReuseConfig]]:
    """full_dqar-like block plans on both forecast axes (a flow model's shifted sigmas), after full_dqar's own pair."""
    out = []
    for (order, refresh), axis in itertools.product(((1, 2),), ("evaluation", "timestep")):
        out.append((f"block, order {order}, refresh {refresh}, {axis} axis", {"order": order, "refresh": refresh, "axis": axis},
                    forecast_config(order, "block", refresh, 2, steps, forecast_axis=axis)))
    return out


# ----- measurement -------------------------------------------------------------------------------
@dataclass
class _Context:
    """One sampling setting: the model, its reference, counted baseline calls per layer, work weights and the plan folder."""

    study: Study
    run: RunConfig
    base_layers: list
    weights: list


def _context(loaded, labels, run: RunConfig, evaluator, plan_dir: Path) -> _Context:
    per_layer: list = []
    with W.count_calls(W.layers(loaded.transformer), per_layer), W.captured_forward(loaded.transformer) as forward:
        ref = make_reference(loaded, labels, run, evaluator)
    return _Context(Study(loaded, ref, plan_dir), run, per_layer, W.work_weights(loaded, forward))


def _share(ctx: _Context, per_layer: list) -> float:
    return W.skipped_share(per_layer, ctx.base_layers, ctx.weights)


def measure_dqar(ctx: _Context, name: str, reuse: ReuseConfig, head: dict) -> dict:
    """One dqar configuration: counted, scored against the reference."""
    run = replace(ctx.run, reuse=reuse)
    per_layer: list = []
    with W.count_calls(W.layers(ctx.study.loaded.transformer), per_layer):
        gen, scores = ctx.study.measure(run)
    return study_row({"method": "dqar", "name": name, **head}, COLUMNS, gen.stats, scores,
                     work_skipped=_share(ctx, per_layer), config=asdict(reuse))


def measure_peer(ctx: _Context, peer: Any) -> dict:
    """One peer on its own copy of the transformer: counted, scored like a dqar row ('not run' with the reason)."""
    from dqar.errors import first_line
    from dqar.studies.core import score

    settings = P.to_dict(peer)
    head = {"method": settings.pop("method"), "name": f"{peer.title} " + ", ".join(f"{k}={v}" for k, v in settings.items()
                                                                                     if k != "targets" and v not in ([], ()))}
    reason = P.unavailable(peer)
    if reason:
        return {**head, "not_run": reason}
    loaded = model_copy(ctx.study.loaded)
    try:
        row = attach_peer(peer, loaded, ctx.study.labels, ctx.run)
        per_layer: list = []
        with W.count_calls(row.attached.blocks, per_layer):
            gen = row.generate()
        row.attached.detach()
    except Exception as exc:  # foreign code on a model it may not support: a row that says why
        return {**head, "not_run": f"{type(exc).__name__}: {first_line(exc)}"}
    scores = score(gen.output.images, ctx.study.reference)
    return study_row(head, COLUMNS, None, scores, work_skipped=_share(ctx, per_layer),
                     settings=settings, package=row.attached.package)


def _best_near(rows: Sequence[dict], share: float) -> dict | None:
    near = [r for r in rows if "psnr_db" in r and abs(r["work_skipped"] - share) <= SHARE_TOLERANCE]
    return max(near, key=lambda r: r["psnr_db"]) if near else None


def matched_shares(probe: _Context, ctx: _Context, tick: Callable[[str], None], tuned: Sequence[str],
                   out: list | None = None, probes: dict | None = None) -> list[dict]:
    """At each share: dqar's and each tuned peer's best setting on the probe seeds, all scored on the evaluated seeds.

    A row keeps "taylorseer" (and "taylorseer_probe") and, for every tuned peer, `peers[method]`; `probes` (a dict)
    receives every probe row by method (the tuning, written into the results).
    """
    dq, probed = [], {m: [] for m in tuned}
    if probes is not None:
        probes.update(dqar=dq, **probed)
    for name, cfg in dqar_share_candidates(ctx.run.sample.steps):
        tick(f"probe: {name}")
        dq.append(measure_dqar(probe, name, cfg, {}))
    for method in tuned:
        for peer in TUNED[method]():
            tick(f"probe: {peer.title}")
            probed[method].append(measure_peer(probe, peer))
    out = [] if out is None else out  # filled share by share (a checkpoint sees every finished share)
    for share in SHARES:
        pick_d = _best_near(dq, share)
        row = {"share": share, "dqar_probe": pick_d, "dqar": None, "taylorseer_probe": None, "taylorseer": None, "peers": {}}
        out.append(row)
        if pick_d is not None:
            row["dqar"] = measure_dqar(ctx, pick_d["name"], ReuseConfig(**_tuples(pick_d["config"])), {})
        for method in tuned:
            pick = _best_near(probed[method], share)
            scored = measure_peer(ctx, P.PEERS[method](**_tuples(pick["settings"]))) if pick is not None else None
            row["peers"][method] = scored
            if method == "taylorseer":
                row.update(taylorseer_probe=pick, taylorseer=scored)
            tick(f"share {share:.0%}: {method}")
    return out


def _tuples(settings: dict) -> dict:
    """A config's or peer's settings read back from JSON: lists as the tuples the dataclasses hold."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items()}


# ----- the study ---------------------------------------------------------------------------------
def _sample(settings: ForecastSettings, sampler: str, steps: int) -> SampleConfig:
    return SampleConfig(steps=steps, cfg=settings.cfg, sampler=sampler, seed=settings.seed)


def dpm_cases(steps: int) -> list[tuple[str, dict, ReuseConfig]]:
    """DPM-Solver++: orders 1 and 2 on both forecast axes at refresh 2, then order 2 at ≥ 50% skipped: refresh 3 and
    intervals ramped 2→3 and 3→2."""
    out = []
    cells = [(k, 0, o, a) for k, o, a in itertools.product((2,), (1, 2), ("evaluation", "timestep"))]
    cells += [(3, 0, 2, "evaluation"), (2, 3, 2, "evaluation"), (3, 2, 2, "evaluation")]
    for refresh, end, order, axis in cells:
        cfg = forecast_config(order, "block", refresh, 2, steps, refresh_end=end, forecast_axis=axis)
        head = {"order": order, "refresh": refresh, "axis": axis, **({"refresh_end": end} if end else {})}
        out.append((f"block, order {order}, {_interval_name(refresh, end)}, {axis} axis", head, cfg))
    return out


def dpm_probe_candidates(steps: int) -> list[tuple[str, dict, ReuseConfig]]:
    """DPM-Solver++ plans that skip ≥ 50% of the blocks (warm-up, interval ramp), one of which the probe seeds choose."""
    cells = [(1, 2, 3), (2, 2, 3), (1, 3, 2), (2, 3, 2), (1, 3, 0), (1, 3, 3), (1, 2, 4)]
    return [(f"block, order 2, warm-up {w}, {_interval_name(k, end)}, evaluation axis (chosen on probe seeds)",
             {"order": 2, "refresh": k, "refresh_end": end, "axis": "evaluation", "chosen_on_probe": True},
             forecast_config(2, "block", k, w, steps, refresh_end=end)) for w, k, end in cells]


def dpm_choice(probe: _Context, ctx: _Context, tick: Callable[[str], None]) -> dict | None:
    """The DPM-Solver++ candidate with the best probe PSNR among those skipping ≥ 50% of FLOPs, scored on the evaluated seeds."""
    best = None
    for name, head, cfg in dpm_probe_candidates(ctx.run.sample.steps):
        tick(f"DPM probe: {name}")
        r = measure_dqar(probe, name, cfg, head)
        if r["flops_skipped"] >= 0.50 and (best is None or r["psnr_db"] > best[0]["psnr_db"]):
            best = (r, name, head, cfg)
    return None if best is None else measure_dqar(ctx, best[1], best[3], {**best[2], "probe_psnr_db": best[0]["psnr_db"]})


def run_forecast(settings: ForecastSettings = ForecastSettings(), progress: bool = True,
                 checkpoint: Callable[[dict], None] | None = None) -> dict:
    """Measure every configuration and peer; returns a JSON-ready dict (nothing written). `checkpoint` gets the
    partial result after every measurement (a long run killed midway keeps what it measured)."""
    from tqdm.auto import tqdm

    from dqar.models import load_model

    loaded = load_model(settings.model)
    evaluator = embedded_evaluator(loaded)
    labels = cycle_labels(loaded.num_classes, settings.samples)
    probe_labels = cycle_labels(loaded.num_classes, settings.probe_samples)
    main = RunConfig(reuse=preset("baseline"), sample=_sample(settings, "ddim", settings.steps))  # flow models ignore the sampler
    flow = loaded.family != "dit"  # flow matching: no DPM-Solver++ part; the axes at the main setting
    cases = (grid_cases(settings.steps) if settings.grid else []) + extra_cases(settings.steps)
    dpm = dpm_cases(settings.dpm_steps) if settings.dpm_steps and not flow else []
    axes = axis_cases(settings.steps) if flow else []
    peers = default_peers() if settings.peers and settings.untuned else []
    total = 3 + len(cases) + len(axes) + flow + len(peers) + len(dpm) + len(dqar_share_candidates(settings.steps)) \
        + (len(dpm_probe_candidates(settings.dpm_steps)) + 2 if dpm else 0) \
        + (sum(len(TUNED[m]()) for m in settings.tuned) + len(settings.tuned) * len(SHARES) if settings.peers else 0)
    result: dict = {"settings": asdict(settings), "model": loaded.name, "evaluator": evaluator.description if evaluator else None,
                    "sampler": "flow matching (FlowMatchEulerDiscreteScheduler, dynamic shift)" if flow else "DDIM",
                    "baseline": None, "rows": [], "axis_rows": [], "peers": [], "matched": [], "probes": {},
                    "dpm_baseline": None, "dpm_rows": []}
    with tqdm(total=total, desc="forecast", disable=not progress) as bar, tempfile.TemporaryDirectory() as tmp:
        def tick(what: str) -> None:
            bar.set_postfix_str(what[:40])
            bar.update(1)
            if checkpoint is not None:
                checkpoint(result)

        ctx = _context(loaded, labels, main, evaluator, Path(tmp))
        result["baseline"] = baseline_row({"method": "baseline", "name": "no reuse"}, COLUMNS, ctx.study.reference)
        tick("reference")
        probe = _context(loaded, probe_labels, other_seeds(main), None, Path(tmp))
        tick("probe reference")
        for name, head, cfg in cases:
            result["rows"].append(measure_dqar(ctx, name, cfg, head))
            tick(name)
        if flow:
            _full_axes(ctx, result, tick)
        for peer in peers:
            result["peers"].append(measure_peer(ctx, peer))
            tick(peer.title)
        matched_shares(probe, ctx, tick, settings.tuned if settings.peers else (), out=result["matched"], probes=result["probes"])
        for name, head, cfg in axes:
            result["axis_rows"].append(measure_dqar(ctx, name, cfg, head))
            tick(name)
        if dpm:
            _dpm_part(settings, loaded, labels, probe_labels, main, evaluator, Path(tmp), dpm, result, tick)
    return result


def _full_axes(ctx: _Context, result: dict, tick: Callable[[str], None]) -> None:
    """full_dqar on both forecast axes: its preset row (the evaluation axis) and the same preset on the timestep axis."""
    full = next(r for r in result["rows"] if r.get("preset") == "full_dqar")
    name, head = AXIS_PRESET
    result["axis_rows"].append({**full, "name": "full_dqar preset, evaluation axis", "order": 2, "axis": "evaluation"})
    result["axis_rows"].append(measure_dqar(ctx, name, replace(preset("full_dqar"), forecast_axis="timestep"), head))
    tick(name)


def _dpm_part(settings, loaded, labels, probe_labels, main, evaluator, tmp: Path, dpm, result: dict, tick) -> None:
    """DPM-Solver++: its reference, the forecast-axis cases, and the plan the probe seeds choose."""
    dctx = _context(loaded, labels, replace(main, sample=_sample(settings, "dpm", settings.dpm_steps)), evaluator, tmp)
    result["dpm_baseline"] = baseline_row({"method": "baseline", "name": "no reuse"}, COLUMNS, dctx.study.reference)
    tick("DPM-Solver++ reference")
    for name, head, cfg in dpm:
        result["dpm_rows"].append(measure_dqar(dctx, name, cfg, head))
        tick(name)
    dprobe = _context(loaded, probe_labels, other_seeds(dctx.run), None, tmp)
    tick("DPM-Solver++ probe reference")
    chosen = dpm_choice(dprobe, dctx, tick)
    if chosen:
        result["dpm_rows"].append(chosen)
    tick("DPM-Solver++ chosen plan")
