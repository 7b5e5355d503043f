"""The "Compared to" section: peer methods (dqar.studies.peers.methods) next to dqar's presets, from an ablation's results.

Rows: dqar's main presets, the study's fastest dqar configuration within the fidelity bound (when it
is not a main preset), and every peer row; peers that could not run are listed with their reason.
Every conclusion is computed from the rows (`comparisons`); `section` only phrases them. The same
section is the report's and, through `dqar compared`, docs/COMPARED.md's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dqar.reporting import findings as R

SECTION = "Compared to"


# ----- rows -----------------------------------------------------------------------------------------
def computed(r: dict) -> tuple[float | None, float | None]:
    """(attn1, ff) forwards computed as a share of the baseline's.

    Peers: counted by forward hooks. dqar: from the engine's executed reuse mask (attention-output reuse
    skips attn1, whole-block reuse also ff); None for K/V reuse, which still runs the attention's query path.
    """
    if R.is_peer(r):
        c = r["peer"]["computed"]
        return c.get("attn1"), c.get("ff")
    reuse, cfg = r.get("reuse"), r["config"]["reuse"]
    if reuse is None or cfg["target"] != "attention":
        return None, None
    attn = 1.0 - reuse["attention_skipped_fraction"]
    return attn, (1.0 - reuse["reuse_fraction"]) if cfg["granularity"] == "block" else 1.0


def rows(results: dict) -> list[dict]:
    """The compared rows, dqar first (main presets, then the study's best within the bound), then peers."""
    records = results.get("records", [])
    dqar = [r for r in records if r["role"] == "main" and not R.is_baseline(r) and r.get("same_as") is None]
    best = R.findings(results).recommended
    if best is not None and best["name"] not in {r["name"] for r in dqar}:
        dqar.append(best)
    return dqar + [r for r in records if R.is_peer(r)]


def _package(r: dict, version: str) -> str:
    return r["peer"]["package"] if R.is_peer(r) else f"dqar {version}"


def _settings(r: dict) -> str:
    if not R.is_peer(r):
        return R.describe(r["config"], r.get("calibration"))
    p = r["peer"]
    given = ", ".join(f"{k}={R.cell_value(v)}" for k, v in p["settings"].items() if k != "mag_ratios")
    return f"{p['title']}: {given}" + ("; mag_ratios calibrated" if p.get("info", {}).get("calibrated") else "")


def _pct(v: float | None) -> str:
    return R.f_pct(v, 1)


COLUMNS: tuple[tuple[str, Callable[[dict], str], str], ...] = (
    ("Speedup", lambda r: R.f_x(R.speedup(r)), ""),
    ("95% CI", lambda r: R.f_ci(R.ci(r)), ""),
    ("Executor", lambda r: R.get(r, "measurements", "executor") or R.DASH, ""),
    ("Attn computed", lambda r: _pct(computed(r)[0]), ""),
    ("MLP computed", lambda r: _pct(computed(r)[1]), ""),
    ("PSNR (dB)", lambda r: R.f_num(R.psnr(r), 2), ""),
    ("SSIM", lambda r: R.f_num(R.get(r, "fidelity", "ssim"), 4), "ssim"),
    ("Class acc", lambda r: R.f_pct(R.get(r, "fidelity", "class_accuracy")), "accuracy"),
    ("FD", lambda r: R.f_num(R.get(r, "fidelity", "fd"), 2), "fd"),
    ("ΔFD", lambda r: R.f_signed(R.get(r, "fidelity", "fd_delta")), "fd"),
)


def _notes(r: dict, best_name: str | None, main_names: set[str]) -> str:
    out = []
    if not R.is_peer(r) and r["name"] not in main_names and r["name"] == best_name:
        out.append("the study's recommended dqar configuration")
    if R.implausible(r):
        out.append("implausible: interval above its FLOP ceiling")
    if not R.within_bound(r):
        out.append("outside fidelity bound")
    if R.is_peer(r) and r["peer"].get("copy_identical") is False:
        out.append("its model copy's baseline differed from the reference")
    if not r["measurements"].get("deterministic", True):
        out.append("repeats differed")
    return "; ".join(out)


def table(results: dict, rs: list[dict]) -> list[str]:
    """The markdown table of the compared rows."""
    have = {"": True, "ssim": any(R.get(r, "fidelity", "ssim") is not None for r in rs),
            "accuracy": any(R.get(r, "fidelity", "class_accuracy") is not None for r in rs),
            "fd": any(R.get(r, "fidelity", "fd") is not None for r in rs)}
    cols = [c for c in COLUMNS if have[c[2]]]
    head = ["Method", "Package", "Settings"] + [c[0] for c in cols] + ["Notes"]
    best = R.findings(results).recommended
    main = {r["name"] for r in results.get("records", []) if r["role"] == "main"}
    version = results["environment"]["dqar"]
    lines = [R.md_row(head), R.md_row(["---"] * len(head))]
    for r in rs:
        lines.append(R.md_row([f"`{r['name']}`", _package(r, version), _settings(r)] + [c[1](r) for c in cols]
                            + [_notes(r, best["name"] if best else None, main)]))
    return lines


# ----- conclusions ----------------------------------------------------------------------------------
def _brief(r: dict) -> str:
    return f"`{r['name']}` ({R.f_x_ci(r)}, PSNR {R.f_num(R.psnr(r), 2)} dB)"


def _who(r: dict) -> str:
    return "a peer" if R.is_peer(r) else "dqar"


def _work(r: dict) -> float | None:
    a, f = computed(r)
    return None if a is None or f is None else (a + f) / 2


def _fastest(rows: list[dict], what: str) -> str:
    """The fastest of `rows` when its interval separates from the others', else those not distinguishable from it."""
    lead = R.leaders(rows)
    if not lead:
        return f"{what}: no plausible row."
    if len(lead) == 1:
        return f"{what}: {_brief(lead[0])}, {_who(lead[0])}."
    return f"{what}: not distinguishable on this machine — " + ", ".join(f"{_brief(r)} ({_who(r)})" for r in lead) + "."


def comparisons(results: dict, rs: list[dict]) -> list[str]:
    """Findings computed from the compared rows: each sentence states a comparison of their numbers and intervals."""
    f = R.findings(results)
    peers = [r for r in rs if R.is_peer(r)]
    dqar = [r for r in rs if not R.is_peer(r)]
    out = []
    if not rs:
        return out
    ok = [r for r in rs if R.within_bound(r)]
    out.append(_fastest(ok, f"Fastest within the fidelity bound ({R.bound_text(f)})") if ok
               else f"No compared method stayed within the fidelity bound ({R.bound_text(f)}).")
    out.append(_fastest(rs, "Fastest overall"))
    quick = [r for r in rs if R.faster_than_baseline(r) and not R.implausible(r)]
    if quick:
        fine = max(quick, key=lambda r: (R.psnr(r), R.speedup(r)))
        out.append(f"Best PSNR among the methods distinguishably faster than the baseline: {_brief(fine)}.")
    else:
        out.append("No compared method was distinguishably faster than the baseline on this machine.")
    for p in peers if dqar else []:
        near = min(dqar, key=lambda r: (abs(R.speedup(r) - R.speedup(p)), -R.psnr(r)))
        diff = R.psnr(near) - R.psnr(p)
        who = f"dqar's `{near['name']}` by {R.f_num(abs(diff), 2)} dB" if diff > 0 else (
            f"the peer by {R.f_num(abs(diff), 2)} dB" if diff < 0 else "neither")
        speed = (f"`{near['name']}` is faster" if R.separated(near, p) else "the peer is faster" if R.separated(p, near)
                 else "their speeds are not distinguishable on this machine")
        out.append(f"{_brief(p)} against the dqar row nearest in speed, {_brief(near)}: {speed}; higher PSNR: {who}.")
    out.append("Pareto-optimal in (speedup, PSNR) on the point estimates among these rows: "
               + ", ".join(f"`{n}`" for n in _front(rs)) + ".")
    work = [r for r in rs if _work(r) is not None]
    if work:
        least = min(work, key=_work)
        a, m = computed(least)
        out.append(f"Fewest computed attn1 + ff forwards: {_brief(least)}, attention {R.f_pct(a)} and MLP {R.f_pct(m)} "
                   f"of the baseline's.")
    return out


def _baseline_text(results: dict) -> str:
    """The reference the paired and classifier columns are relative to."""
    base = next((r for r in results.get("records", []) if r["role"] == "main" and R.is_baseline(r)), None)
    if base is None:
        return ""
    bits = [f"{R.f_time(base['measurements']['time_per_sample_s'])} per sample"]
    if R.get(base, "fidelity", "class_accuracy") is not None:
        bits.append(f"class accuracy {R.f_pct(base['fidelity']['class_accuracy'])}")
    if R.get(base, "fidelity", "fd") is not None:
        bits.append(f"FD {R.f_num(base['fidelity']['fd'], 2)}")
    return f" The baseline (`{base['name']}`, no reuse): " + ", ".join(bits) + "; PSNR/SSIM are paired against its images."


def _front(rs: list[dict]) -> list[str]:
    """Names of the rows no other row beats in both speedup and PSNR, slowest first."""
    from dqar.metrics import pareto_front

    return [rs[i]["name"] for i in pareto_front([(R.speedup(r), R.psnr(r)) for r in rs])]


# ----- the section ----------------------------------------------------------------------------------
def section(results: dict, level: int = 2, details: bool = True) -> list[str]:
    """The section's markdown lines (empty when the study has no peers).

    `details` (the report): every metric column of the peer rows and links to each row's image grid.
    """
    rs = rows(results)
    not_run = [n for n in results.get("not_run", []) if not n.get("refused")]
    if not any(R.is_peer(r) for r in rs) and not not_run:
        return []
    s = results["study"]["sample"]
    h = "#" * level
    lines = [f"{h} {SECTION}", "",
             f"Peer caching methods run through their own packages on the same model, labels, seeds and sampler "
             f"({R.sample_text(s, results)}), each on a fresh copy of the transformer with its state reset before every generation, "
             f"timed in one block with the baseline among them (the same rounds). **Attn / MLP computed**: `attn1` / `ff` "
             f"forwards that ran, as a share of the baseline's — counted with forward hooks for peers, read from the "
             f"executed reuse mask for dqar." + _baseline_text(results), ""]
    lines += table(results, rs)
    if details:
        lines += ["", "Grids: " + " · ".join(f"[{r['name']}](images/{r['slug']}/grid.png)" for r in rs)]
    if not_run:
        lines += ["", "Not run:"] + [f"- `{n['name']}`: {n['reason']}" for n in not_run]
    found = comparisons(results, rs)
    if found:
        lines += ["", "**Comparison** (computed from the table):"] + [f"- {t}" for t in found]
    peers = [r for r in rs if R.is_peer(r)]
    if peers and details:
        records = results["records"]
        lead = [("Configuration", lambda r: f"`{r['name']}`"), ("Baseline", lambda r: f"`{r['baseline']}`")]
        lines += ["", "Every measurement of the peer rows:", ""] + R.table(peers, lead, R.notes_for(R.findings(results), records), records)
    if peers:
        lines += ["", "How each peer was applied: " + "; ".join(f"`{r['name']}`: {r['peer']['implementation']}" for r in peers) + "."]
        cal = [r for r in peers if r["peer"].get("calibration_seeds")]
        for r in cal:
            seeds = r["peer"]["calibration_seeds"]
            lines.append(f"`{r['name']}` calibrated on seeds {seeds[0]}–{seeds[1]}: mag_ratios "
                         + ", ".join(f"{v:.4f}" for v in r["peer"]["info"]["mag_ratios"]) + ".")
    return lines + [""]


def document(results: dict, note: str = "") -> str:
    """The generated part of docs/COMPARED.md: provenance, then the section (one level down)."""
    env = results["environment"]
    cmd = results.get("command") or "dqar ablate"
    secs = results.get("run_seconds")
    machine = f"{env['device']} ({env['device_name']}), {env['cpu_count']} CPU cores, {env['torch_threads']} torch thread(s)"
    lines = [f"## Measured: {env['model']} model", "",
             f"Generated by `dqar compared` from the results of `{cmd}` (dqar {env['dqar']}, torch {env['torch']}, "
             f"diffusers {env['diffusers']}), finished {results.get('updated', '')}"
             + (f" after {secs / 60:.1f} min of run time" if secs else "") + f"; status {results.get('status')}.", "",
             f"Machine: {machine}" + (f" — {note}" if note else "") + ". Speedups are ratios of medians against "
             "the baseline's runs timed in the same rounds, with simultaneous 95% bootstrap intervals; absolute times are not "
             "comparable across machines.", ""]
    return "\n".join(lines + section(results, level=3, details=False))


def write_document(results_dir: str | Path, doc: str | Path, note: str = "") -> Path:
    """Replace the generated section of `doc` with the one for the results in `results_dir`."""
    from dqar.errors import DqarError
    from dqar.io import atomic_write_text
    from dqar.reporting.documents import load_results, write_section

    res = load_results(Path(results_dir))
    if res is None:
        raise DqarError(f"no ablation results in {results_dir}", "run dqar ablate first, or pass its --out folder")
    if not any(R.is_peer(r) for r in res["records"]) and not res.get("not_run"):
        raise DqarError(f"the study in {results_dir} has no peer rows", "run dqar ablate with a grid that has [[peer]] tables")
    body = document(res, note)
    doc = Path(doc)
    if not doc.is_file():
        atomic_write_text(doc, "# Compared to\n")
    return write_section(doc, body.splitlines()[0][3:], body)
