"""What an ablation report claims, computed from the results: bounds, targets, findings, and cell formatting.

Nothing here measures anything: `findings` derives every claim (fastest, within bound, target
met or missed, recommendation) from the records; `dqar.reporting.report` and
`dqar.reporting.compared` only phrase them. Claims about speed compare intervals, never bare
ratios: a configuration is "faster" than another only when its simultaneous interval's lower end
lies above the other's upper end (dqar.studies.ablation.records.with_simultaneous) by more than the measured
timing noise (the relative range of the baseline's repeats); otherwise the two are not
distinguishable on this machine. With five repeats a bootstrap interval alone is too narrow for that
(its resamples can only reuse the five values), which the noise margin makes up for. A record flagged implausible (its interval above its FLOP
ceiling) is never fastest, best or recommended.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# Fidelity bound for "usable" configurations, and the method's targets.
PSNR_BOUND_DB = 30.0  # paired PSNR against the baseline's images, at least
ACC_DROP_BOUND = 1.0  # class-accuracy drop in percentage points, at most (the drop the accuracy's Wilson interval allows)
TARGET_SPEEDUP = 1.25  # >= 25% faster (the speedup interval's lower end) ...
TARGET_MEMORY = 0.20  # ... or >= 20% less peak memory ...
TARGET_FD_LOSS = 1.0  # ... with <= 1 FD(ID) loss (the ΔFD interval's upper end)
DASH = "—"


# ----- record accessors -------------------------------------------------------------------------
def get(rec: dict, *path: str) -> Any:
    cur: Any = rec
    for key in path:
        if not isinstance(cur, dict) or cur.get(key) is None:
            return None
        cur = cur[key]
    return cur


def speedup(r: dict) -> float:
    return r["measurements"]["speedup"]


def ci(r: dict) -> list[float] | None:
    """The interval claims compare: the simultaneous one where the study computed it, else the record's own."""
    m = r["measurements"]
    return m.get("speedup_sim_ci") or m.get("speedup_ci")


def psnr(r: dict) -> float:
    return r["fidelity"]["psnr_db"]


def is_baseline(r: dict) -> bool:
    return not r["config"]["reuse"]["enabled"] and not r.get("peer")


def is_peer(r: dict) -> bool:
    """A peer method's row (dqar.studies.peers.methods), not a dqar configuration."""
    return bool(r.get("peer"))


def implausible(r: dict) -> bool:
    return bool(get(r, "measurements", "implausible"))


def noise(r: dict) -> float:
    """The measured timing noise of `r`'s block: the relative range of its baseline's repeats (0 when unknown)."""
    return get(r, "measurements", "noise") or 0.0


def faster_than_baseline(r: dict) -> bool:
    """The interval lies above 1 by more than the measured noise."""
    c = ci(r)
    return c is not None and c[0] > 1.0 + noise(r)


def slower_than_baseline(r: dict) -> bool:
    c = ci(r)
    return c is not None and c[1] * (1.0 + noise(r)) < 1.0


def separated(a: dict, b: dict) -> bool:
    """`a` is distinguishably faster than `b`: a's interval lies above b's by more than the larger measured noise."""
    ca, cb = ci(a), ci(b)
    return ca is not None and cb is not None and ca[0] > cb[1] * (1.0 + max(noise(a), noise(b)))


def leaders(rows) -> tuple:
    """The rows not distinguishably slower than the one with the highest speedup (that one first); () for none."""
    rows = [r for r in rows if not implausible(r)]
    if not rows:
        return ()
    top = max(rows, key=speedup)
    return (top, *sorted((r for r in rows if r is not top and not separated(top, r)), key=speedup, reverse=True))


def fastest_of(rows) -> dict | None:
    """The row distinguishably faster than every other plausible row, or None."""
    lead = leaders(rows)
    return lead[0] if len(lead) == 1 else None


def accuracy_drop_allowed(r: dict) -> float | None:
    """The smallest class-accuracy drop (points) the accuracy's Wilson interval allows; the drop itself without one."""
    acc_ci, base = get(r, "fidelity", "class_accuracy_ci"), get(r, "fidelity", "baseline_class_accuracy")
    if acc_ci is not None and base is not None:
        return 100.0 * (base - acc_ci[1])
    return get(r, "fidelity", "accuracy_drop_points")


def within_bound(r: dict) -> bool:
    """PSNR >= 30 dB and, where a classifier exists, no class-accuracy drop above 1 point that its interval rules in."""
    drop = accuracy_drop_allowed(r)
    return psnr(r) >= PSNR_BOUND_DB and (drop is None or drop <= ACC_DROP_BOUND + 1e-9)


def target_quality_ok(r: dict, fd_study: bool = False) -> bool:
    """The target's quality side: ΔFD's interval at most 1 where FD was measured; without a classifier the fidelity bound.

    `fd_study`: the study has a classifier, so a record without FD (too few images) has not shown it.
    """
    fd_ci, fd_delta = get(r, "fidelity", "fd_delta_ci"), get(r, "fidelity", "fd_delta")
    if fd_ci is not None:
        return fd_ci[1] <= TARGET_FD_LOSS
    if fd_delta is not None:
        return fd_delta <= TARGET_FD_LOSS
    return not fd_study and within_bound(r)


def speed_side(r: dict) -> bool:
    """The target's speed side: the speedup interval's lower end >= 1.25, or >= 20% less peak memory."""
    mem, c = get(r, "measurements", "memory_reduction"), ci(r)
    return (c is not None and c[0] >= TARGET_SPEEDUP) or (mem is not None and mem >= TARGET_MEMORY)


def meets_target(r: dict, fd_study: bool = False) -> bool:
    return not implausible(r) and speed_side(r) and target_quality_ok(r, fd_study)


def verified(r: dict, results: dict) -> bool:
    """Whether `r`'s fidelity comes from the study's fidelity run (what a recommendation or the target needs)."""
    need = get(results, "study", "fidelity_samples")
    return need is None or (get(r, "fidelity", "samples") or 0) >= need


# ----- findings -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Findings:
    """Every claim the report makes, computed from the records."""

    candidates: tuple  # configurations with reuse, each measured once
    flagged: tuple  # candidates whose interval lies above their FLOP ceiling
    leaders: tuple  # plausible candidates not distinguishably slower than the highest speedup (it first)
    fastest: dict | None  # the one candidate distinguishably faster than all others, if any
    best_reuse: dict | None
    best_memory: dict | None
    within_leaders: tuple  # the same among candidates within the fidelity bound
    best_within: dict | None  # distinguishably fastest within the bound, if any
    best_within_target_quality: dict | None  # highest speedup with the target's quality side satisfied
    best_memory_target_quality: dict | None
    recommended: dict | None
    recommended_from: tuple  # the front the recommendation was picked from (the most FLOPs skipped of them)
    target_met_by: tuple
    fd_available: bool
    accuracy_available: bool
    comparisons: int  # k: the simultaneous intervals each hold at 1 - 0.05 / k


def argmax(rows, key: Callable[[dict], float | None]) -> dict | None:
    rows = [r for r in rows if key(r) is not None]
    return max(rows, key=key) if rows else None


def recommendation_front(results: dict, cands, require_verified: bool = True) -> tuple:
    """Within-bound plausible candidates distinguishably faster than the baseline and not distinguishable from the
    fastest of them; the one skipping the most FLOPs first (the clock cannot rank them, and the work a configuration
    skips does not depend on the machine's noise), then the most faithful; `require_verified`: only those with the
    study's fidelity run."""
    ok = [r for r in cands if within_bound(r) and not implausible(r) and faster_than_baseline(r)
          and (verified(r, results) or not require_verified)]
    work = lambda r: get(r, "reuse", "flops_skipped_fraction") or 0.0  # noqa: E731
    return tuple(sorted(leaders(ok), key=lambda r: (round(work(r), 6), psnr(r), speedup(r)), reverse=True))


def claim_candidates(results: dict) -> list[dict]:
    """The records a claim could rest on, which need the fidelity run: the main dqar rows, the recommendation's front, and
    the configurations meeting the target's speed side; in that order."""
    records = results.get("records", [])
    cands = [r for r in records if not is_peer(r) and r.get("same_as") is None]
    main = [r for r in cands if r["role"] == "main"]
    reuse = [r for r in cands if not is_baseline(r)]
    fast = sorted((r for r in reuse if speed_side(r) and not implausible(r) and psnr(r) >= PSNR_BOUND_DB), key=speedup, reverse=True)
    out = []
    for r in [*main, *recommendation_front(results, reuse, require_verified=False), *fast]:
        if all(r is not o for o in out):
            out.append(r)
    return out


def findings(results: dict) -> Findings:
    records = results.get("records", [])
    fd_study = bool(get(results, "study", "classifier"))
    cands = tuple(r for r in records if not is_baseline(r) and not is_peer(r) and r.get("same_as") is None)
    plausible = [r for r in cands if not implausible(r)]
    within = [r for r in plausible if within_bound(r)]
    quality = [r for r in plausible if target_quality_ok(r, fd_study)]
    front = recommendation_front(results, cands)
    return Findings(
        candidates=cands,
        flagged=tuple(r for r in cands if implausible(r)),
        leaders=leaders(plausible),
        fastest=fastest_of(plausible),
        best_reuse=argmax(cands, lambda r: get(r, "reuse", "reuse_fraction")),
        best_memory=argmax(cands, lambda r: get(r, "measurements", "memory_reduction")),
        within_leaders=leaders(within),
        best_within=fastest_of(within),
        best_within_target_quality=argmax(quality, speedup),
        best_memory_target_quality=argmax(quality, lambda r: get(r, "measurements", "memory_reduction")),
        recommended=front[0] if front else None,
        recommended_from=front,
        target_met_by=tuple(sorted((r for r in cands if meets_target(r, fd_study) and verified(r, results)), key=speedup, reverse=True)),
        fd_available=any(get(r, "fidelity", "fd_delta") is not None for r in cands),
        accuracy_available=any(get(r, "fidelity", "accuracy_drop_points") is not None for r in cands),
        comparisons=max([get(r, "measurements", "comparisons") or 0 for r in records] + [0]),
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


def f_ci(c: list[float] | None, digits: int = 2, scale: float = 1.0) -> str:
    """An interval as "[low, high]"."""
    return DASH if c is None else f"[{_r(scale * c[0], digits):.{digits}f}, {_r(scale * c[1], digits):.{digits}f}]"


def f_x_ci(r: dict) -> str:
    """"1.10× [1.05, 1.15]": a speedup with the interval claims compare."""
    return f"{f_x(speedup(r))} {f_ci(ci(r))}" if ci(r) else f_x(speedup(r))


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[dict], str]
    needs: str = ""  # "ssim" | "accuracy" | "fd": shown only when some record has it


COLUMNS = (
    Column("Time/Sample", lambda r: f_time(r["measurements"]["time_per_sample_s"])),
    Column("Speedup", lambda r: f_x(speedup(r))),
    Column("95% CI", lambda r: f_ci(ci(r))),
    Column("Noise", lambda r: f_pct(get(r, "measurements", "noise"))),
    Column("FLOP ceiling", lambda r: f_x(get(r, "measurements", "flops_ceiling"))),
    Column("Executor", lambda r: get(r, "measurements", "executor") or DASH),
    Column("Reuse %", lambda r: f_pct(get(r, "reuse", "reuse_fraction"))),
    Column("Attn skipped", lambda r: f_pct(get(r, "reuse", "attention_skipped_fraction")), "cfg"),
    Column("FLOPs skipped", lambda r: f_pct(get(r, "reuse", "flops_skipped_fraction"))),
    Column("Cache (MB)", lambda r: f_num(get(r, "reuse", "cache_mb_peak"), 2)),
    Column("Peak mem (MB)", lambda r: f_mb(r["measurements"]["peak_memory_bytes"])),
    Column("Mem saved", lambda r: f_pct(r["measurements"]["memory_reduction"])),
    Column("Host syncs", lambda r: DASH if get(r, "reuse", "host_syncs") is None else str(r["reuse"]["host_syncs"])),
    Column("PSNR (dB)", lambda r: f_num(psnr(r), 2)),
    Column("SSIM", lambda r: f_num(get(r, "fidelity", "ssim"), 4), "ssim"),
    Column("Max abs", lambda r: f_num(r["fidelity"]["max_abs"], 4)),
    Column("Images", lambda r: str(get(r, "fidelity", "samples") or DASH)),
    Column("Class acc", lambda r: f_pct(get(r, "fidelity", "class_accuracy")), "accuracy"),
    Column("Acc 95% CI", lambda r: f_ci(get(r, "fidelity", "class_accuracy_ci"), 1, 100.0), "accuracy"),
    Column("FD", lambda r: f_num(get(r, "fidelity", "fd"), 2), "fd"),
    Column("ΔFD", lambda r: f_signed(get(r, "fidelity", "fd_delta")), "fd"),
    Column("ΔFD 95% CI", lambda r: f_ci(get(r, "fidelity", "fd_delta_ci")), "fd"),
)


def _columns(records: list[dict]) -> list[Column]:
    have = {
        "": True,
        "ssim": any(get(r, "fidelity", "ssim") is not None for r in records),
        "accuracy": any(get(r, "fidelity", "class_accuracy") is not None for r in records),
        "fd": any(get(r, "fidelity", "fd") is not None for r in records),
        "cfg": any(get(r, "reuse", "cfg_shared") for r in records),
    }
    return [c for c in COLUMNS if have[c.needs]]


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def table(records: list[dict], lead: list[tuple[str, Callable[[dict], str]]], notes: Callable[[dict], str], all_records: list[dict]) -> list[str]:
    """A markdown table: lead columns, the metric columns, a Notes column."""
    cols = _columns(all_records)
    head = [h for h, _ in lead] + [c.header for c in cols] + ["Notes"]
    lines = [md_row(head), md_row(["---"] * len(head))]
    for r in records:
        lines.append(md_row([fn(r) for _, fn in lead] + [c.cell(r) for c in cols] + [notes(r)]))
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
    what = "whole-block reuse" if c["granularity"] == "block" else f"reuse of {'K/V' if c['target'] == 'kv' else 'attention output'}"
    if c.get("forecast_order"):
        kind = c.get("forecast_kind", "taylor")
        what += (f" with an order-{c['forecast_order']} {'' if kind == 'taylor' else kind + ' '}forecast over the "
                 f"{c.get('forecast_axis', 'evaluation')} axis")
    parts = [what, where,
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


def label(r: dict) -> str:
    if r["varied"]:
        return ", ".join(f"{k.rpartition('.')[2]}={cell_value(v)}" for k, v in r["varied"].items())
    return r["name"]


def cell_value(v: Any) -> str:
    return str(list(v)) if isinstance(v, (list, tuple)) else str(v)


def notes_for(f: Findings, records: list[dict]) -> Callable[[dict], str]:
    def notes(r: dict) -> str:
        out = []
        if is_baseline(r):
            out.append("reference baseline")
        if r.get("same_as"):
            out.append(f"same configuration as {r['same_as']}")
        src = r.get("same_as") or r["name"]
        if f.recommended is not None and src == f.recommended["name"]:
            out.append("recommended")
        if f.fastest is not None and src == f.fastest["name"]:
            out.append("fastest")
        if implausible(r):
            out.append(f"implausible: interval above its FLOP ceiling {f_x(r['measurements']['flops_ceiling'])}")
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
    bits = [f_x_ci(r), f"reuse {f_pct(get(r, 'reuse', 'reuse_fraction'))}", f"PSNR {f_num(psnr(r), 2)} dB"]
    drop = get(r, "fidelity", "accuracy_drop_points")
    if drop is not None:
        bits.append(f"class-accuracy drop {_r(drop, 1):.1f} points" if _r(drop, 1) >= 0 else f"class accuracy up {-drop:.1f} points")
    fd_delta = get(r, "fidelity", "fd_delta")
    if fd_delta is not None:
        bits.append(f"ΔFD {f_signed(fd_delta)}")
    return ", ".join(bits)


def bound_text(f: Findings) -> str:
    acc = f" and class-accuracy drop ≤ {ACC_DROP_BOUND:g} point" if f.accuracy_available else ""
    return f"PSNR ≥ {PSNR_BOUND_DB:g} dB{acc}"


def sample_text(s: dict, res: dict | None = None) -> str:
    """The sampling settings in words; a flow model's (`res`'s environment family) sampler is flow matching, whatever `sampler` says."""
    flow = res is not None and res.get("environment", {}).get("family", "dit") != "dit"
    sampler = "flow matching" if flow else s["sampler"].upper()
    cfg = f"true CFG {s['cfg']:g} (two forwards)" if flow and s["cfg"] > 1 else f"CFG {s['cfg']:g}"
    return f"{sampler}, {s['steps']} steps, {cfg}, seed {s['seed']}"
