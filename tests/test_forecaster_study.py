"""The forecaster study: the kind full_dqar carries is chosen on probe seeds by the worst-case margin over both models."""
import pytest

from dqar.studies.fidelity import forecaster
from dqar.studies.fidelity.forecaster import ForecasterSettings, choose, markdown, run_forecaster


def _row(kind, psnr):
    return {"name": kind, "psnr_db": psnr, "flops_skipped": 0.6, "class_accuracy": 0.9, "fd": 50.0}


PSNR = {  # (model, seed) → kind → PSNR: taylor wins on the DiT, loses the Flux target
    ("embedded", 1000): {"taylor": 45.0, "hermite": 43.0, "bdf2_heun": 44.0},
    ("embedded-flux", 1000): {"taylor": 28.0, "hermite": 26.0, "bdf2_heun": 35.5},
    ("embedded", 0): {"taylor": 45.5, "hermite": 43.5, "bdf2_heun": 44.2},
    ("embedded-flux", 0): {"taylor": 29.0, "hermite": 26.5, "bdf2_heun": 34.5},
}


def test_choose_maximises_the_worst_margin_over_the_models():
    probe = {m: {k: _row(k, v) for k, v in PSNR[(m, 1000)].items()} for m in ("embedded", "embedded-flux")}
    kind, worst = choose(probe)
    assert kind == "bdf2_heun" and worst["bdf2_heun"] == pytest.approx(0.5) and worst["taylor"] == pytest.approx(-7.0)
    probe["embedded-flux"]["taylor"]["psnr_db"] = 36.0  # taylor now clears both targets by more
    assert choose(probe)[0] == "taylor"


def test_study_scores_probe_then_evaluated_seeds_and_its_verdicts_follow_the_numbers(monkeypatch):
    calls = []

    def fake(model, per_class, seed, progress):
        calls.append((model, per_class, seed))
        return {k: _row(k, v) for k, v in PSNR[(model, seed)].items()}, f"{model} sampling"
    monkeypatch.setattr(forecaster, "_scores", fake)
    result = run_forecaster(ForecasterSettings(samples_per_class=3, probe_per_class=1), progress=False)
    assert calls == [("embedded", 1, 1000), ("embedded-flux", 1, 1000), ("embedded", 3, 0), ("embedded-flux", 3, 0)]
    assert result["chosen"] == "bdf2_heun"
    md = markdown(result)
    assert "| bdf2_heun **(chosen)** |" in md
    assert "embedded-flux: `bdf2_heun` 34.50 dB on the evaluated seeds, target 35 dB missed" in md
    assert "embedded: `bdf2_heun` 44.20 dB on the evaluated seeds, target 40 dB met; the best kind there is `taylor` (+1.30 dB" in md
    stale = "the preset is stale" in md
    assert stale == (result["shipped"] != "bdf2_heun")


def test_settings_refuse_no_samples():
    from dqar.errors import DqarError

    with pytest.raises(DqarError, match="at least one"):
        ForecasterSettings(samples_per_class=0)
