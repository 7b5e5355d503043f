"""`dqar bench` as Markdown: the header line, the notes, one table row per case (partial rows marked), the rows not
applicable to the model (with the refusal) and the failed ones."""
from __future__ import annotations


def _ratio(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}× [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.2f}×"


def _mib(r: dict) -> str:
    return f"{r['peak_memory_bytes'] / 2 ** 20:.3g}" if r.get("peak_memory_bytes") is not None else "–"


def _case(r: dict, repeats: int) -> str:
    return r["case"] if r.get("complete", True) else f"{r['case']} (partial: {len(r['times_s'])} of {repeats} rounds)"


def _sampler(result: dict) -> str:
    """How the generations sampled: DDIM for a DiT; flow-matching Euler with the family's guidance and resolution."""
    st, fam = result["settings"], result.get("family", "dit")
    if fam == "dit":
        return f"DDIM {st['steps']} · CFG {st['cfg']}"
    px = f"{result.get('resolution')} px · "
    if fam == "flux" and st["cfg"] <= 1:
        return f"{px}flow-matching Euler {st['steps']} · guidance-distilled (guidance {result.get('guidance')}, one forward)"
    how = "separate cond / uncond forwards" if fam == "flux" else "batched [uncond; cond]"
    return f"{px}flow-matching Euler {st['steps']} · CFG {st['cfg']} ({how})"


def _pct(v: float | None) -> str:
    return f"{100 * v:.1f}" if v is not None else "–"


def render_table(result: dict) -> str:
    """Markdown table of a bench result (also of a partial one: rows still being timed say so)."""
    st = result["settings"]
    best = ", ".join(f"batch {b}: {n}" for b, n in result.get("stock_best", {}).items() if n) or "none (no stock compiled row)"
    lines = [f"model {result['model']} · {result['device']} · {result['dtype']} · torch {result['torch']} · {result.get('date', '')} · "
             f"{_sampler(result)} · median of {st['repeats']} rounds · clock: {result.get('clock_method', '')}",
             "", f"Stock: {result.get('stock', '')}. Ratios: stock time / case time, with 95% paired-bootstrap intervals "
             f"(an interval that contains 1.00 is no difference on this machine). Stock best (the faster stock compiled row): {best}. "
             f"Peak MiB: {result.get('memory_method', '')}.",
             *[f"\nNote: {n}" for n in result.get("notes", [])],
             "", "| batch | case | setting | s / sample | vs stock eager | vs stock compiled | vs stock best | reuse % | peak MiB "
             "| FLOPs skipped % | bound | host syncs |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ru, bound = _pct(r["reuse_fraction"]), r.get("speedup_bound")
        lines.append(f"| {r['batch']} | {_case(r, st['repeats'])} | {r.get('setting', '')} | {r['per_sample_s']:.4f} "
                     f"| {_ratio(r['vs_stock_eager'], r['vs_stock_eager_ci'])} "
                     f"| {_ratio(r['vs_stock_compiled'], r['vs_stock_compiled_ci'])} "
                     f"| {_ratio(r.get('vs_stock_best'), r.get('vs_stock_best_ci'))} | {ru} | {_mib(r)} "
                     f"| {_pct(r.get('flops_skipped_fraction'))} | {f'{bound:.2f}×' if bound is not None else '–'} "
                     f"| {r['host_syncs'] if r.get('host_syncs') is not None else '–'} |")
    for case, why in result.get("not_applicable", {}).items():
        lines.append(f"\nNot applicable: {case} — {why}")
    for case, error in result.get("failed", {}).items():
        lines.append(f"\nNot timed: {case} failed in warm-up — {error}")
    return "\n".join(lines)
