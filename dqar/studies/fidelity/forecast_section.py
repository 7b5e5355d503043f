"""The "Forecast" section of docs/FIDELITY.md: targets computed from `dqar.studies.fidelity.forecast` results, table, plot."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dqar.studies.core import frontier, y_at
from dqar.studies.fidelity.forecast import SECTION, SHARE_TOLERANCE
from dqar.studies.peers.methods import PEERS

TITLES = {"dqar": "dqar", **{m: cls.title for m, cls in PEERS.items()}}

PLOT = "fidelity_forecast.png"
RAW = "fidelity_forecast.json"
# Per model: full_dqar's FLOPs share and PSNR, the frontier's PSNR at >= 70% (issue targets); others: the DiT's.
TARGETS = {"embedded": {"full_share": 0.60, "full_db": 40.0, "frontier_db": 35.0},
           "embedded-flux": {"full_share": 0.55, "full_db": 35.0, "frontier_db": 32.0}}


def bars(result: dict) -> dict:
    return TARGETS.get(result.get("model"), TARGETS["embedded"])


def section_name(result: dict) -> str:
    """"Forecast" for the embedded DiT; "Forecast (MODEL)" for another model (its own section beside the DiT's)."""
    model = result.get("model")
    return SECTION if model in (None, "embedded") else f"{SECTION} ({model})"


def files(result: dict) -> tuple[str, str]:
    """(plot, raw JSON) file names of the result's model."""
    model = result.get("model")
    if model in (None, "embedded"):
        return PLOT, RAW
    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(model))
    return f"fidelity_forecast_{tag}.png", f"fidelity_forecast_{tag}.json"


# ----- targets -----------------------------------------------------------------------------------
def _measured(rows) -> list[dict]:
    return [r for r in rows if r and "psnr_db" in r]


def _best(rows, cond) -> dict | None:
    ok = [r for r in _measured(rows) if cond(r)]
    return max(ok, key=lambda r: r["psnr_db"]) if ok else None


def _dqar_rows(result: dict) -> list[dict]:
    return _measured(result["rows"] + [m["dqar"] for m in result["matched"]])


def targets(result: dict) -> dict[str, Any]:
    """Each target of the forecast study: the measured numbers and whether it is met."""
    base, bar = result["baseline"], bars(result)
    out: dict[str, Any] = {}
    full = next((r for r in result["rows"] if r["name"] == "full_dqar preset"), None)
    if full is not None:
        acc_ok = base["class_accuracy"] is None or abs(full["class_accuracy"] - base["class_accuracy"]) <= 0.01 + 1e-9
        fd_ok = base["fd"] is None or full["fd"] <= 1.02 * base["fd"]
        out["full_dqar"] = {"flops_skipped": full["flops_skipped"], "psnr_db": full["psnr_db"], "accuracy_ok": acc_ok,
                            "fd_ok": fd_ok, "met": full["flops_skipped"] >= bar["full_share"] and full["psnr_db"] >= bar["full_db"] and acc_ok and fd_ok}
        rival = _best([r for r in _dqar_rows(result) if r.get("preset") != "full_dqar"],
                      lambda r: r["flops_skipped"] >= full["flops_skipped"] - 0.005)
        out["beside"] = rival and {"row": rival["name"], "flops_skipped": rival["flops_skipped"], "psnr_db": rival["psnr_db"],
                                   "class_accuracy": rival["class_accuracy"], "gain_db": rival["psnr_db"] - full["psnr_db"]}
    high = _best(_dqar_rows(result), lambda r: r["flops_skipped"] >= 0.70)
    out["frontier"] = {"row": high and high["name"], "flops_skipped": high and high["flops_skipped"],
                       "psnr_db": high and high["psnr_db"], "met": bool(high and high["psnr_db"] >= bar["frontier_db"])}
    out["matched"] = []
    for m in result["matched"]:
        for method, t in (m.get("peers") or {"taylorseer": m["taylorseer"]}).items():
            d = m["dqar"]
            gain = d["psnr_db"] - t["psnr_db"] if d and t and "psnr_db" in d and "psnr_db" in t else None
            out["matched"].append({"share": m["share"], "peer": method, "title": TITLES.get(method, method),
                                   "gain_db": gain, "met": gain is not None and gain >= 1.0})
    out["matched_met"] = sum(m["met"] for m in out["matched"])
    out["int8"] = _int8_gaps(result["rows"])
    if result.get("axis_rows"):
        out["axes"] = _axis_gaps(result["axis_rows"])
    if result["dpm_rows"]:
        dpm = _best(result["dpm_rows"], lambda r: r["flops_skipped"] >= 0.50)
        out["dpm"] = {"row": dpm and dpm["name"], "psnr_db": dpm and dpm["psnr_db"], "met": bool(dpm and dpm["psnr_db"] >= 35)}
        out["axes"] = _axis_gaps(result["dpm_rows"])
    return out


def _int8_gaps(rows) -> list[dict]:
    twins = [r for r in rows if r.get("preset")]
    if not any(r["cache"] == "model" for r in twins):  # an older result: the grid's taylor row stood in for the model-dtype twin
        twins += [r for r in rows if not r.get("preset") and r.get("order") == 2 and r.get("granularity") == "block"]
    pairs = twins
    by = {(r["refresh"], r["cache"]): r for r in pairs}
    gaps = []
    for refresh in sorted({k[0] for k in by}):
        a, b = by.get((refresh, "model")), by.get((refresh, "int8"))
        if a and b:
            gap = a["psnr_db"] - b["psnr_db"]
            gaps.append({"refresh": refresh, "gap_db": gap, "met": gap <= 0.3})
    return gaps


def _axis_gaps(rows) -> list[dict]:
    by = {(r.get("preset", ""), r["order"], r["refresh"], r["axis"]): r for r in rows if not r.get("refresh_end")}
    return [{"preset": p, "order": o, "refresh": k, "timestep_minus_evaluation_db": by[(p, o, k, "timestep")]["psnr_db"] - r["psnr_db"]}
            for (p, o, k, axis), r in sorted(by.items()) if axis == "evaluation" and (p, o, k, "timestep") in by]


def axis_verdict(gaps: list[dict]) -> str:
    """Which forecast axis gave the higher PSNR, computed from the paired rows."""
    if not gaps:
        return "no paired rows"
    wins = sum(g["timestep_minus_evaluation_db"] > 0 for g in gaps)
    mean = sum(g["timestep_minus_evaluation_db"] for g in gaps) / len(gaps)
    better = "timestep" if wins * 2 > len(gaps) else "evaluation" if wins * 2 < len(gaps) else "neither"
    return (f"the {better} axis is better on this model" if better != "neither" else "neither axis is better") + \
        f": timestep ahead in {wins} of {len(gaps)} pairs, mean timestep − evaluation {mean:+.2f} dB"


def peer_gaps(result: dict) -> list[dict]:
    """Each measured peer against dqar's block-forecast frontier at the peer's share of skipped work."""
    front = frontier([r for r in _dqar_rows(result) if r.get("config", {}).get("granularity") == "block"], "work_skipped")
    out = []
    for r in _measured(result["peers"]) + _measured(_matched_peers(result)):
        at = y_at(front, r["work_skipped"])
        out.append({"name": r["name"], "work_skipped": r["work_skipped"], "psnr_db": r["psnr_db"],
                    "dqar_db": at if math.isfinite(at) else None})
    return out


def _matched_peers(result: dict) -> list[dict]:
    return [r for m in result["matched"] for r in (m.get("peers") or {"taylorseer": m["taylorseer"]}).values()]


# ----- writing -----------------------------------------------------------------------------------
def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _num(v, d=2) -> str:
    return "—" if v is None else f"{v:.{d}f}"


def _table(rows: list[dict]) -> list[str]:
    out = ["| configuration | reuse | FLOPs skipped | attn1+ff work skipped | PSNR (dB) | SSIM | class acc. | FD |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "not_run" in r:
            out.append(f"| {r['name']} | not run: {r['not_run']} | | | | | | |")
            continue
        out.append(f"| {r['name']} | {_pct(r.get('reuse'))} | {_pct(r.get('flops_skipped'))} | {_pct(r.get('work_skipped'))} | "
                   f"{_num(r['psnr_db'])} | {_num(r['ssim'], 4)} | {_pct(r['class_accuracy'])} | {_num(r['fd'])} |")
    return out


def _titled(title: str, rows: list[dict]) -> list[str]:
    return [title, "", *_table(rows), ""] if rows else []


def _verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def _target_lines(t: dict, result: dict) -> list[str]:
    lines, bar = [], bars(result)
    if "full_dqar" in t:
        f = t["full_dqar"]
        lines.append(f"- `full_dqar`: {_pct(f['flops_skipped'])} of FLOPs skipped at {_num(f['psnr_db'])} dB, class accuracy "
                     f"{'within' if f['accuracy_ok'] else 'outside'} 1 point, FD {'within' if f['fd_ok'] else 'above'} +2% — "
                     f"target (≥ {bar['full_share']:.0%} at ≥ {bar['full_db']:g} dB) {_verdict(f['met'])}.")
    if t.get("beside"):
        b = t["beside"]
        lines.append(f"- Beside `full_dqar` (the same preset on every model): the best other static dqar plan measured at "
                     f"≥ its FLOPs share is {b['row']} ({_pct(b['flops_skipped'])}, {_num(b['psnr_db'])} dB, class accuracy "
                     f"{_pct(b['class_accuracy'])}): {b['gain_db']:+.2f} dB against `full_dqar`.")
    fr = t["frontier"]
    lines.append("- Frontier: best PSNR with ≥ 70% of FLOPs skipped: "
                 + (f"{_num(fr['psnr_db'])} dB ({fr['row']}, {_pct(fr['flops_skipped'])})" if fr["row"] else "no such row")
                 + f" — target (≥ {bar['frontier_db']:g} dB) {_verdict(fr['met'])}.")
    for m in t["matched"]:
        lines.append(f"- At ≈{m['share']:.0%} of attn1+ff work skipped (±{SHARE_TOLERANCE:.1%}): dqar − {m['title']} = "
                     + (f"{m['gain_db']:+.2f} dB" if m["gain_db"] is not None else "not comparable (no setting near this share)")
                     + f" — target (≥ +1 dB) {_verdict(m['met'])}.")
    for g in t["int8"]:
        lines.append(f"- INT8 history (full_dqar) − model-dtype history under the same plan (block, order 2, refresh "
                     f"{g['refresh']}): {-g['gap_db']:+.2f} dB — target (at most 0.3 dB lower) {_verdict(g['met'])}.")
    if "dpm" in t:
        d = t["dpm"]
        lines.append(f"- DPM-Solver++ {result['settings']['dpm_steps']} steps, ≥ 50% of FLOPs skipped: "
                     + (f"{_num(d['psnr_db'])} dB ({d['row']})" if d["row"] else "no such row") + f" — target (≥ 35 dB) {_verdict(d['met'])}.")
    if "axes" in t:
        where = "DPM-Solver++" if "dpm" in t else result.get("sampler", "this sampler").split(" (")[0]
        for a in t["axes"]:
            what = "full_dqar preset" if a.get("preset") else f"order {a['order']}, refresh {a['refresh']}"
            lines.append(f"- Forecast axis, {where}, {what}: timestep axis "
                         f"{a['timestep_minus_evaluation_db']:+.2f} dB against the evaluation axis.")
        if result.get("axis_rows"):
            lines.append(f"- Forecast axis on {where}: {axis_verdict(t['axes'])}.")
    return lines


def markdown(result: dict) -> str:
    s, b = result["settings"], result["baseline"]
    plot_file, raw_file = files(result)
    lines = [f"## {section_name(result)}", "",
             f"Produced by `{result.get('command') or 'dqar fidelity --section forecast'}` on the {result['model']} model"
             + (f" ({result['date']}, {result['machine']})" if result.get("date") else "") + f": {s['samples']} samples (labels "
             f"cycling over the classes, seeds {s['seed']}…{s['seed'] + s['samples'] - 1}), {result.get('sampler', 'DDIM')} "
             f"{s['steps']} steps, CFG {s['cfg']}; "
             f"matched-share settings chosen on {s['probe_samples']} probe samples with other seeds. PSNR/SSIM are paired "
             "against the no-reuse run of the same seeds; 'attn1+ff work skipped' counts the attention (each layer's attn1 / "
             "attn) and MLP forwards that did not run, weighted by each layer's FLOPs, for dqar and peers alike. No reuse: class accuracy "
             f"**{_pct(b['class_accuracy'])}**, FD **{_num(b['fd'])}**.", "",
             *([f"**Partial**: the run was stopped after {result.get('run_seconds', 0) / 60:.0f} minutes; what it had not "
                "measured is absent below (a target without its rows reads as not comparable).", ""]
               if result.get("status") == "partial" else []),
             "### Targets", "", *_target_lines(targets(result), result), "",
             f"![forecast Pareto plot]({plot_file})", "",
             *_titled("### Order × granularity × refresh", [r for r in result["rows"] if "order" in r]),
             *_titled("### The preset (INT8 history)", [r for r in result["rows"] if "order" not in r])]
    if result["peers"]:
        lines += ["### Peers (their own packages, default grid settings)", "", *_table(result["peers"]), ""]
        gaps = peer_gaps(result)
        lines += [f"- {g['name']}: {_num(g['psnr_db'])} dB at {_pct(g['work_skipped'])} of the work skipped; dqar's block-forecast "
                  "frontier there: " + (f"{_num(g['dqar_db'])} dB" if g["dqar_db"] is not None else "outside its range")
                  for g in gaps] + [""]
    lines += ["### Matched shares (chosen on probe seeds, scored on the evaluated seeds)", "",
              "| share | method | setting (work skipped) | PSNR (dB) | class acc. |", "|---|---|---|---|---|"]
    for m in result["matched"]:
        for method, r in [("dqar", m["dqar"]), *(m.get("peers") or {"taylorseer": m["taylorseer"]}).items()]:
            r = r or {}
            lines.append(f"| {m['share']:.0%} | {TITLES.get(method, method)} | {r.get('name', 'no setting near this share')} "
                         f"({_pct(r.get('work_skipped'))}) | {_num(r.get('psnr_db'))} | {_pct(r.get('class_accuracy'))} |")
    if result.get("probes"):
        lines += ["", "### The tuning: every candidate on the probe seeds", "", "| method | setting | work skipped | probe PSNR (dB) |",
                  "|---|---|---|---|"]
        lines += [f"| {TITLES.get(m, m)} | {r['name']} | {_pct(r.get('work_skipped'))} | {_num(r.get('psnr_db'))} |"
                  for m, rows in result["probes"].items() for r in rows if "psnr_db" in r]
    if result.get("axis_rows"):
        lines += ["", f"### Forecast axes at the main setting ({result.get('sampler', '')})", "", *_table(result["axis_rows"])]
    if result["dpm_rows"]:
        lines += ["", f"### DPM-Solver++ {s['dpm_steps']} steps: forecast axes", "", *_table(result["dpm_rows"])]
    lines += ["", f"Raw numbers: `{raw_file}`.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from dqar.reporting.plots import fidelity_panels

    series = []
    for order, marker in ((0, "o"), (1, "s"), (2, "^")):
        for gran, ls in (("block", "-"), ("attention", ":")):
            rows = sorted((r for r in result["rows"] if r.get("order") == order and r.get("granularity") == gran),
                          key=lambda r: r["work_skipped"])
            if rows:
                series.append(_series(f"dqar {gran}, order {order}", rows, {"marker": marker, "linestyle": ls}))
    matched = sorted(_measured([m["dqar"] for m in result["matched"]]), key=lambda r: r["work_skipped"])
    if matched:
        series.append(_series("dqar, matched shares (probe-chosen)", matched, {"marker": "*", "linestyle": "--"}))
    peers = _measured(result["peers"]) + _measured(_matched_peers(result))
    for method in sorted({r["method"] for r in peers}):
        series.append(_series(method, [r for r in peers if r["method"] == method], {"marker": "x", "linestyle": "none"}))
    fidelity_panels(series, result["baseline"]["fd"] or 0.0, "attn1 + ff work skipped (%)", "FD to the real test split", path,
                    psnr_line=bars(result)["full_db"])


def _series(label: str, rows: list[dict], style: dict) -> dict:
    return {"label": label, "x": [100 * r["work_skipped"] for r in rows], "psnr": [r["psnr_db"] for r in rows],
            "fd": [r["fd"] for r in rows], "style": style}


def write_forecast(result: dict, out_dir: str | Path) -> Path:
    """Write the plot, the JSON and the FIDELITY.md section; returns the Markdown path."""
    from dqar.io import atomic_write_json
    from dqar.reporting.documents import write_section

    out = Path(out_dir)
    plot_file, raw_file = files(result)
    plot(result, out / plot_file)
    atomic_write_json(out / raw_file, result)
    return write_section(out / "FIDELITY.md", section_name(result), markdown(result))


def summary_lines(result: dict) -> list[str]:
    """The targets' verdicts, one line each (what the command prints)."""
    return [line[2:] for line in _target_lines(targets(result), result)]
