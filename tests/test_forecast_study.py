"""The forecast fidelity study: a tiny end-to-end run writes its section; verdicts follow the numbers."""
import copy
import json

import pytest

from dqar.studies.fidelity.forecast import ForecastSettings, run_forecast
from dqar.studies.fidelity.forecast_section import markdown, targets, write_forecast


@pytest.fixture(scope="module")
def result():
    import torch

    with torch.no_grad():  # as the CLI samples; grad mode is left as the other tests expect it
        return run_forecast(ForecastSettings(samples=2, probe_samples=1, steps=10, dpm_steps=20, peers=False), progress=False)


def test_tiny_run_measures_every_configuration_and_writes_the_section(result, tmp_path):
    names = [r["name"] for r in result["rows"]]
    assert "full_dqar preset" in names and "block, order 2, refresh 3" in names
    order = {r["order"]: r["psnr_db"] for r in result["rows"] if r.get("granularity") == "block" and r.get("refresh") == 3}
    assert len(set(order.values())) == 3  # copy, linear and quadratic forecasts give different images
    block = next(r for r in result["rows"] if r["name"] == "block, order 2, refresh 3")
    assert abs(block["work_skipped"] - block["reuse"]) < 1e-9  # a skipped block skips its attn1 and ff
    assert len(result["matched"]) == 3 and result["dpm_rows"]
    chosen = [r for r in result["dpm_rows"] if r.get("chosen_on_probe")]  # the probe seeds' pick, scored on the evaluated seeds
    assert len(chosen) == 1 and chosen[0]["flops_skipped"] >= 0.5 and "probe_psnr_db" in chosen[0]
    doc = write_forecast(result, tmp_path)
    text = doc.read_text()
    assert "## Forecast" in text and (tmp_path / "fidelity_forecast.png").is_file()
    assert json.loads((tmp_path / "fidelity_forecast.json").read_text())["settings"]["samples"] == 2


def test_verdicts_follow_the_numbers(result):
    good = copy.deepcopy(result)
    full = next(r for r in good["rows"] if r["name"] == "full_dqar preset")
    full.update(flops_skipped=0.65, psnr_db=45.0, class_accuracy=good["baseline"]["class_accuracy"], fd=good["baseline"]["fd"])
    assert targets(good)["full_dqar"]["met"]
    full["psnr_db"] = 39.0
    assert not targets(good)["full_dqar"]["met"]
    assert "**missed**" in markdown(good).split("`full_dqar`")[1].split("\n")[0]
    model = next(r for r in good["rows"] if r["name"] == "full_dqar preset, model-dtype history")  # the same plan and forecaster
    good["rows"] = [r for r in good["rows"] if r["name"] != "block, order 2, refresh 3"] + [  # the grid's taylor row is not its twin
        dict(next(r for r in good["rows"] if r["name"] == "block, order 2, refresh 3"), psnr_db=0.0)]
    model["psnr_db"] = full["psnr_db"] + 0.5
    assert not targets(good)["int8"][0]["met"]
    model["psnr_db"] = full["psnr_db"] + 0.2
    assert targets(good)["int8"][0]["met"]
