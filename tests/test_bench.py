"""`dqar bench --quick` on CPU: every case timed, ratios consistent with medians."""
import json
import statistics

import pytest

from dqar.studies.bench.runner import BenchSettings
from dqar.cli import main
from dqar.errors import DqarError
from dqar.models import save_pipeline_folder

from conftest import make_tiny_transformer


def bench_render(result):
    from dqar.studies.bench.report import render_table

    return render_table(result)


def test_bench_quick_runs_on_cpu(tmp_path, monkeypatch):
    """The CLI writes bench.json atomically after every warm-up and every timed case, not once per batch size."""
    import dqar.io

    real, writes = dqar.io.atomic_write_json, []
    monkeypatch.setattr(dqar.io, "atomic_write_json", lambda path, obj: (writes.append([r["complete"] for r in obj["rows"]]), real(path, obj)))
    model = save_pipeline_folder(tmp_path / "m", make_tiny_transformer(num_classes=10, in_channels=1, learned_sigma=False))
    rc = main(["bench", "--model", str(model), "--quick", "--no-compile", "--presets", "block_reuse", "quant_cache_only",
               "--batch-sizes", "1", "--steps", "4", "--peers", "--out", str(tmp_path / "b"), "--quiet"])
    assert rc == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"stock_eager", "noreuse_eager", "block_reuse_eager", "quant_cache_only_eager"}
    for r in rows.values():
        assert len(r["times_s"]) == len(r["wall_times_s"]) == 3 and r["median_s"] == statistics.median(r["times_s"])
        assert r["per_sample_s"] == pytest.approx(r["median_s"] / r["batch"])
        assert r["vs_stock_eager"] == pytest.approx(rows["stock_eager"]["median_s"] / r["median_s"])
        lo, hi = r["vs_stock_eager_ci"]
        assert lo <= r["vs_stock_eager"] <= hi and r["vs_stock_compiled"] is None  # --no-compile: no stock_compiled row
        assert r["vs_stock_best"] is None and r["complete"] and len(r["warmup_s"]) == 1  # --quick: one warm-up pass
    assert rows["stock_eager"]["vs_stock_eager_ci"] == [1.0, 1.0]
    assert rows["block_reuse_eager"]["reuse_fraction"] > 0
    assert "no VAE" in result["stock"] and result["clock"] == "thread_time"
    assert "| 1 | block_reuse_eager |" in (tmp_path / "b" / "bench.md").read_text()
    assert len(writes) == 4 + 4 * 3 and writes[4] == [False] and writes[-1] == [True] * 4  # 4 warm-ups, 4 cases x 3 rounds
    assert rows["block_reuse_eager"]["graphs"] == 0 and rows["block_reuse_eager"]["fallback_evaluations"] == 0
    assert (tmp_path / "b" / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the chart beside the table


def test_bench_chart_draws_each_timed_row_and_the_flop_bound(tmp_path, monkeypatch):
    """One bar per timed row (stock, dqar, peer colours), the FLOP bound tick on a reusing dqar row; nothing without ratios."""
    from dqar.studies.bench import chart

    row = lambda case, v, **kw: {"case": case, "batch": 8, "vs_stock_best": v, "vs_stock_best_ci": [v - 0.01, v + 0.01], **kw}  # noqa: E731
    result = {"model": "m", "device": "d", "rows": [row("stock_compiled_cudagraphs", 1.0), row("noreuse_graph", 1.1),
                                                    row("full_dqar_graph", 0.98, flops_skipped_fraction=0.64, speedup_bound=2.78),
                                                    row("peer_magcache", 0.75)]}
    seen = {}
    real = chart._panel

    def panel(ax, rows, key):
        real(ax, rows, key)
        seen["bars"] = [b.get_facecolor()[:3] for b in ax.patches]
        seen["ticks"] = [tuple(line.get_xdata()) for line in ax.get_lines() if line.get_markersize() == 14]
    monkeypatch.setattr(chart, "_panel", panel)
    assert chart.render_chart(result, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 1000
    assert len(seen["bars"]) == 4 and len(set(seen["bars"])) == 3
    assert seen["ticks"] == [(pytest.approx(1.1 * 2.78),)]
    untimed = {"case": "stock_eager", "batch": 8, "vs_stock_best": None, "vs_stock_eager": None}
    assert not chart.render_chart({"model": "m", "device": "d", "rows": [untimed]}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_bench_times_the_stock_model_compiled_next_to_dqar(tmp_path):
    """A latent model DiTPipeline runs: stock eager and stock compiled are its pipeline; every row has ratios to both."""
    from dqar.models import load_model
    from dqar.studies.bench.runner import run_bench

    from conftest import make_tiny_vae

    loaded = load_model(save_pipeline_folder(tmp_path / "m", make_tiny_transformer(num_layers=2), make_tiny_vae()))
    s = BenchSettings(batch_sizes=(1,), steps=2, repeats=3, presets=("block_reuse",), peers=())
    result = run_bench(loaded, __import__("torch").device("cpu"), s, progress=False)
    rows = {r["case"]: r for r in result["rows"]}
    assert {"stock_eager", "stock_compiled", "noreuse_compiled", "block_reuse_compiled"} <= set(rows) and result["stock"] == "DiTPipeline"
    for r in rows.values():
        assert r["vs_stock_compiled"] == pytest.approx(rows["stock_compiled"]["median_s"] / r["median_s"])
        assert r["vs_stock_eager_ci"][0] <= r["vs_stock_eager"] <= r["vs_stock_eager_ci"][1]
        assert (r["vs_stock_best"], r["vs_stock_best_ci"]) == (r["vs_stock_compiled"], r["vs_stock_compiled_ci"])  # CPU: one stock compiled row
    assert not result["failed"] and "stock_compiled_cudagraphs" not in rows and result["stock_best"] == {"1": "stock_compiled"}
    assert "stock_compiled_cudagraphs left out" in result["notes"][0] and "vs stock best" in bench_render(result)


@pytest.mark.parametrize("kw", [{"repeats": 2}, {"batch_sizes": (0,)}, {"steps": 0}, {"presets": ("fast",)}, {"warmup": 0},
                                {"peers": ("teacache",)}, {"executors": ("jit",)}, {"cases": ("nothing_*",)}])
def test_bench_settings_refuse_bad_values(kw):
    with pytest.raises(DqarError):
        BenchSettings(**kw)


def test_bench_reports_a_failing_case_and_keeps_finished_batches(monkeypatch):
    """A case that raises in warm-up is listed under "failed"; the others are timed; each batch is handed on."""
    import dqar.studies.bench.runner as bench
    from dqar.models import load_model

    def broken():
        raise RuntimeError("no compiler here\nsecond line")

    real = bench.cases_for

    def with_broken(loaded, batch, s):
        cases = real(loaded, batch, s)
        cases["broken_case"] = bench.Case(broken, lambda: "broken")
        return cases

    monkeypatch.setattr(bench, "cases_for", with_broken)
    loaded = load_model(None)
    seen = []
    s = BenchSettings(batch_sizes=(1, 2), steps=2, presets=(), compile=False, stock=False, peers=(), repeats=3, warmup=1)
    result = bench.run_bench(loaded, __import__("torch").device("cpu"), s, progress=False,
                             on_update=lambda r: seen.append(len(r["rows"])))
    assert result["failed"] == {"broken_case@1": "RuntimeError: no compiler here", "broken_case@2": "RuntimeError: no compiler here"}
    assert {r["case"] for r in result["rows"]} == {"stock_eager", "noreuse_eager"}
    assert seen == [0, 0, 1, 2, 2, 2, 2, 2, 2, 2, 3, 4, 4, 4, 4, 4]  # per batch: 2 warm-ups, then 2 cases x 3 rounds
    assert "Not timed: broken_case@1 failed in warm-up — RuntimeError: no compiler here" in bench.render_table(result)


def test_gpu_session_script_parses_and_names_existing_commands():
    """benchmarks/gpu_session.sh runs only on a GPU machine; here: its syntax and the modules it calls."""
    import importlib.util
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for module in ("dqar.embedded.train", "dqar.embedded.check", "dqar.cli"):
        assert f"-m {module}" in text and importlib.util.find_spec(module) is not None
    import re

    assert 'timeout "$limit"' in text and text.count("\nbench ") == 6  # every bench stage bounded, by what is left
    limits = [int(m) for m in re.findall(r"^bench \S+ (\d+) ", text, re.M)]
    budget = int(re.search(r"BUDGET=\$\{BUDGET:-(\d+)\}", text).group(1))
    assert budget <= 570 and max(limits) <= 480  # one call (<= 600 s) holds the budget; any stage fits an 8-minute call
    assert '.done"' in text and "pack" in text  # finished stages are skipped by a rerun; results packed after each stage
    for flag in ("--peers", "--cases", "--executors", "random-dit-xl2-512", "nvidia-smi", "torch.__version__", "date -u"):
        assert flag in text


def _tiny_bench(**kw):
    import torch

    from dqar.studies.bench.runner import run_bench

    from conftest import tiny_loaded

    s = BenchSettings(**{"batch_sizes": (1,), "steps": 3, "repeats": 3, "executors": ("eager",), **kw})
    return run_bench(tiny_loaded(), torch.device("cpu"), s, progress=False)


def test_peer_rows_are_timed_beside_dqar_with_memory_fields(single_thread):
    """The four diffusers peers (MagCache calibrated in its warm-up) are timed in the same rounds, with ratios and a memory field."""
    from dqar.studies.bench import runner as bench
    from dqar.studies.bench.peers import EAGER

    result = _tiny_bench(presets=("block_reuse",), compile=False)
    rows = {r["case"]: r for r in result["rows"]}
    peers = ["peer_pab", "peer_first_block_cache", "peer_taylorseer", "peer_magcache"]
    assert list(rows) == ["stock_eager", "noreuse_eager", "block_reuse_eager", *peers] and not result["failed"]
    for name in peers:
        r = rows[name]
        assert len(r["times_s"]) == 3 and r["setting"] == EAGER and r["peak_memory_bytes"] is None
        assert r["vs_stock_eager"] == pytest.approx(rows["stock_eager"]["median_s"] / r["median_s"])
        assert r["peak_memory_method"] == bench.MEMORY_NONE
    assert rows["block_reuse_eager"]["peak_memory_bytes"] > 0 and rows["block_reuse_eager"]["peak_memory_method"] == bench.MEMORY_CACHE
    assert rows["block_reuse_eager"]["setting"] == "dqar executor patch" and result["memory_method"] == bench.MEMORY_CACHE
    assert "| 1 | peer_magcache | eager (compile rows off) |" in bench.render_table(result)


def test_a_peer_whose_compile_fails_falls_back_to_eager_and_says_so(monkeypatch, single_thread):
    import torch

    import dqar.studies.bench.peers as bp

    def no_compiler(gm, example_inputs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(bp, "compile_model", lambda t: torch.compile(t, backend=no_compiler, dynamic=False))
    result = _tiny_bench(presets=(), peers=("first_block_cache",), cases=("stock_eager", "peer_*"))
    (row,) = [r for r in result["rows"] if r["case"] == "peer_first_block_cache"]
    assert row["setting"].startswith("eager: torch.compile failed in the warm-up") and "no compiler on this machine" in row["setting"]
    assert len(row["times_s"]) == 3 and not result["failed"]
    assert {r["case"] for r in result["rows"]} == {"stock_eager", row["case"], "peer_first_block_cache_eager"}


def test_a_compiled_peer_row_has_its_eager_twin_and_no_twin_without_compile():
    """With compile rows on every peer is timed both ways (compared at its faster form); with them off, once (eagerly)."""
    from dqar.studies.bench import runner as bench
    from dqar.studies.bench.peers import EAGER_TWIN

    on = bench.case_names(BenchSettings(peers=("magcache",), presets=()))
    assert "peer_magcache" in on and "peer_magcache_eager" in on
    assert "peer_magcache_eager" not in bench.case_names(BenchSettings(peers=("magcache",), presets=(), compile=False))
    from conftest import tiny_loaded

    cases = bench.cases_for(tiny_loaded(), 1, BenchSettings(peers=("magcache",), presets=(), cases=("peer_*",), steps=3))
    assert cases["peer_magcache_eager"].setting() == EAGER_TWIN and not cases["peer_magcache_eager"].run.compile
    assert cases["peer_magcache"].run.compile


def test_cases_select_the_graph_section_rows_without_a_model():
    """The documented graph-executor command times exactly the rows of docs/BENCHMARKS.md "Graph executor"."""
    from dqar.studies.bench.runner import case_names, selected

    s = BenchSettings(presets=("full_dqar",), peers=(), executors=("compiled", "graph"),
                      cases=("stock_*", "noreuse_graph", "full_dqar_graph", "full_dqar_compiled"))
    assert [n for n, _ in selected(s)] == ["stock_eager", "stock_compiled", "stock_compiled_cudagraphs", "noreuse_graph",
                                           "full_dqar_compiled", "full_dqar_graph"]
    assert "stock_compiled_cudagraphs" not in [n for n, _ in selected(s, cuda=False)]
    assert "noreuse_eager" not in case_names(s) and "full_dqar_compiled_modeldtype" in case_names(s)
    assert "stock_compiled" not in case_names(BenchSettings(compile=False, peers=()))


def test_cuda_rows_report_the_highest_allocator_peak():
    from dqar.studies.bench import runner as bench
    from dqar.studies.measure import memory
    from dqar.studies.measure.timing import Run, Timing

    runs = [Run(Timing(1.0, 1.0), peak) for peak in (10, 30, 20)]
    assert bench._memory(runs, None) == (30, memory.METHOD_CUDA)
    assert bench._memory([Run(Timing(1.0, 1.0), None)], None) == (None, bench.MEMORY_NONE)


@pytest.mark.parametrize("flags,expect", [(["--batch-sizes", "0"], "batch sizes"), (["--presets", "fast"], "preset"),
                                          (["--peers", "teacache"], "unknown peer"), (["--cases", "nothing_*"], "matches no case"),
                                          (["--executors", "jit"], "unknown executor"), (["--steps", "0"], "steps")])
def test_bench_bad_input_exits_2_with_one_line(flags, expect, capsys, tmp_path):
    rc = main(["bench", *flags, "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and err.count("\n") == 1, err


class _TableClock:
    """Injected clock: a fake case's run returns its name; its time comes from a table (seconds = wall)."""

    name, description = "fake", "fake clock"

    def __init__(self, table):
        self.table = table

    def measure(self, fn):
        from dqar.studies.measure.timing import Timing

        out = fn()
        return out, Timing(self.table[out], self.table[out])


def _fake_cases(names, stats=None):
    from dqar.studies.bench.runner import Case

    return {n: Case((lambda n=n: n), lambda: "fake", (lambda n=n: (stats or {}).get(n))) for n in names}


def test_every_timed_case_is_handed_on_with_partial_rows_and_warmup_stats(monkeypatch):
    """Round-robin timing, but the result goes out after every case: rows short of their rounds say complete: false;
    each row keeps its warm-up seconds and dqar's graphs, fallbacks and compile seconds, logged per case as it warms."""
    from types import SimpleNamespace

    import torch

    import dqar.studies.bench.runner as bench
    from dqar.models import load_model

    st = SimpleNamespace(graphs=3, fallback_evaluations=0, compile_seconds=1.5, reuse_fraction=0.5, cache_bytes_peak=10)
    monkeypatch.setattr(bench, "cases_for", lambda loaded, batch, s: _fake_cases(["stock_eager", "dqar_x"], {"dqar_x": st}))
    updates, lines = [], []
    s = BenchSettings(batch_sizes=(1,), steps=2, presets=(), compile=False, stock=False, peers=(), repeats=3, warmup=2)
    clock = _TableClock({"stock_eager": 2.0, "dqar_x": 1.0})
    result = bench.run_bench(load_model(None), torch.device("cpu"), s, progress=False, clock=clock, log=lines.append,
                             on_update=lambda r: updates.append({x["case"]: (len(x["times_s"]), x["complete"]) for x in r["rows"]}))
    assert len(updates) == 2 * 2 + 2 * 3 and updates[4] == {"stock_eager": (1, False)}  # 2 passes x 2 warm-ups, 2 cases x 3 rounds
    assert updates[5] == {"stock_eager": (1, False), "dqar_x": (1, False)} and updates[-1] == {"stock_eager": (3, True), "dqar_x": (3, True)}
    assert lines[1] == "warm-up dqar_x@1 (pass 1 of 2): 1.0 s, graphs 3, fallbacks 0" and len(lines) == 4
    row = {r["case"]: r for r in result["rows"]}["dqar_x"]
    assert row["warmup_s"] == [1.0, 1.0] and (row["graphs"], row["fallback_evaluations"], row["compile_seconds"]) == (3, 0, 3.0)
    assert row["vs_stock_eager"] == 2.0 and result["warmup"]["dqar_x@1"]["graphs"] == 3


def test_stock_best_is_the_faster_stock_compiled_row(monkeypatch):
    """With a (fake) CUDA-graphs stock row faster than stock_compiled, every row's vs_stock_best is against it."""
    import torch

    import dqar.studies.bench.runner as bench
    from dqar.models import load_model

    assert bench.stock_best({"stock_compiled": 2.0, "stock_compiled_cudagraphs": 1.5, "x": 0.1}) == "stock_compiled_cudagraphs"
    assert bench.stock_best({"stock_compiled": 2.0}) == "stock_compiled" and bench.stock_best({"stock_eager": 1.0}) is None
    names = ["stock_eager", "stock_compiled", "stock_compiled_cudagraphs", "dqar_x"]
    monkeypatch.setattr(bench, "cases_for", lambda loaded, batch, s: _fake_cases(names))
    s = BenchSettings(batch_sizes=(2,), steps=2, presets=(), compile=False, stock=False, peers=(), repeats=3, warmup=1)
    clock = _TableClock({"stock_eager": 4.0, "stock_compiled": 3.0, "stock_compiled_cudagraphs": 2.0, "dqar_x": 1.0})
    result = bench.run_bench(load_model(None), torch.device("cpu"), s, progress=False, clock=clock)
    rows = {r["case"]: r for r in result["rows"]}
    assert result["stock_best"] == {"2": "stock_compiled_cudagraphs"}
    assert rows["dqar_x"]["vs_stock_best"] == 2.0 and rows["dqar_x"]["vs_stock_compiled"] == 3.0 and rows["dqar_x"]["vs_stock_best_ci"] == [2.0, 2.0]
    assert "batch 2: stock_compiled_cudagraphs" in bench_render(result) and "| 2.00× [2.00, 2.00] |" in bench_render(result)


def test_quick_is_a_smoke_run_without_compile_rows():
    from dqar.cli.app import build_parser
    from dqar.cli.studies import _bench_settings

    s = BenchSettings(**_bench_settings(build_parser().parse_args(["bench", "--quick"])))
    assert (s.compile, s.repeats, s.warmup, s.steps, s.batch_sizes) == (False, 3, 1, 10, (2,))
    assert BenchSettings(**_bench_settings(build_parser().parse_args(["bench", "--quick", "--repeats", "4"]))).repeats == 4
