"""The report's sentences: each phrases a finding computed from the records (dqar.reporting.findings).

Speed is phrased from intervals only: "faster" / "slower" when an interval excludes the other
side, "fastest" when one interval lies above all others, else "not distinguishable on this machine".
"""
from __future__ import annotations

from dqar.reporting.findings import (TARGET_FD_LOSS, TARGET_MEMORY, TARGET_SPEEDUP, Findings, _r, _summary, bound_text, ci,
                                     describe, f_ci, f_num, f_pct, f_x, f_x_ci, faster_than_baseline, get, implausible, is_baseline,
                                     label, leaders, psnr, slower_than_baseline, speedup, within_bound)

LISTED = 4  # names listed in a "not distinguishable" clause before "and n more"


def target_text(f: Findings) -> str:
    quality = (f"the upper end of ΔFD's interval ≤ {TARGET_FD_LOSS:g}" if f.fd_available
               else f"{bound_text(f)} (no FD for this model)")
    return (f"the lower end of the speedup interval ≥ {TARGET_SPEEDUP:g}× or ≥ {100 * TARGET_MEMORY:.0f}% less peak memory, "
            f"with {quality}")


def target_verdict(f: Findings) -> str:
    """One sentence: met (by whom, with which numbers) or missed (by how much)."""
    if f.target_met_by:
        r = f.target_met_by[0]
        mem = r["measurements"].get("memory_reduction")
        mem_text = f", peak-memory saving {f_pct(mem)}" if mem is not None else ""
        return (f"✅ **Target met** ({target_text(f)}) by {len(f.target_met_by)} configuration(s); "
                f"highest speedup of them: `{r['name']}` ({_summary(r)}{mem_text}).")
    if not f.candidates:
        return "No configuration with reuse has been measured yet, so the target is not evaluated."
    fast, lean = f.best_within_target_quality, f.best_memory_target_quality
    parts = []
    if fast is not None:
        low = ci(fast)[0] if ci(fast) else None
        parts.append(f"the highest speedup meeting the quality side is `{fast['name']}` at {f_x(speedup(fast))}, "
                     f"its interval's lower end {f_x(low)} (needs ≥ {TARGET_SPEEDUP:g}×)")
    lean_mem = get(lean, "measurements", "memory_reduction") if lean else None
    if lean_mem is not None:
        parts.append(memory_text(lean, "meeting the quality side"))
    if fast is None:
        parts.append("no configuration has shown the quality side")
    return f"❌ **Target missed** ({target_text(f)}): " + "; ".join(parts) + "."


def memory_text(r: dict, among: str) -> str:
    """The best peak-memory saving, phrased truthfully when every configuration used more memory."""
    mem = r["measurements"]["memory_reduction"]
    if _r(100 * mem, 1) > 0:
        return f"the largest peak-memory saving {among} is {f_pct(mem)} by `{r['name']}` (needs ≥ {100 * TARGET_MEMORY:.0f}%)"
    return (f"no configuration {among} used less peak memory than the baseline "
            f"(best: {f_pct(mem)} saved by `{r['name']}`; needs ≥ {100 * TARGET_MEMORY:.0f}%)")


def versus_baseline(r: dict) -> str:
    """'faster than', 'slower than' or 'not distinguishable from' the baseline, from the interval."""
    if implausible(r):
        return "flagged implausible (its interval lies above its FLOP ceiling)"
    if faster_than_baseline(r):
        return "faster than the baseline"
    if slower_than_baseline(r):
        return "slower than the baseline"
    return "not distinguishable from the baseline on this machine"


def names(rows, limit: int = LISTED) -> str:
    shown = ", ".join(f"`{r['name']}` ({f_x(speedup(r))})" for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def statistics_sentence(f: Findings) -> str | None:
    if not f.comparisons:
        return None
    return (f"Every speedup carries an interval; claims compare simultaneous 95% intervals over the study's "
            f"{f.comparisons} speedups (each at {100 * (1 - 0.05 / f.comparisons):.2f}%), and two configurations whose "
            f"intervals are not apart by more than the measured noise (the Noise column) are not distinguishable on this machine.")


def flagged_sentence(f: Findings) -> str | None:
    if not f.flagged:
        return None
    return ("Flagged implausible (speedup interval above 1 / (1 − FLOPs skipped) by more than the timing noise; never "
            "named fastest or recommended): " + ", ".join(
                f"`{r['name']}` ({f_x_ci(r)}, ceiling {f_x(r['measurements']['flops_ceiling'])})" for r in f.flagged) + ".")


def recommendation(f: Findings) -> list[str]:
    out = []
    front = f.recommended_from
    if f.recommended is not None:
        r = f.recommended
        why = ("of the configurations within the fidelity bound that are faster than the baseline, the one distinguishably "
               "faster than the others (or the only one)" if len(front) == 1 else
               f"of the {len(front)} configurations within the fidelity bound that are faster than the baseline and not "
               f"distinguishable from the fastest of them ({names(front)}), the one that skips the most FLOPs "
               f"({f_pct(get(r, 'reuse', 'flops_skipped_fraction'))}; the clock cannot rank them, the work skipped does "
               f"not depend on it)")
        out.append(f"Use `{r['name']}` ({describe(r['config'], r.get('calibration'))}): {why} ({bound_text(f)}): {_summary(r)}.")
    elif f.within_leaders:
        out.append(f"No configuration within the fidelity bound ({bound_text(f)}) was distinguishably faster than the baseline "
                   f"on this machine (highest: `{f.within_leaders[0]['name']}` at {f_x_ci(f.within_leaders[0])}); "
                   "keep reuse off for speed on this model and device.")
    elif f.candidates:
        out.append(f"No configuration stayed within the fidelity bound ({bound_text(f)}); keep reuse off on this model.")
    b = f.fastest
    if b is not None and (f.recommended is None or b["name"] != f.recommended["name"]):
        side = "within" if within_bound(b) else "outside"
        out.append(f"`{b['name']}` is the fastest overall ({_summary(b)}), {side} the fidelity bound"
                   + (" — validate its images before using it." if side == "outside" else "."))
    elif b is None and len(f.leaders) > 1:
        out.append(f"The fastest configurations are not distinguishable on this machine: {names(f.leaders)}.")
    return out


def sweep_picks(records: list[dict]) -> list[str]:
    """Per sweep: the fastest value within the fidelity bound, when one is distinguishable."""
    out = []
    for name, rows in sweeps(records).items():
        ok = [r for r in rows if within_bound(r) and not implausible(r)]
        if not ok:
            out.append(f"{name}: no plausible value stays within the fidelity bound (best PSNR {f_num(max(map(psnr, rows)), 2)} dB).")
            continue
        lead = leaders(ok)
        if len(ok) == 1:
            out.append(f"{name}: `{label(ok[0])}` is the only value within the fidelity bound ({f_x_ci(ok[0])}, "
                       f"PSNR {f_num(psnr(ok[0]), 2)} dB).")
        elif len(lead) == 1:
            out.append(f"{name}: `{label(lead[0])}` is the fastest value within the fidelity bound ({f_x_ci(lead[0])}, "
                       f"PSNR {f_num(psnr(lead[0]), 2)} dB).")
        else:
            fine = max(lead, key=lambda r: (psnr(r), speedup(r)))
            out.append(f"{name}: the values within the fidelity bound are not distinguishable in speed on this machine "
                       f"({', '.join(f'`{label(r)}`' for r in lead[:LISTED])}{' …' if len(lead) > LISTED else ''}); "
                       f"the most faithful of them is `{label(fine)}` (PSNR {f_num(psnr(fine), 2)} dB).")
    return out


def sweeps(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        if r["role"] == "sweep":
            out.setdefault(r["sweep"], []).append(r)
    return out


def main_findings(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        if is_baseline(r):
            continue
        flops, ceiling = get(r, "reuse", "flops_skipped_fraction"), get(r, "measurements", "flops_ceiling")
        line = f"`{r['name']}` ({get(r, 'measurements', 'executor') or 'patch'}): {_summary(r)}; {versus_baseline(r)}"
        if flops is not None:
            line += f"; it skipped {f_pct(flops)} of the FLOPs (ceiling {f_x(ceiling)})"
        eager = get(r, "measurements", "speedup_vs_eager")
        if eager is not None:
            line += (f"; against the eager baseline {f_x(eager)} "
                     f"{f_ci(get(r, 'measurements', 'speedup_vs_eager_ci'))}")
        out.append(line + ".")
    return out


def _same_outcome(rows: list[dict]) -> bool:
    key = lambda r: (str(get(r, "reuse", "reuse_mask")), psnr(r), r["fidelity"]["max_abs"])  # noqa: E731
    return len(rows) > 1 and len({key(r) for r in rows}) == 1


def sweep_findings(name: str, rows: list[dict]) -> str:
    lead = leaders(rows)
    fine = max(rows, key=lambda r: (psnr(r), speedup(r)))  # ties in PSNR go to the faster value
    ok = sum(within_bound(r) for r in rows)
    if not lead:
        speed = "every value is flagged implausible"
    elif len(lead) == 1:
        speed = f"fastest `{label(lead[0])}` ({f_x_ci(lead[0])}, PSNR {f_num(psnr(lead[0]), 2)} dB)"
    else:
        speed = (f"the fastest values are not distinguishable on this machine "
                 f"({', '.join(f'`{label(r)}` {f_x(speedup(r))}' for r in lead[:LISTED])}{' …' if len(lead) > LISTED else ''})")
    text = (f"**{name}**: {speed}; most faithful `{label(fine)}` (PSNR {f_num(psnr(fine), 2)} dB, {f_x(speedup(fine))}); "
            f"across values speedup {f_x(min(map(speedup, rows)))}–{f_x(max(map(speedup, rows)))}, "
            f"PSNR {f_num(min(map(psnr, rows)), 2)}–{f_num(max(map(psnr, rows)), 2)} dB; "
            f"{ok} of {len(rows)} within the fidelity bound.")
    if _same_outcome(rows):
        text += " All values gave the same reuse decisions and the same fidelity numbers: this knob had no effect here."
    return text
