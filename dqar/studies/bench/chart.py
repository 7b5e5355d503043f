"""`dqar bench` as a picture: per batch size, each timed row's speed against `stock_best` (or stock eager where no stock
compiled row ran), with its 95% interval; stock, dqar and peer rows in their own colours (grey, blue, red), and each
dqar row's FLOP bound as a black tick."""
from __future__ import annotations

from pathlib import Path

from dqar.reporting.plots import pyplot, save_png

CHART_FILE = "bench.png"
COLOURS = {"stock": "#7f7f7f", "dqar": "#1f77b4", "peer": "#d62728"}


def _kind(case: str) -> str:
    return "stock" if case.startswith("stock") else "peer" if case.startswith("peer_") else "dqar"


def _against(result: dict) -> tuple[str, str]:
    """The ratio field the chart plots and its axis label: stock_best where it was timed, else stock eager."""
    if any(r.get("vs_stock_best") is not None for r in result["rows"]):
        return "vs_stock_best", "speed vs stock_best (the faster stock torch.compile row)"
    return "vs_stock_eager", "speed vs stock eager"


def _panel(ax, rows: list[dict], key: str) -> None:
    """One batch size: a bar per row with its interval; a dqar row's FLOP bound (no reuse's ratio times the most its
    skipped FLOPs allow) as a black tick, where the run has a no-reuse row of the same executor."""
    ys = list(range(len(rows)))
    ratio = {r["case"]: r[key] for r in rows}
    ci = [r.get(f"{key}_ci") or [r[key], r[key]] for r in rows]
    ax.barh(ys, [r[key] for r in rows], xerr=[[r[key] - c[0] for r, c in zip(rows, ci)], [c[1] - r[key] for r, c in zip(rows, ci)]],
            color=[COLOURS[_kind(r["case"])] for r in rows], alpha=0.85, capsize=3)
    for y, r, c in zip(ys, rows, ci):
        skipped = r.get("flops_skipped_fraction")
        note = f"  ({skipped:.0%} of FLOPs skipped)" if skipped else ""
        ax.text(c[1], y, f"  {r[key]:.2f}×{note}", va="center", fontsize=8)
        base = ratio.get("noreuse_" + r["case"].rsplit("_", 1)[-1])
        if skipped and base and r.get("speedup_bound"):
            ax.plot([base * r["speedup_bound"]], [y], marker="|", markersize=14, color="black")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlim(0, 1.3 * max([c[1] for c in ci] + [1.0] + [p for line in ax.get_lines() for p in line.get_xdata()]))
    ax.set_yticks(ys, [r["case"] for r in rows], fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def _legend(fig) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=c, alpha=0.85, label=k) for k, c in COLOURS.items()]
    handles.append(Line2D([], [], marker="|", markersize=12, color="black", linestyle="", label="FLOP bound of a dqar row"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.04))


def render_chart(result: dict, path: Path) -> bool:
    """Write the chart of `result`'s timed rows to `path`; False (nothing written) when no row has a ratio yet."""
    key, label = _against(result)
    batches = sorted({r["batch"] for r in result["rows"] if r.get(key) is not None})
    if not batches:
        return False
    plt = pyplot()
    rows_of = {b: [r for r in result["rows"] if r["batch"] == b and r.get(key) is not None] for b in batches}
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 0.42 * max(map(len, rows_of.values())) + 1.6),
                             squeeze=False)
    for ax, b in zip(axes[0], batches):
        _panel(ax, rows_of[b][::-1], key)  # first row on top
        ax.set(xlabel=label, title=f"{result['model']} · {result['device']} · batch {b}")
    fig.tight_layout()
    _legend(fig)
    save_png(fig, path)
    plt.close(fig)
    return True
