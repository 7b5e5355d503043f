"""What an ablation report claims, computed from the results: bounds, targets, findings, and cell formatting.

Nothing here measures anything: `findings` derives every claim (fastest, within bound, target
met or missed, recommendation) from the records; `dqar.reporting.report` and
`dqar.reporting.compared` only phrase them.
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
def get(rec: dict, *path: str) -> Any:
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
    """A peer method's row (dqar.studies.peers), not a dqar configuration."""
    return bool(r.get("peer"))


def within_bound(r: dict) -> bool:
    """PSNR >= 30 dB and, where a classifier exists, class-accuracy drop <= 1 point."""
    drop = get(r, "fidelity", "accuracy_drop_points")
    return psnr(r) >= PSNR_BOUND_DB and (drop is None or drop <= ACC_DROP_BOUND + 1e-9)


def target_quality_ok(r: dict) -> bool:
    """The target's quality side: FD loss <= 1 where FD exists, else the PSNR/accuracy bound."""
    fd_delta = get(r, "fidelity", "fd_delta")
    return fd_delta <= TARGET_FD_LOSS if fd_delta is not None else within_bound(r)


def meets_target(r: dict) -> bool:
    mem = get(r, "measurements", "memory_reduction")
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


def argmax(rows, key: Callable[[dict], float | None]) -> dict | None:
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
    best_within = argmax(within, speedup)
    return Findings(
        candidates=cands,
        best_speedup=argmax(cands, speedup),
        best_reuse=argmax(cands, lambda r: get(r, "reuse", "reuse_fraction")),
        best_memory=argmax(cands, lambda r: get(r, "measurements", "memory_reduction")),
        best_within=best_within,
        best_within_target_quality=argmax(quality, speedup),
        best_memory_target_quality=argmax(quality, lambda r: get(r, "measurements", "memory_reduction")),
        recommended=best_within if best_within is not None and speedup(best_within) > 1.0 else None,
        target_met_by=tuple(sorted((r for r in cands if meets_target(r)), key=speedup, reverse=True)),
        fd_available=any(get(r, "fidelity", "fd_delta") is not None for r in cands),
        accuracy_available=any(get(r, "fidelity", "accuracy_drop_points") is not None for r in cands),
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
    Column("Class acc", lambda r: f_pct(get(r, "fidelity", "class_accuracy")), "accuracy"),
    Column("FD", lambda r: f_num(get(r, "fidelity", "fd"), 2), "fd"),
    Column("ΔFD", lambda r: f_signed(get(r, "fidelity", "fd_delta")), "fd"),
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
    bits = [f"{f_x(speedup(r))}", f"reuse {f_pct(get(r, 'reuse', 'reuse_fraction'))}", f"PSNR {f_num(psnr(r), 2)} dB"]
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


def sample_text(s: dict) -> str:
    return f"{s['sampler'].upper()}, {s['steps']} steps, CFG {s['cfg']:g}, seed {s['seed']}"
