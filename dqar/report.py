"""ABLATION_REPORT.md from the results JSON: tables, figures, methodology, and conclusions computed from the numbers.

Nothing here measures anything and no sentence is canned: `findings` derives every claim
(fastest, within bound, target met or missed, recommendation) from the records, and the
renderer only phrases those findings. The same results always give the same report.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

# Fidelity bound for "usable" configurations, and the method's targets.
PSNR_BOUND_DB = 30.0  # paired PSNR against the baseline's images, at least
ACC_DROP_BOUND = 1.0  # class-accuracy drop in percentage points, at most
TARGET_SPEEDUP = 1.25  # >= 25% faster ...
TARGET_MEMORY = 0.20  # ... or >= 20% less peak memory ...
TARGET_FD_LOSS = 1.0  # ... with <= 1 FD(ID) loss
DASH = "—"


# ----- record accessors -------------------------------------------------------------------------
def _get(rec: dict, *path: str) -> Any:
    cur: Any = rec
    for key in path:
        if not isinstance(cur, dict) or cur.get(key) is None:
            return None
        cur = cur[key]
    return cur


def speedup(r: dict) -> float:
    return r["measurements"]["speedup"]


def psnr(r: dict) -> float:
    return r["fidelity"]["psnr_db"]


def is_baseline(r: dict) -> bool:
    return not r["config"]["reuse"]["enabled"] and not r.get("peer")


def is_peer(r: dict) -> bool:
    """A peer method's row (dqar.peers), not a dqar configuration."""
    return bool(r.get("peer"))


def within_bound(r: dict) -> bool:
    """PSNR >= 30 dB and, where a classifier exists, class-accuracy drop <= 1 point."""
    drop = _get(r, "fidelity", "accuracy_drop_points")
    return psnr(r) >= PSNR_BOUND_DB and (drop is None or drop <= ACC_DROP_BOUND + 1e-9)


def target_quality_ok(r: dict) -> bool:
    """The target's quality side: FD loss <= 1 where FD exists, else the PSNR/accuracy bound."""
    fd_delta = _get(r, "fidelity", "fd_delta")
    return fd_delta <= TARGET_FD_LOSS if fd_delta is not None else within_bound(r)


def meets_target(r: dict) -> bool:
    mem = _get(r, "measurements", "memory_reduction")
    fast = speedup(r) >= TARGET_SPEEDUP
    lean = mem is not None and mem >= TARGET_MEMORY
    return (fast or lean) and target_quality_ok(r)


# ----- findings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Findings:
    """Every claim the report makes, computed from the records."""

    candidates: tuple  # configurations with reuse, each measured once
    best_speedup: dict | None
    best_reuse: dict | None
    best_memory: dict | None
    best_within: dict | None  # fastest configuration within the fidelity bound
    best_within_target_quality: dict | None  # fastest with the target's quality side satisfied
    best_memory_target_quality: dict | None
    recommended: dict | None  # best_within when it is faster than the baseline, else None
    target_met_by: tuple
    fd_available: bool
    accuracy_available: bool
    noise: float | None  # median relative spread (max-min)/median of the baseline timings


def _argmax(rows, key: Callable[[dict], float | None]) -> dict | None:
    rows = [r for r in rows if key(r) is not None]
    return max(rows, key=key) if rows else None


def timing_noise(records: list[dict]) -> float | None:
    spreads = []
    for r in records:
        t = r["measurements"]["baseline_times_s"]
        if len(t) >= 2:
            spreads.append((max(t) - min(t)) / statistics.median(t))
    return statistics.median(spreads) if spreads else None


def findings(results: dict) -> Findings:
    records = results.get("records", [])
    cands = tuple(r for r in records if not is_baseline(r) and not is_peer(r) and r.get("same_as") is None)
    within = [r for r in cands if within_bound(r)]
    quality = [r for r in cands if target_quality_ok(r)]
    best_within = _argmax(within, speedup)
    return Findings(
        candidates=cands,
        best_speedup=_argmax(cands, speedup),
        best_reuse=_argmax(cands, lambda r: _get(r, "reuse", "reuse_fraction")),
        best_memory=_argmax(cands, lambda r: _get(r, "measurements", "memory_reduction")),
        best_within=best_within,
        best_within_target_quality=_argmax(quality, speedup),
        best_memory_target_quality=_argmax(quality, lambda r: _get(r, "measurements", "memory_reduction")),
        recommended=best_within if best_within is not None and speedup(best_within) > 1.0 else None,
        target_met_by=tuple(sorted((r for r in cands if meets_target(r)), key=speedup, reverse=True)),
        fd_available=any(_get(r, "fidelity", "fd_delta") is not None for r in cands),
        accuracy_available=any(_get(r, "fidelity", "accuracy_drop_points") is not None for r in cands),
        noise=timing_noise(records),
    )


# ----- number formatting --------------------------------------------------------------------------
def f_time(v: float | None) -> str:
    if v is None:
        return DASH
    return f"{v * 1000:.1f} ms" if v < 1 else f"{v:.3f} s"


def f_x(v: float | None) -> str:
    return DASH if v is None else f"{v:.2f}×"


def _r(v: float, digits: int) -> float:
    """Rounded, with -0.0 turned into 0.0 (no "-0.0" in the report)."""
    return round(v, digits) + 0.0


def f_pct(v: float | None, digits: int = 1) -> str:
    return DASH if v is None else f"{_r(100 * v, digits):.{digits}f}%"


def f_num(v: float | None, digits: int) -> str:
    return DASH if v is None else f"{_r(v, digits):.{digits}f}"


def f_signed(v: float | None, digits: int = 2) -> str:
    return DASH if v is None else f"{_r(v, digits):+.{digits}f}"


def f_mb(v: float | None) -> str:
    return DASH if v is None else f"{v / 2**20:.1f}"


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict], str]
    needs: str = ""  # "ssim" | "accuracy" | "fd": shown only when some record has it


COLUMNS = (
    Column("Time/Sample", lambda r: f_time(r["measurements"]["time_per_sample_s"])),
    Column("Speedup", lambda r: f_x(speedup(r))),
    Column("Reuse %", lambda r: f_pct(_get(r, "reuse", "reuse_fraction"))),
    Column("Attn skipped", lambda r: f_pct(_get(r, "reuse", "attention_skipped_fraction")), "cfg"),
    Column("FLOPs skipped", lambda r: f_pct(_get(r, "reuse", "flops_skipped_fraction"))),
    Column("Cache (MB)", lambda r: f_num(_get(r, "reuse", "cache_mb_peak"), 2)),
    Column("Peak mem (MB)", lambda r: f_mb(r["measurements"]["peak_memory_bytes"])),
    Column("Mem saved", lambda r: f_pct(r["measurements"]["memory_reduction"])),
    Column("Host syncs", lambda r: DASH if _get(r, "reuse", "host_syncs") is None else str(r["reuse"]["host_syncs"])),
    Column("PSNR (dB)", lambda r: f_num(psnr(r), 2)),
    Column("SSIM", lambda r: f_num(_get(r, "fidelity", "ssim"), 4), "ssim"),
    Column("Max abs", lambda r: f_num(r["fidelity"]["max_abs"], 4)),
    Column("Class acc", lambda r: f_pct(_get(r, "fidelity", "class_accuracy")), "accuracy"),
    Column("FD", lambda r: f_num(_get(r, "fidelity", "fd"), 2), "fd"),
    Column("ΔFD", lambda r: f_signed(_get(r, "fidelity", "fd_delta")), "fd"),
)


def _columns(records: list[dict]) -> list[Column]:
    have = {
        "": True,
        "ssim": any(_get(r, "fidelity", "ssim") is not None for r in records),
        "accuracy": any(_get(r, "fidelity", "class_accuracy") is not None for r in records),
        "fd": any(_get(r, "fidelity", "fd") is not None for r in records),
        "cfg": any(_get(r, "reuse", "cfg_shared") for r in records),
    }
    return [c for c in COLUMNS if have[c.needs]]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def table(records: list[dict], lead: list[tuple[str, Callable[[dict], str]]], notes: Callable[[dict], str], all_records: list[dict]) -> list[str]:
    """A markdown table: lead columns, the metric columns, a Notes column."""
    cols = _columns(all_records)
    head = [h for h, _ in lead] + [c.header for c in cols] + ["Notes"]
    lines = [_row(head), _row(["---"] * len(head))]
    for r in records:
        lines.append(_row([fn(r) for _, fn in lead] + [c.cell(r) for c in cols] + [notes(r)]))
    return lines


# ----- descriptions ----------------------------------------------------------------------------------
def describe(config: dict, calibration: dict | None = None) -> str:
    """What a resolved reuse config does, in a few words (from the config itself)."""
    c = config["reuse"]
    if not c["enabled"]:
        return "no reuse (baseline)"
    if calibration:
        where = "calibrated plan (" + ", ".join(f"{k}={v}" for k, v in calibration.items()) + ")"
    elif c.get("plan_file"):
        where = f"saved plan {c['plan_file']}"
    elif c["schedule"] == "custom":
        where = f"layers {list(c['custom_layers'])}"
    else:
        where = f"{c['schedule']} schedule over {100 * c['layer_frac']:.0f}% of layers"
    parts = [f"{c['granularity']} reuse of {'K/V' if c['target'] == 'kv' else 'attention output'}", where,
             f"warmup {100 * c['warmup_frac']:.0f}%", f"refresh every {c['refresh_interval']}"]
    cache = "model-dtype cache" if c["cache_dtype"] == "model" else f"INT8 per-{c['quant_mode']} cache"
    if c.get("kv_mixed"):
        cache = f"K model dtype, V INT8 per-{c['quant_mode']}"
    parts.append(cache)
    if c.get("gate"):
        parts.append(f"entropy/SNR gate τ={c.get('entropy_tau')}")
    if c.get("cfg_share", "none") != "none":
        parts.append(f"CFG sharing {c['cfg_share']}")
    return ", ".join(parts)


def _label(r: dict) -> str:
    if r["varied"]:
        return ", ".join(f"{k.rpartition('.')[2]}={_value(v)}" for k, v in r["varied"].items())
    return r["name"]


def _value(v: Any) -> str:
    return str(list(v)) if isinstance(v, (list, tuple)) else str(v)


def _notes(f: Findings, records: list[dict]) -> Callable[[dict], str]:
    def notes(r: dict) -> str:
        out = []
        if is_baseline(r):
            out.append("reference baseline")
        if r.get("same_as"):
            out.append(f"same configuration as {r['same_as']}")
        src = r.get("same_as") or r["name"]
        if f.recommended is not None and src == f.recommended["name"]:
            out.append("recommended")
        if f.best_speedup is not None and src == f.best_speedup["name"]:
            out.append("fastest")
        if not is_baseline(r) and r["fidelity"].get("identical"):
            out.append("images identical to baseline")
        elif not is_baseline(r) and not within_bound(r):
            out.append("outside fidelity bound")
        if not r["measurements"].get("deterministic", True):
            out.append("repeats differed")
        return "; ".join(out)

    return notes


# ----- sentences (each phrases a computed finding) -------------------------------------------------------
def _summary(r: dict) -> str:
    bits = [f"{f_x(speedup(r))}", f"reuse {f_pct(_get(r, 'reuse', 'reuse_fraction'))}", f"PSNR {f_num(psnr(r), 2)} dB"]
    drop = _get(r, "fidelity", "accuracy_drop_points")
    if drop is not None:
        bits.append(f"class-accuracy drop {_r(drop, 1):.1f} points" if _r(drop, 1) >= 0 else f"class accuracy up {-drop:.1f} points")
    fd_delta = _get(r, "fidelity", "fd_delta")
    if fd_delta is not None:
        bits.append(f"ΔFD {f_signed(fd_delta)}")
    return ", ".join(bits)


def bound_text(f: Findings) -> str:
    acc = f" and class-accuracy drop ≤ {ACC_DROP_BOUND:g} point" if f.accuracy_available else ""
    return f"PSNR ≥ {PSNR_BOUND_DB:g} dB{acc}"


def target_text(f: Findings) -> str:
    quality = f"ΔFD ≤ {TARGET_FD_LOSS:g}" if f.fd_available else f"{bound_text(f)} (no FD for this model)"
    return f"≥ {TARGET_SPEEDUP:g}× speedup or ≥ {100 * TARGET_MEMORY:.0f}% less peak memory, with {quality}"


def target_verdict(f: Findings) -> str:
    """One sentence: met (by whom, with which numbers) or missed (by how much)."""
    if f.target_met_by:
        r = f.target_met_by[0]
        mem = r["measurements"].get("memory_reduction")
        mem_text = f", peak-memory saving {f_pct(mem)}" if mem is not None else ""
        return (f"✅ **Target met** ({target_text(f)}) by {len(f.target_met_by)} configuration(s); "
                f"fastest of them: `{r['name']}` ({_summary(r)}{mem_text}).")
    if not f.candidates:
        return "No configuration with reuse has been measured yet, so the target is not evaluated."
    fast, lean = f.best_within_target_quality, f.best_memory_target_quality
    parts = []
    if fast is not None:
        parts.append(f"the fastest configuration meeting the quality side is `{fast['name']}` at {f_x(speedup(fast))} (needs ≥ {TARGET_SPEEDUP:g}×)")
    lean_mem = _get(lean, "measurements", "memory_reduction") if lean else None
    if lean_mem is not None:
        parts.append(memory_text(lean, "meeting the quality side"))
    if fast is None:
        parts.append("no configuration meets the quality side")
    return f"❌ **Target missed** ({target_text(f)}): " + "; ".join(parts) + "."


def memory_text(r: dict, among: str) -> str:
    """The best peak-memory saving, phrased truthfully when every configuration used more memory."""
    mem = r["measurements"]["memory_reduction"]
    if _r(100 * mem, 1) > 0:
        return f"the largest peak-memory saving {among} is {f_pct(mem)} by `{r['name']}` (needs ≥ {100 * TARGET_MEMORY:.0f}%)"
    return (f"no configuration {among} used less peak memory than the baseline "
            f"(best: {f_pct(mem)} saved by `{r['name']}`; needs ≥ {100 * TARGET_MEMORY:.0f}%)")


def noise_sentence(f: Findings) -> str | None:
    if f.noise is None:
        return None
    return (f"Timing noise: the baseline runs timed with a configuration spread by a median of {f_pct(f.noise)} "
            f"(slowest − fastest, relative to the median); speedups closer to 1.00× than that are not distinguishable from noise.")


def recommendation(f: Findings) -> list[str]:
    out = []
    if f.recommended is not None:
        r = f.recommended
        caveat = " — within timing noise of the baseline" if f.noise is not None and speedup(r) - 1.0 <= f.noise else ""
        out.append(f"Use `{r['name']}` ({describe(r['config'], r.get('calibration'))}): the fastest configuration within the fidelity bound "
                   f"({bound_text(f)}): {_summary(r)}{caveat}.")
    elif f.best_within is not None:
        out.append(f"No configuration within the fidelity bound ({bound_text(f)}) was faster than the baseline "
                   f"(best: `{f.best_within['name']}` at {f_x(speedup(f.best_within))}); keep reuse off for speed on this model and device.")
    elif f.candidates:
        out.append(f"No configuration stayed within the fidelity bound ({bound_text(f)}); keep reuse off on this model.")
    b = f.best_speedup
    if b is not None and (f.recommended is None or b["name"] != f.recommended["name"]):
        side = "within" if within_bound(b) else "outside"
        out.append(f"`{b['name']}` is the fastest overall ({_summary(b)}), {side} the fidelity bound"
                   + (" — validate its images before using it." if side == "outside" else "."))
    return out


def sweep_picks(records: list[dict], noise: float | None) -> list[str]:
    """Per sweep: the fastest value within the fidelity bound, if any (flagged when speeds differ by less than the noise)."""
    out = []
    for name, rows in _sweeps(records).items():
        ok = [r for r in rows if within_bound(r)]
        if not ok:
            out.append(f"{name}: no value stays within the fidelity bound (best PSNR {f_num(max(map(psnr, rows)), 2)} dB).")
            continue
        best = max(ok, key=lambda r: (speedup(r), psnr(r)))
        text = f"{name}: `{_label(best)}` is the fastest value within the fidelity bound ({f_x(speedup(best))}, PSNR {f_num(psnr(best), 2)} dB)"
        gap = speedup(best) - min(map(speedup, ok))
        if len(ok) > 1 and noise is not None and gap <= noise:
            text += f"; the values within the bound differ in speedup by {gap:.2f}, less than the timing noise"
        out.append(text + ".")
    return out


def _sweeps(records: list[dict]) -> dict[str, list[dict]]:
    sweeps: dict[str, list[dict]] = {}
    for r in records:
        if r["role"] == "sweep":
            sweeps.setdefault(r["sweep"], []).append(r)
    return sweeps


def main_findings(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        if is_baseline(r):
            continue
        flops = _get(r, "reuse", "flops_skipped_fraction")
        realized = 1.0 - 1.0 / speedup(r)
        line = f"`{r['name']}`: {_summary(r)}"
        if flops is not None:
            change = f"saved {f_pct(realized)} of the time" if realized >= 0 else f"took {f_pct(-realized)} more time"
            line += f"; skipped {f_pct(flops)} of the FLOPs and {change}"
        out.append(line + ".")
    return out


def _same_outcome(rows: list[dict]) -> bool:
    key = lambda r: (str(_get(r, "reuse", "reuse_mask")), psnr(r), r["fidelity"]["max_abs"])  # noqa: E731
    return len(rows) > 1 and len({key(r) for r in rows}) == 1


def sweep_findings(name: str, rows: list[dict]) -> str:
    fast = max(rows, key=speedup)
    fine = max(rows, key=lambda r: (psnr(r), speedup(r)))  # ties in PSNR go to the faster value
    ok = sum(within_bound(r) for r in rows)
    if fast is fine:
        head = f"`{_label(fast)}` was both the fastest and the most faithful ({f_x(speedup(fast))}, PSNR {f_num(psnr(fast), 2)} dB)"
    else:
        head = (f"fastest `{_label(fast)}` ({f_x(speedup(fast))}, PSNR {f_num(psnr(fast), 2)} dB); "
                f"most faithful `{_label(fine)}` (PSNR {f_num(psnr(fine), 2)} dB, {f_x(speedup(fine))})")
    spread = (f"speedup {f_x(min(map(speedup, rows)))}–{f_x(max(map(speedup, rows)))}, "
              f"PSNR {f_num(min(map(psnr, rows)), 2)}–{f_num(max(map(psnr, rows)), 2)} dB")
    text = f"**{name}**: {head}; across values {spread}; {ok} of {len(rows)} within the fidelity bound."
    if _same_outcome(rows):
        text += " All values gave the same reuse decisions and the same fidelity numbers: this knob had no effect here."
    return text


# ----- sections ------------------------------------------------------------------------------------------
def _by_name(records: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in records}


def _header(res: dict) -> list[str]:
    env = res["environment"]
    return [
        "# DQAR Ablation Study Results", "",
        f"**Date**: {res.get('updated', res.get('created', ''))}",
        f"**Model**: {env['model']}",
        f"**Device**: {env['device']} ({env['device_name']}), dtype {env['dtype']}",
        f"**Status**: {res.get('status', 'partial')} — {res.get('completed', len(res.get('records', [])))} of {res.get('total', '?')} configurations measured"
        + (f", {len(res['not_run'])} not run (see Compared to)" if res.get("not_run") else ""),
        "", "---", "",
    ]


def _executive(res: dict, f: Findings) -> list[str]:
    def named(r, text):
        return f"{text} (`{r['name']}`)" if r is not None else DASH

    lines = ["## Executive Summary", "", "| Metric | Value |", "|--------|-------|"]
    lines.append(f"| **Best Speedup** | {named(f.best_speedup, f_x(speedup(f.best_speedup)) if f.best_speedup else '')} |")
    lines.append(f"| **Best Reuse Ratio** | {named(f.best_reuse, f_pct(_get(f.best_reuse, 'reuse', 'reuse_fraction')) if f.best_reuse else '')} |")
    lines.append(f"| **Fastest within fidelity bound** ({bound_text(f)}) | {named(f.best_within, f_x(speedup(f.best_within)) if f.best_within else '')} |")
    mem = _get(f.best_memory, "measurements", "memory_reduction") if f.best_memory else None
    if mem is None:
        mem_cell = DASH
    elif _r(100 * mem, 1) > 0:
        mem_cell = named(f.best_memory, f_pct(mem))
    else:
        mem_cell = f"none: no configuration used less than the baseline (best: {f_pct(mem)} saved, `{f.best_memory['name']}`)"
    lines.append(f"| **Largest peak-memory saving** | {mem_cell} |")
    met = "✅ Yes" if f.target_met_by else ("❌ No" if f.candidates else DASH)
    lines.append(f"| **Target Met** ({target_text(f)}) | {met} |")
    lines.append(f"| **Recommended** | {'`' + f.recommended['name'] + '`' if f.recommended else 'baseline (no reuse)' if f.candidates else DASH} |")
    lines += ["", target_verdict(f), "", "---", ""]
    return lines


def _main_table(res: dict, f: Findings) -> list[str]:
    records = res["records"]
    main = [r for r in records if r["role"] == "main"]
    lead = [("Configuration", lambda r: f"`{r['name']}`"), ("Description", lambda r: describe(r["config"], r.get("calibration")))]
    lines = ["## Main Ablation Comparison", "",
             f"The four configurations of the method's proposal at the study's shared sampling setting "
             f"({_sample_text(res['study']['sample'])}).", ""]
    lines += table(main, lead, _notes(f, records), records) if main else ["(not measured yet)"]
    return lines + ["", "---", ""]


def _sample_text(s: dict) -> str:
    return f"{s['sampler'].upper()}, {s['steps']} steps, CFG {s['cfg']:g}, seed {s['seed']}"


def _sweep_tables(res: dict, f: Findings) -> list[str]:
    records = res["records"]
    sweeps = _sweeps(records)
    if not sweeps:
        return []
    lines = ["## Sweeps", "", "Each sweep varies the listed fields of its base configuration; every ratio and paired "
             "metric is taken against the baseline with the same sampling setting (named in the Baseline column).", ""]
    for name, rows in sweeps.items():
        fields_ = list(dict.fromkeys(k for r in rows for k in r["varied"]))
        lead = [("Configuration", lambda r: f"`{r['name']}`")]
        lead += [(k.rpartition(".")[2], lambda r, k=k: _value(r["varied"].get(k, DASH))) for k in fields_]
        lead.append(("Baseline", lambda r: f"`{r['baseline']}`"))
        lines += [f"### Sweep: {name}", ""] + table(rows, lead, _notes(f, records), records)
        lines += ["", sweep_findings(name, rows), "",
                  "Grids: " + " · ".join(f"[{_label(r)}](images/{r['slug']}/grid.png)" for r in rows if r.get("slug")), ""]
    baselines = [r for r in records if is_baseline(r)]
    if len(baselines) > 1:
        lead = [("Baseline", lambda r: f"`{r['name']}`"), ("Sampling", lambda r: _sample_text(r["config"]["sample"]))]
        lines += ["### Baselines", ""] + table(baselines, lead, _notes(f, records), records) + [""]
    return lines + ["---", ""]


def _visual(res: dict) -> list[str]:
    art = res.get("artifacts", {})
    lines = ["## Visual Quality Comparison", "",
             "Every configuration generates its samples with the **same seeds**: same initial noise, same class labels; "
             "only the reuse settings differ. Paired PSNR/SSIM/max-abs compare each image with the baseline image of the same seed.", ""]
    main = [r["name"] for r in res["records"] if r["role"] == "main" and not is_baseline(r)]
    if main:
        lines += ["**Visual inspection checklist**:"] + [f"- [ ] baseline vs `{m}`: same objects, no artefacts" for m in main]
        lines += ["- [ ] sweeps: compare the grids linked under each sweep table", ""]
    if art.get("comparison"):
        lines += ["Baseline (first row) against each main configuration:", "", f"![comparison]({art['comparison']})", ""]
    for r in res["records"]:
        if r["role"] == "main":
            lines += [f"**{r['name']}** — `images/{r['slug']}/`", "", f"![{r['name']}](images/{r['slug']}/grid.png)", ""]
    if art.get("pareto"):
        lines += ["Speed against fidelity (the black line joins the Pareto-optimal configurations):", "", f"![pareto]({art['pareto']})", ""]
    if art.get("heatmap"):
        lines += ["Reuse decisions the engine executed (model evaluation × layer):", "", f"![reuse heatmap]({art['heatmap']})", ""]
    return lines + ["---", ""]


def _methodology(res: dict) -> list[str]:
    env, st = res["environment"], res["study"]
    s = st["sample"]
    names = st.get("class_names", {})
    label_text = ", ".join(f"{c} ({names[str(c)]})" if str(c) in names else str(c) for c in dict.fromkeys(st["labels"]))
    lines = ["## Methodology", "", "### Experimental Setup",
             f"- **Samples per config**: {st['num_samples']} ({st['samples_per_label']} per label)",
             f"- **Seed**: {st['seed']} (sample i uses seed {st['seed']} + i: seeds {st['seeds'][0]}–{st['seeds'][1]})",
             f"- **CFG Scale**: {s['cfg']:g}",
             f"- **Sampler**: {s['sampler'].upper()} ({s['steps']} steps unless a sweep varies them; eta {s['eta']:g})",
             f"- **Repeats**: {st['repeats']} timed runs per configuration, median reported"
             + (" — **fewer than 3: a test run, timings are not meaningful**" if st["repeats"] < 3 else ""),
             f"- **Timing**: {st['timing_method']}",
             f"- **Peak memory**: {st['memory_method']}",
             f"- **Fidelity**: {st['fidelity_method']}",
             f"- **Classifier metrics**: {st['classifier'] or 'none for this model (class accuracy and FD not measured)'}",
             *([f"- **Calibrated plans**: {st['calibration_method']}"] if st.get("calibration_method") else []),
             *([f"- **Peers**: {st['peer_method']}"] if st.get("peer_method") else []),
             f"- **Device**: {env['device']} ({env['device_name']}), {env['cpu_count']} CPU cores, {env['torch_threads']} torch threads",
             f"- **Software**: torch {env['torch']}, diffusers {env['diffusers']}, dqar {env['dqar']}, Python {env['python']}, {env['platform']}",
             f"- **Model dtype**: {env['dtype']}",
             f"- **Grid**: `{st['grid']}` (sha256 {st['grid_hash']})", "",
             "### Metrics Collected",
             "1. **Inference Time**: wall-clock time per sample of a whole generation (noise, sampling loop, decoding), median of the repeats",
             "2. **Speedup**: median of the bracketing baseline runs / median of the configuration's runs",
             "3. **Reuse Ratio**: share of (model evaluation, layer) pairs that reused a cached output, as executed"
             + ("; **Attn skipped** adds half of the pairs whose attention was shared between the CFG branches"
                if any(_get(r, "reuse", "cfg_shared") for r in res["records"]) else ""),
             "4. **FLOPs skipped**: analytic FLOPs not computed, as a share of the generation's total",
             "5. **Cache Memory**: peak bytes held by the reuse cache (values + INT8 scales), exact accounting",
             "6. **Peak Memory**: see above; **Mem saved** = 1 − peak / peak of the bracketing baseline runs",
             "7. **Host syncs**: device→host reads on the reuse engine's path per generation",
             "8. **PSNR / SSIM / Max abs**: paired against the baseline images of the same seeds",
             ]
    if st["classifier"]:
        lines.append("9. **Class acc / FD / ΔFD**: classifier top-1 accuracy against the requested labels; Fréchet distance of "
                     "classifier features to real data; ΔFD = FD − baseline FD")
    lines += ["", "### Class Labels Used", f"- {label_text}", "", "---", ""]
    return lines


def _caveats(res: dict, f: Findings) -> list[str]:
    st = res["study"]
    n = st["num_samples"]
    out = []
    if f.accuracy_available:
        base = [r for r in res["records"] if is_baseline(r) and _get(r, "fidelity", "class_accuracy") is not None]
        accs = ", ".join(f"`{r['name']}` {f_pct(r['fidelity']['class_accuracy'])}" for r in base)
        out.append(f"Class accuracy is measured on {n} images: one image moves it by {100 / n:.1f} points. "
                   f"Baseline class accuracy: {accs}; drops are relative to it.")
    if f.fd_available:
        out.append(f"FD is the Fréchet distance in the embedded classifier's feature space over {n} images, not Inception FID; "
                   f"the target's \"≤ 1 FID loss\" is applied to ΔFD as a proxy.")
    else:
        out.append("This model has no classifier here: FD cannot be measured, so the PSNR bound stands in for the target's FID criterion.")
    if res["environment"]["device"].startswith("cpu"):
        out.append("Peak memory on CPU is the whole process's resident set; the cache column is the exact size of what reuse stores.")
    if res.get("status") != "complete":
        out.append(f"This report is partial: {res.get('completed', len(res['records']))} of {res.get('total', '?')} configurations are measured; "
                   "rerun with `--resume` to finish.")
    return out


def _conclusions(res: dict, f: Findings) -> list[str]:
    lines = ["## Conclusions", "", target_verdict(f), "", "**Key Findings**:"]
    items = main_findings([r for r in res["records"] if r["role"] == "main"])
    noise = noise_sentence(f)
    if noise:
        items.append(noise)
    lines += [f"{i}. {t}" for i, t in enumerate(items, 1)] or ["(nothing measured yet)"]
    recs = recommendation(f) + sweep_picks(res["records"], f.noise)
    if recs:
        lines += ["", "**Recommendations**:"] + [f"- {t}" for t in recs]
    caveats = _caveats(res, f)
    lines += ["", "**Notes**:"] + [f"- {t}" for t in caveats]
    return lines + ["", "---", ""]


def render(results: dict) -> str:
    """The whole report as markdown."""
    from .compared import section

    f = findings(results)
    compared = section(results)
    parts = (_header(results) + _executive(results, f) + _main_table(results, f) + _sweep_tables(results, f)
             + (compared + ["---", ""] if compared else []) + _visual(results) + _methodology(results) + _conclusions(results, f))
    parts += [f"*Report generated by `dqar ablate` (dqar {results['environment']['dqar']}) from ablation_results.json*",
              f"*Timestamp: {results.get('updated', '')}*", ""]
    return "\n".join(parts)
