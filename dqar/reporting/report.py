"""ABLATION_REPORT.md from the results JSON: tables, figures, methodology, and conclusions computed from the numbers.

Nothing here measures anything and no sentence is canned: `findings` derives every claim
(fastest, within bound, target met or missed, recommendation) from the records, and the
renderer only phrases those findings. The same results always give the same report.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

from dqar.reporting.findings import (DASH, Findings, TARGET_FD_LOSS, TARGET_MEMORY, TARGET_SPEEDUP, _r, _summary, bound_text, cell_value, describe, f_num, f_pct, f_x, findings, get, is_baseline, label, notes_for, psnr, sample_text, speedup, table, within_bound)

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
    lean_mem = get(lean, "measurements", "memory_reduction") if lean else None
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
        text = f"{name}: `{label(best)}` is the fastest value within the fidelity bound ({f_x(speedup(best))}, PSNR {f_num(psnr(best), 2)} dB)"
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
        flops = get(r, "reuse", "flops_skipped_fraction")
        realized = 1.0 - 1.0 / speedup(r)
        line = f"`{r['name']}`: {_summary(r)}"
        if flops is not None:
            change = f"saved {f_pct(realized)} of the time" if realized >= 0 else f"took {f_pct(-realized)} more time"
            line += f"; skipped {f_pct(flops)} of the FLOPs and {change}"
        out.append(line + ".")
    return out


def _same_outcome(rows: list[dict]) -> bool:
    key = lambda r: (str(get(r, "reuse", "reuse_mask")), psnr(r), r["fidelity"]["max_abs"])  # noqa: E731
    return len(rows) > 1 and len({key(r) for r in rows}) == 1


def sweep_findings(name: str, rows: list[dict]) -> str:
    fast = max(rows, key=speedup)
    fine = max(rows, key=lambda r: (psnr(r), speedup(r)))  # ties in PSNR go to the faster value
    ok = sum(within_bound(r) for r in rows)
    if fast is fine:
        head = f"`{label(fast)}` was both the fastest and the most faithful ({f_x(speedup(fast))}, PSNR {f_num(psnr(fast), 2)} dB)"
    else:
        head = (f"fastest `{label(fast)}` ({f_x(speedup(fast))}, PSNR {f_num(psnr(fast), 2)} dB); "
                f"most faithful `{label(fine)}` (PSNR {f_num(psnr(fine), 2)} dB, {f_x(speedup(fine))})")
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
    lines.append(f"| **Best Reuse Ratio** | {named(f.best_reuse, f_pct(get(f.best_reuse, 'reuse', 'reuse_fraction')) if f.best_reuse else '')} |")
    lines.append(f"| **Fastest within fidelity bound** ({bound_text(f)}) | {named(f.best_within, f_x(speedup(f.best_within)) if f.best_within else '')} |")
    mem = get(f.best_memory, "measurements", "memory_reduction") if f.best_memory else None
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
             f"({sample_text(res['study']['sample'])}).", ""]
    lines += table(main, lead, notes_for(f, records), records) if main else ["(not measured yet)"]
    return lines + ["", "---", ""]


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
        lead += [(k.rpartition(".")[2], lambda r, k=k: cell_value(r["varied"].get(k, DASH))) for k in fields_]
        lead.append(("Baseline", lambda r: f"`{r['baseline']}`"))
        lines += [f"### Sweep: {name}", ""] + table(rows, lead, notes_for(f, records), records)
        lines += ["", sweep_findings(name, rows), "",
                  "Grids: " + " · ".join(f"[{label(r)}](images/{r['slug']}/grid.png)" for r in rows if r.get("slug")), ""]
    baselines = [r for r in records if is_baseline(r)]
    if len(baselines) > 1:
        lead = [("Baseline", lambda r: f"`{r['name']}`"), ("Sampling", lambda r: sample_text(r["config"]["sample"]))]
        lines += ["### Baselines", ""] + table(baselines, lead, notes_for(f, records), records) + [""]
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
                if any(get(r, "reuse", "cfg_shared") for r in res["records"]) else ""),
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
        base = [r for r in res["records"] if is_baseline(r) and get(r, "fidelity", "class_accuracy") is not None]
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
    from dqar.reporting.compared import section

    f = findings(results)
    compared = section(results)
    parts = (_header(results) + _executive(results, f) + _main_table(results, f) + _sweep_tables(results, f)
             + (compared + ["---", ""] if compared else []) + _visual(results) + _methodology(results) + _conclusions(results, f))
    parts += [f"*Report generated by `dqar ablate` (dqar {results['environment']['dqar']}) from ablation_results.json*",
              f"*Timestamp: {results.get('updated', '')}*", ""]
    return "\n".join(parts)
