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


def _result(rows, **settings):
    from dataclasses import asdict

    from dqar.studies.fidelity.engine import EngineSettings

    return {"settings": asdict(EngineSettings(**settings)), "samples": 10, "seconds": 60.0, "date": "d0", "machine": "m",
            "threads": 1, "torch": "t", "rows": rows}


def test_rows_rerun_replaces_only_the_named_rows_and_records_it(monkeypatch):
    import pytest

    from dqar.errors import DqarError
    from dqar.studies.fidelity import engine
    from dqar.studies.fidelity.engine import EngineSettings, rerun_engine

    base = _row("baseline (no reuse)", 0.0, None, 0.90, 0.0, "baseline")
    old = _result([base, _row("full_dqar", 0.6, 30.0, 0.9, 0.6, "preset"), _row("a row of an older table", 0.1, 50.0, 0.9),
                   _row("refresh 2, model dtype", 0.4, 40.0, 0.9)])
    asked = []

    def fake_run(settings, progress, cases):
        asked.append([n for _, n, _ in cases])
        return _result([dict(base, fd=1.0 + 1e-8), _row("full_dqar", 0.58, 33.0, 0.9, 0.58, "preset"), _row("adaptive", 0.5, 44.0, 0.9, 0.5, "preset")])
    monkeypatch.setattr(engine, "run_engine", fake_run)
    merged = rerun_engine(EngineSettings(), ["full_dqar", "adaptive"], old, progress=False)
    assert asked == [["full_dqar", "adaptive"]]
    by = {r["name"]: r for r in merged["rows"]}
    assert by["full_dqar"]["psnr_db"] == 33.0 and by["refresh 2, model dtype"]["psnr_db"] == 40.0  # named replaced, rest kept
    assert [r["name"] for r in merged["rows"]] == ["baseline (no reuse)", "full_dqar", "adaptive", "a row of an older table",
                                                   "refresh 2, model dtype"]  # a row of another name is kept where it was
    assert "Rows full_dqar, adaptive re-measured d0" in markdown(merged)
    with pytest.raises(DqarError, match="unknown engine row"):
        rerun_engine(EngineSettings(), ["no such row"], old, progress=False)
    with pytest.raises(DqarError, match="other settings"):
        rerun_engine(EngineSettings(steps=20), ["full_dqar"], old, progress=False)
    old["rows"][0] = dict(base, fd=2.0)  # a baseline that no longer scores as saved: the kept rows are unpaired
    with pytest.raises(DqarError, match="does not score as the saved one"):
        rerun_engine(EngineSettings(), ["full_dqar"], old, progress=False)


def test_rows_flag_is_refused_off_the_engine_section_in_one_line(capsys):
    from dqar.cli.app import main

    assert main(["fidelity", "--section", "dynamic", "--rows", "full_dqar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rows" in err[0]


def test_rows_rerun_accepts_an_older_result_without_the_newer_settings_keys(monkeypatch):
    from dqar.studies.fidelity import engine
    from dqar.studies.fidelity.engine import EngineSettings, rerun_engine

    base = _row("baseline (no reuse)", 0.0, None, 0.90, 0.0, "baseline")
    old = _result([base, _row("full_dqar", 0.6, 30.0, 0.9, 0.6, "preset")])
    old["settings"] = {k: v for k, v in old["settings"].items() if k not in ("model", "machine")}  # as written before them
    monkeypatch.setattr(engine, "run_engine", lambda settings, progress, cases: _result([dict(base), _row("full_dqar", 0.6, 31.0, 0.9, 0.6, "preset")]))
    merged = rerun_engine(EngineSettings(model="embedded"), ["full_dqar"], old, progress=False)  # the CLI names the DiT "embedded"
    assert merged["rows"][1]["psnr_db"] == 31.0
