"""ABLATION_REPORT.md from the results JSON: tables, figures, methodology, and conclusions computed from the numbers.

Nothing here measures anything and no sentence is canned: `findings` derives every claim
(fastest, within bound, target met or missed, recommendation) from the records, and the
renderer only phrases those findings. The same results always give the same report.
"""
from __future__ import annotations

from typing import Sequence

from dqar.reporting import conclusions as C
from dqar.reporting.findings import (DASH, Findings, _r, bound_text, cell_value, describe, f_ci, f_pct, f_x_ci, findings, get,
                                     is_baseline, label, notes_for, sample_text, table)


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
        + _not_run_text(res),
        "", "---", "",
    ]


def _not_run_text(res: dict) -> str:
    gone = res.get("not_run") or []
    refused = sum(bool(n.get("refused")) for n in gone)
    return ((f", {refused} refused by this model (see Refused)" if refused else "")
            + (f", {len(gone) - refused} not run (see Compared to)" if len(gone) > refused else ""))


def _refused(res: dict) -> list[str]:
    """Configurations the model's family refuses, each with the engine's reason."""
    rows = [n for n in res.get("not_run") or [] if n.get("refused")]
    if not rows:
        return []
    return ["## Refused", "", f"{len(rows)} configurations of the grid are not run on {res['environment']['model']}: the engine "
            "refuses them at enable on every executor (the reason is its own message).", ""] + \
        [f"- `{n['name']}`: {n['reason']}" for n in rows] + ["", "---", ""]


def _leaders_cell(best: dict | None, lead: tuple) -> str:
    """The fastest when its interval separates, else the configurations not distinguishable from the highest."""
    if best is not None:
        return f"{f_x_ci(best)} (`{best['name']}`)"
    if not lead:
        return DASH
    return "not distinguishable on this machine: " + C.names(lead)


def _executive(res: dict, f: Findings) -> list[str]:
    def named(r, text):
        return f"{text} (`{r['name']}`)" if r is not None else DASH

    lines = ["## Executive Summary", "", "| Metric | Value |", "|--------|-------|"]
    lines.append(f"| **Fastest** | {_leaders_cell(f.fastest, f.leaders)} |")
    lines.append(f"| **Best Reuse Ratio** | {named(f.best_reuse, f_pct(get(f.best_reuse, 'reuse', 'reuse_fraction')) if f.best_reuse else '')} |")
    lines.append(f"| **Fastest within fidelity bound** ({bound_text(f)}) | {_leaders_cell(f.best_within, f.within_leaders)} |")
    mem = get(f.best_memory, "measurements", "memory_reduction") if f.best_memory else None
    if mem is None:
        mem_cell = DASH
    elif _r(100 * mem, 1) > 0:
        mem_cell = named(f.best_memory, f_pct(mem))
    else:
        mem_cell = f"none: no configuration used less than the baseline (best: {f_pct(mem)} saved, `{f.best_memory['name']}`)"
    lines.append(f"| **Largest peak-memory saving** | {mem_cell} |")
    met = "✅ Yes" if f.target_met_by else ("❌ No" if f.candidates else DASH)
    lines.append(f"| **Target Met** ({C.target_text(f)}) | {met} |")
    lines.append(f"| **Recommended** | {'`' + f.recommended['name'] + '`' if f.recommended else 'baseline (no reuse)' if f.candidates else DASH} |")
    flagged = ", ".join(f"`{r['name']}`" for r in f.flagged) or "none"
    lines.append(f"| **Flagged implausible** (above the FLOP ceiling) | {flagged if f.candidates else DASH} |")
    lines += ["", C.target_verdict(f), "", "---", ""]
    return lines


def _main_table(res: dict, f: Findings) -> list[str]:
    records = res["records"]
    main = [r for r in records if r["role"] == "main"]
    lead = [("Configuration", lambda r: f"`{r['name']}`"), ("Description", lambda r: describe(r["config"], r.get("calibration")))]
    lines = ["## Main Ablation Comparison", "",
             f"The four configurations of the method's proposal at the study's shared sampling setting "
             f"({sample_text(res['study']['sample'], res)}). Speedup: median baseline time / median time on the "
             f"{res['study'].get('clock', 'wall')} clock; 95% CI: the simultaneous interval claims compare.", ""]
    lines += table(main, lead, notes_for(f, records), records) if main else ["(not measured yet)"]
    return lines + ["", "---", ""]


def _sweep_tables(res: dict, f: Findings) -> list[str]:
    records = res["records"]
    sweeps = C.sweeps(records)
    if not sweeps:
        return []
    lines = ["## Sweeps", "", "Each sweep varies the listed fields of its base configuration and is timed as one block; every "
             "ratio and paired metric is taken against the baseline with the same sampling setting (named in the Baseline column).", ""]
    for name, rows in sweeps.items():
        fields_ = list(dict.fromkeys(k for r in rows for k in r["varied"]))
        lead = [("Configuration", lambda r: f"`{r['name']}`")]
        lead += [(k.rpartition(".")[2], lambda r, k=k: cell_value(r["varied"].get(k, DASH))) for k in fields_]
        lead.append(("Baseline", lambda r: f"`{r['baseline']}`"))
        lines += [f"### Sweep: {name}", ""] + table(rows, lead, notes_for(f, records), records)
        lines += ["", C.sweep_findings(name, rows), "",
                  "Grids: " + " · ".join(f"[{label(r)}](images/{r['slug']}/grid.png)" for r in rows if r.get("slug")), ""]
    baselines = [r for r in records if is_baseline(r)]
    if len(baselines) > 1:
        lead = [("Baseline", lambda r: f"`{r['name']}`"), ("Sampling", lambda r: sample_text(r["config"]["sample"], res))]
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


def _executors(res: dict) -> list[str]:
    """Which executor timed what, and why a configuration was not on the first executor tried."""
    why: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for r in res["records"]:
        m = r["measurements"]
        if r.get("same_as") is None and m.get("executor"):
            counts[m["executor"]] = counts.get(m["executor"], 0) + 1
            if m.get("executor_note"):
                why.setdefault(f"{m['executor']}: {m['executor_note']}", []).append(f"`{r['name']}`")
    lines = ["- **Executors**: " + ", ".join(f"{n} timed {ex}" for ex, n in counts.items())
             + ("; the ones not on the first executor tried, and why:" if why else "")]
    lines += [f"  - {reason}: {', '.join(ns)}" for reason, ns in why.items()]
    return lines


def _methodology(res: dict) -> list[str]:
    env, st = res["environment"], res["study"]
    s = st["sample"]
    names = st.get("class_names", {})
    label_text = ", ".join(f"{c} ({names[str(c)]})" if str(c) in names else str(c) for c in dict.fromkeys(st["labels"]))
    lines = ["## Methodology", "", "### Experimental Setup",
             f"- **Timing batch**: {st['num_samples']} images per generation ({st['samples_per_label']} per label)",
             f"- **Fidelity run**: {st.get('fidelity_samples', st['num_samples'])} images — {st.get('fidelity_runs_method', '')}",
             f"- **Seed**: {st['seed']} (sample i uses seed {st['seed']} + i: seeds {st['seeds'][0]}–{st['seeds'][1]} in the timing batch)",
             f"- **CFG Scale**: {s['cfg']:g}",
             f"- **Sampler**: {s['sampler'].upper()} ({s['steps']} steps unless a sweep varies them; eta {s['eta']:g})",
             f"- **Repeats**: {st['repeats']} timed rounds per block, after one untimed warm-up of every case"
             + (" — **fewer than 3: a test run, timings are not meaningful**" if st["repeats"] < 3 else ""),
             f"- **Order**: {st['timing_method']}",
             f"- **Clock**: {st.get('clock_method', '')}",
             "- **Diagnostics**: timed runs track no INT8 round-trip error and run no finite guard; quantization error, "
             "non-finite counts and host syncs come from an untimed run with the configuration's own settings",
             f"- **Statistics**: {st.get('statistics_method', '')}",
             f"- **Executor choice**: {st.get('executor_method', '')}",
             *_executors(res),
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
             "1. **Time/Sample**: time per image of a whole generation (noise, sampling loop, decoding) on the clock above, median of the rounds",
             "2. **Speedup**: median of the baseline's runs / median of the configuration's runs, both from the same rounds; "
             "**95% CI**: the simultaneous bootstrap interval; **FLOP ceiling**: 1 / (1 − FLOPs skipped)",
             "3. **Reuse Ratio**: share of (model evaluation, layer) pairs that reused a cached output, as executed"
             + ("; **Attn skipped** adds half of the pairs whose attention was shared between the CFG branches"
                if any(get(r, "reuse", "cfg_shared") for r in res["records"]) else ""),
             "4. **FLOPs skipped**: analytic FLOPs not computed, as a share of the generation's total",
             "5. **Cache Memory**: peak bytes held by the reuse cache (values + INT8 scales), exact accounting",
             "6. **Peak Memory**: see above; **Mem saved** = 1 − peak / peak of the baseline's runs",
             "7. **Host syncs**: device→host reads on the reuse engine's path per generation (diagnostics run)",
             "8. **PSNR / SSIM / Max abs**: paired against the baseline images of the same seeds; **Images**: how many they are on",
             ]
    if st["classifier"]:
        lines.append("9. **Class acc / FD / ΔFD**: classifier top-1 accuracy against the requested labels with its 95% Wilson "
                     "interval; Fréchet distance of classifier features to real data; ΔFD = FD − baseline FD, with a 95% "
                     "paired-bootstrap interval")
    lines += ["", "### Class Labels Used", f"- {label_text}", "", "---", ""]
    return lines


def _caveats(res: dict, f: Findings) -> list[str]:
    st = res["study"]
    n, big = st["num_samples"], st.get("fidelity_samples", st["num_samples"])
    out = []
    if f.accuracy_available:
        base = [r for r in res["records"] if is_baseline(r) and get(r, "fidelity", "class_accuracy") is not None]
        accs = ", ".join(f"`{r['name']}` {f_pct(r['fidelity']['class_accuracy'])} {f_ci(get(r, 'fidelity', 'class_accuracy_ci'), 1, 100.0)} "
                         f"on {r['fidelity'].get('samples', n)} images" for r in base)
        out.append(f"Class accuracy on the {n}-image timing batch moves by {100 / n:.1f} points per image; its Wilson interval "
                   f"says how little that shows. Baseline class accuracy: {accs}; a configuration leaves the fidelity bound only "
                   f"when its interval rules out a drop of at most 1 point.")
    if f.fd_available:
        out.append(f"FD is the Fréchet distance in the embedded classifier's feature space on the {big}-image fidelity runs "
                   f"(at least {st.get('fd_min_samples')} images), not Inception FID; the target's \"≤ 1 FID loss\" is applied "
                   f"to the upper end of ΔFD's interval as a proxy.")
    elif st["classifier"]:
        out.append(f"No fidelity run has reached {st.get('fd_min_samples')} images yet, so no FD is reported.")
    else:
        out.append("This model has no classifier here: FD cannot be measured, so the PSNR bound stands in for the target's FID criterion.")
    if res["environment"]["device"].startswith("cpu"):
        out.append("Peak memory on CPU is the whole process's resident set; the cache column is the exact size of what reuse stores.")
    if res.get("status") != "complete":
        out.append(f"This report is partial: {res.get('completed', len(res['records']))} of {res.get('total', '?')} configurations are measured; "
                   "rerun with `--resume` to finish.")
    return out


def _conclusions(res: dict, f: Findings) -> list[str]:
    lines = ["## Conclusions", "", C.target_verdict(f), "", "**Key Findings**:"]
    items = C.main_findings([r for r in res["records"] if r["role"] == "main"])
    items += [t for t in (C.statistics_sentence(f), C.flagged_sentence(f)) if t]
    lines += [f"{i}. {t}" for i, t in enumerate(items, 1)] or ["(nothing measured yet)"]
    recs = C.recommendation(f) + C.sweep_picks(res["records"])
    if recs:
        lines += ["", "**Recommendations**:"] + [f"- {t}" for t in recs]
    caveats = _caveats(res, f)
    lines += ["", "**Notes**:"] + [f"- {t}" for t in caveats]
    return lines + ["", "---", ""]


def excerpt(results: dict, title: str, preamble: Sequence[str] = ()) -> str:
    """A `## title` document section from a study's results: the executive summary, the main comparison, sweeps,
    refusals and peers, every heading demoted below the section (the same computed text as the report)."""
    from dqar.reporting.compared import section

    f = findings(results)
    parts = _executive(results, f) + _main_table(results, f) + _sweep_tables(results, f) + _refused(results) + section(results, 2, False)
    body = [("##" + line) if line.startswith("#") else line for line in parts if line != "---" and not line.startswith("Grids: ")]
    return "\n".join([f"## {title}", "", *preamble, "", *body]).rstrip() + "\n"


def render(results: dict) -> str:
    """The whole report as markdown."""
    from dqar.reporting.compared import section

    f = findings(results)
    compared = section(results)
    parts = (_header(results) + _executive(results, f) + _main_table(results, f) + _sweep_tables(results, f) + _refused(results)
             + (compared + ["---", ""] if compared else []) + _visual(results) + _methodology(results) + _conclusions(results, f))
    parts += [f"*Report generated by `dqar ablate` (dqar {results['environment']['dqar']}) from ablation_results.json*",
              f"*Timestamp: {results.get('updated', '')}*", ""]
    return "\n".join(parts)
