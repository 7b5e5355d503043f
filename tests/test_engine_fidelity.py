"""The engine fidelity section: its findings follow the numbers in its table."""
from dqar.studies.fidelity.engine import engine_cases, findings, markdown


def _row(name, reuse, psnr, acc, flops=0.1, group="refresh"):
    return {"group": group, "name": name, "reuse": reuse, "flops_skipped": flops, "psnr_db": psnr, "ssim": 0.9,
            "quant_error": None, "class_accuracy": acc, "fd": 1.0}


def test_cases_cover_presets_refresh_intervals_formats_and_granularity():
    names = [n for _, n, _ in engine_cases()]
    assert {"scheduling_only", "quant_cache_only", "full_dqar", "block_reuse"} <= set(names)
    for k in (2, 3, 4):
        assert f"refresh {k}, model dtype" in names and f"refresh {k}, block reuse, model dtype" in names
    assert {f"refresh 2, INT8 per {m}" for m in ("tensor", "channel", "head", "token")} <= set(names)
    cfgs = {n: c for _, n, c in engine_cases()}
    for m in ("tensor", "token"):  # INT8 rows differ from their model-dtype row only in the cache
        a, b = cfgs["refresh 2, model dtype"], cfgs[f"refresh 2, INT8 per {m}"]
        assert (a.schedule, a.warmup_frac, a.refresh_interval) == (b.schedule, b.warmup_frac, b.refresh_interval)


def test_findings_are_computed_from_the_rows():
    base = _row("baseline (no reuse)", 0.0, None, 0.90, 0.0, "baseline")
    rows = [base, _row("refresh 2, model dtype", 0.4, 40.0, 0.90), _row("refresh 2, INT8 per tensor", 0.4, 38.5, 0.89),
            _row("refresh 2, INT8 per token", 0.4, 39.9, 0.85), _row("refresh 2, block reuse, model dtype", 0.4, 30.0, 0.8, 0.35)]
    text = "\n".join(findings(rows, base))
    assert "INT8 costs at most 1.50 dB (tensor scales worst)" in text
    assert "35.0% of FLOPs skipped" in text and "at 30.00 dB" in text
    assert "2 of 4 configurations keep class accuracy within 1 point" in text
    result = {"settings": {"steps": 50, "cfg": 4.0, "samples_per_class": 1, "seed": 0}, "samples": 10, "seconds": 90.0, "rows": rows}
    md = markdown(result)
    assert "`dqar fidelity --section engine --samples 10` (the recorded run took 2 min)" in md
    assert "| refresh 2, INT8 per tensor | 40.0 | 10.0 | 38.50 |" in md
