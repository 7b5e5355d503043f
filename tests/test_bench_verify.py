"""`dqar bench --presets adaptive`: the verifying decider live on each executor, beside the static plan of its own executed
decisions on the same executor (same FLOPs skipped, no host reads), both against stock torch.compile with intervals;
--quick times no compiled row."""
import pytest
import torch

from dqar.models import load_model
from dqar.studies.bench.cases import STATIC_OF_VERIFY
from dqar.studies.bench.runner import BenchSettings, case_names, render_table, run_bench
from dqar.studies.measure.timing import cpu_threads


def _bench(loaded, **kw):
    cpu = torch.device("cpu")
    s = BenchSettings(**{"batch_sizes": (1,), "repeats": 3, "warmup": 1, "presets": ("adaptive",), "peers": (), **kw})
    with cpu_threads(cpu, 1):
        return run_bench(loaded, cpu, s, progress=False)


def _check_pair(rows, live: str, static: str) -> None:
    a, b = rows[live], rows[static]
    assert a["flops_skipped_fraction"] == b["flops_skipped_fraction"] > 0 and a["reuse_fraction"] == b["reuse_fraction"]
    assert a["host_syncs"] > 0 and b["host_syncs"] == 0  # the live decider reads its probe's error; the replay reads nothing
    assert STATIC_OF_VERIFY in b["setting"] and STATIC_OF_VERIFY not in a["setting"]
    for r in (a, b):
        assert r["vs_stock_compiled"] is not None and r["vs_stock_compiled_ci"] is not None and r["complete"]


def test_flux_times_adaptive_on_flow_compiled_beside_its_static_twin():
    """τ calibrated to a share (`verify_target`): at 8 steps the preset's own τ reuses nothing on embedded-flux."""
    loaded = load_model("embedded-flux")
    result = _bench(loaded, steps=8, cfg=4.0, executors=("flow_compiled",), cases=("stock_*", "adaptive_*"), verify_target=0.3)
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"stock_eager", "stock_compiled", "adaptive_flow_compiled", "adaptive_static_flow_compiled"}
    setting = rows["adaptive_flow_compiled"]["setting"]
    assert not result["failed"] and setting.startswith("dqar executor flow_compiled, τ × ") and "calibrated to skip 30%" in setting
    _check_pair(rows, "adaptive_flow_compiled", "adaptive_static_flow_compiled")
    assert rows["adaptive_flow_compiled"]["host_syncs"] <= 8  # one read per deciding step, not per CFG forward
    assert "| 1 | adaptive_static_flow_compiled |" in render_table(result)


def test_the_dit_times_adaptive_on_compiled_beside_its_static_twin():
    result = _bench(load_model("embedded"), steps=12, executors=("compiled",), cases=("stock_compiled", "adaptive_*"))
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"stock_compiled", "adaptive_compiled", "adaptive_static_compiled"} and not result["failed"]
    _check_pair(rows, "adaptive_compiled", "adaptive_static_compiled")
    assert not result["not_applicable"]


def test_the_dit_times_per_sample_refresh_beside_the_batch_decider():
    result = _bench(load_model("embedded"), steps=8, batch_sizes=(2,), compile=False, verify_target=0.3,
                    cases=("stock_eager", "adaptive_eager", "adaptive_per_sample_eager"))
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"stock_eager", "adaptive_eager", "adaptive_per_sample_eager"} and not result["failed"]
    per, batch = rows["adaptive_per_sample_eager"], rows["adaptive_eager"]
    assert "per-sample refresh" in per["setting"] and "per-sample refresh" not in batch["setting"]
    assert "calibrated to skip 30%" in per["setting"] and per["host_syncs"] > 0
    assert per["flops_skipped_fraction"] > 0 and per["setting"].startswith("dqar executor patch")


def test_adaptive_rows_are_named_and_quick_times_no_compiled_row():
    s = BenchSettings(presets=("adaptive",), peers=())
    names = case_names(s)
    for n in ("adaptive_eager", "adaptive_compiled", "adaptive_graph", "adaptive_flow_compiled", "adaptive_static_compiled",
              "adaptive_static_graph", "adaptive_static_flow_compiled"):
        assert n in names
    assert "adaptive_compiled_modeldtype" not in names
    quick = case_names(BenchSettings(presets=("adaptive",), peers=(), compile=False))
    assert [n for n in quick if n.startswith("adaptive")] == ["adaptive_eager", "adaptive_per_sample_eager"]


@pytest.mark.parametrize("preset_name", ["full_dqar", "block_reuse"])
def test_plan_presets_get_no_static_twin(preset_name):
    assert not [n for n in case_names(BenchSettings(presets=(preset_name,), peers=())) if "_static_" in n]


def test_a_verify_target_out_of_range_is_one_line(tmp_path, capsys):
    from dqar.cli import main

    assert main(["bench", "--quick", "--presets", "adaptive", "--verify-target", "1.5", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "verify_target = 1.5 is out of range" in err and err.count("\n") == 1
