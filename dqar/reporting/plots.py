"""Ablation figures (matplotlib, Agg): speedup-vs-PSNR Pareto plot and reuse heatmaps, from the results JSON."""
from __future__ import annotations

import io
from pathlib import Path

from dqar.io import atomic_write_bytes
from dqar.metrics import pareto_front
from dqar.reporting.findings import PSNR_BOUND_DB, TARGET_SPEEDUP, ci, implausible

PARETO_FILE = "pareto.png"
HEATMAP_FILE = "reuse_heatmap.png"


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write a matplotlib figure as a 110-dpi PNG (tight bounding box), atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(Path(path), buf.getvalue())


def fidelity_panels(series: list[dict], baseline_fd: float, xlabel: str, fd_ylabel: str, path: Path,
                    psnr_line: float | None = None) -> None:
    """Two panels over `xlabel` — PSNR vs no reuse, and FD with the no-reuse FD as a line — one curve per series.

    A series is {"label", "x", "psnr", "fd", "style"} (`style`: matplotlib plot keywords).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for sr in series:
        for ax, ys in zip(axes, (sr["psnr"], sr["fd"])):
            ax.plot(sr["x"], ys, label=sr["label"], **sr["style"])
    if psnr_line is not None:
        axes[0].axhline(psnr_line, color="grey", linestyle=":", linewidth=1)
    axes[1].axhline(baseline_fd, color="grey", linestyle=":", linewidth=1, label="no reuse")
    axes[0].set(xlabel=xlabel, ylabel="PSNR vs no reuse (dB)", title="fidelity to the baseline")
    axes[1].set(xlabel=xlabel, ylabel=fd_ylabel, title="distribution")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # one legend, beside the panels: no point hidden
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _measured(records: list[dict]) -> list[dict]:
    """Configurations with reuse and peer rows, each measured once (copies of identical configurations left out)."""
    return [r for r in records if (r["config"]["reuse"]["enabled"] or r.get("peer")) and r.get("same_as") is None]


def _group(r: dict) -> str:
    return r["sweep"] or ("peers" if r.get("peer") else "main")


def has_pareto(records: list[dict]) -> bool:
    return bool(_measured(records))


def has_heatmap(records: list[dict]) -> bool:
    return any(r.get("reuse") for r in _measured(records))


def pareto(records: list[dict], path: Path) -> None:
    """Speedup (x) vs PSNR against the baseline (y); the Pareto front joined; bound and target drawn."""
    plt = pyplot()
    rows = _measured(records)
    pts = [(r["measurements"]["speedup"], r["fidelity"]["psnr_db"]) for r in rows]
    cis = [ci(r) for r in rows]
    fig, ax = plt.subplots(figsize=(8.5, 5.5), layout="constrained")
    groups = sorted({_group(r) for r in rows}, key=lambda g: (g != "main", g == "peers", g))
    cmap, markers = plt.get_cmap("tab20"), "o^sDvP*Xh<>p"
    for k, g in enumerate(groups):
        sel = [(p, c) for p, c, r in zip(pts, cis, rows) if _group(r) == g]
        ax.scatter([p[0] for p, _ in sel], [p[1] for p, _ in sel], s=55 if g == "main" else 28, color=cmap(k % 20),
                   marker=markers[k % len(markers)], label=g, zorder=3)
        for p, c in sel:  # the interval the report's claims compare
            if c is not None:
                ax.plot(c, [p[1], p[1]], color=cmap(k % 20), lw=1, alpha=0.6, zorder=2)
    flagged = [p for p, r in zip(pts, rows) if implausible(r)]
    if flagged:
        ax.scatter([p[0] for p in flagged], [p[1] for p in flagged], s=140, facecolors="none", edgecolors="tab:red",
                   lw=1.2, zorder=4, label="implausible (above FLOP ceiling)")
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="black", lw=1, zorder=2, label="Pareto front")
    for i in front:
        ax.annotate(rows[i]["name"], pts[i], fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(PSNR_BOUND_DB, color="grey", ls="--", lw=0.8)
    ax.axvline(1.0, color="grey", ls=":", lw=0.8)
    ax.axvline(TARGET_SPEEDUP, color="tab:red", ls="--", lw=0.8)
    ax.set_xlabel("speedup vs baseline (×, ratio of medians; bars: simultaneous 95% intervals)")
    ax.set_ylabel("PSNR vs baseline images (dB, capped at 100)")
    ax.set_title(f"speed vs fidelity — dashed: PSNR {PSNR_BOUND_DB:.0f} dB bound, {TARGET_SPEEDUP}× target")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    xs = [p[0] for p in pts] + [x for c in cis if c for x in c] + [1.0, TARGET_SPEEDUP]
    ax.set_xlim(min(xs) - 0.05, max(xs) + 0.25)  # room for the labels of the right-most points
    ax.grid(alpha=0.3)
    save_png(fig, path)
    plt.close(fig)


def _heatmap_rows(records: list[dict]) -> list[dict]:
    rows = [r for r in _measured(records) if r.get("reuse")]
    main = [r for r in rows if r["role"] == "main"]
    return main or rows[:1]


def reuse_heatmap(records: list[dict], path: Path) -> None:
    """One panel per main configuration: evaluation (rows) × layer (columns), dark = reused."""
    import numpy as np

    plt = pyplot()
    rows = _heatmap_rows(records)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 0.6, 4.6), squeeze=False, layout="constrained")
    for k, (ax, r) in enumerate(zip(axes[0], rows)):
        mask = np.asarray(r["reuse"]["reuse_mask"], dtype=float)  # (E, L)
        ax.imshow(mask, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{r['name']}\nreuse {100 * r['reuse']['reuse_fraction']:.1f}%", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if k == 0:
            ax.set_ylabel("model evaluation")
    fig.suptitle("reuse decisions executed (dark = cached output reused)", fontsize=10)
    save_png(fig, path)
    plt.close(fig)


def write_all(results: dict, out: Path) -> None:
    """Write every figure the current results support."""
    records = results.get("records", [])
    if has_pareto(records):
        pareto(records, Path(out) / PARETO_FILE)
    if has_heatmap(records):
        reuse_heatmap(records, Path(out) / HEATMAP_FILE)
