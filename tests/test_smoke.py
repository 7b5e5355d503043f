"""`dqar smoke` on the CPU: the graph executor's cases PASS against patch, a broken output or a host sync FAILs with exit 1.

The embedded model (8 layers) takes about 80 s here with its two whole-model compiles, so the CLI tests run a 2-layer
random DiT folder: the same graph executor, patterns and checks, a fraction of the compile.
"""
import json
from dataclasses import replace

import pytest
import torch

import dqar.studies.bench.smoke as smoke
from dqar.cli import main
from dqar.errors import DqarError
from dqar.generate import Generation
from dqar.models import save_pipeline_folder

from conftest import make_tiny_transformer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_pipeline_folder(tmp_path_factory.mktemp("smoke") / "m",
                                make_tiny_transformer(num_layers=2, num_classes=10, in_channels=1, learned_sigma=False))


def test_smoke_passes_on_cpu_and_writes_what_it_saw(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DQAR_COMPILE_CACHE", raising=False)
    rc = main(["smoke", "--model", str(tiny_folder), "--device", "cpu", "--out", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.split(" ", 1)[0] in ("PASS", "FAIL", "n/a")]
    assert len(lines) == 10 and not any(ln.startswith("FAIL") for ln in lines)
    assert sum(ln.startswith("n/a (cpu) ") and "cuda_graphs" in ln for ln in lines) == 2  # no CUDA graphs on a CPU: not PASS
    result = json.loads((tmp_path / "s" / "smoke.json").read_text())
    assert result["passed"] and list(result["cases"]) == ["noreuse_graph", "full_dqar_graph"]
    for case in result["cases"].values():
        assert case["executor"] == "graph" and case["stats"]["graphs"] >= 1 and case["stats"]["fallback_evaluations"] == 0
        assert case["stats"]["host_syncs"] == 0 and case["new_graphs_second"] == 0 and len(case["seconds"]) == 3
        assert case["checks"]["cuda_graphs"]["status"] == "n/a (cpu)"
    assert result["cases"]["full_dqar_graph"]["stats"]["reuse_fraction"] > 0  # the INT8 forecast path runs
    assert result["cases"]["full_dqar_graph"]["checks"]["time_follows_work"]["status"] == "n/a (cpu)"
    assert all(case["replay_s"] > 0 for case in result["cases"].values())
    assert result["tolerance"] == {"atol": 1e-4, "rtol": 1e-4} and result["command"].startswith("dqar smoke")


def test_smoke_fails_on_a_wrong_output_and_a_host_sync(tiny_folder, tmp_path, capsys, monkeypatch):
    """The graph case's second generation is perturbed and reports a host sync: two FAILs, exit 1, smoke.json says so."""
    real = smoke.cases_for

    def broken(*args, **kwargs):
        cases = real(*args, **kwargs)
        graph, calls = cases["noreuse_graph"], []

        def run():
            gen = graph_run()
            calls.append(1)
            if len(calls) < 2:
                return gen
            out = replace(gen.output, latents=gen.output.latents + 1.0)
            return Generation(out, replace(gen.stats, host_syncs=3), gen.executor)
        graph_run, graph.run = graph.run, run
        return cases

    monkeypatch.setattr(smoke, "cases_for", broken)
    rc = main(["smoke", "--model", str(tiny_folder), "--device", "cpu", "--cases", "noreuse_graph", "--out", str(tmp_path / "s")])
    out = capsys.readouterr()
    assert rc == 1
    assert "FAIL noreuse_graph matches_patch: " in out.out and "max |graph - patch| 1 " in out.out
    assert "FAIL noreuse_graph no_host_syncs: host syncs per generation: graph 1 0, graph 2 3" in out.out
    assert "PASS noreuse_graph no_recompile" in out.out and "smoke FAIL" in out.out and "a check failed" in out.err
    result = json.loads((tmp_path / "s" / "smoke.json").read_text())
    assert not result["passed"] and result["cases"]["noreuse_graph"]["checks"]["matches_patch"]["status"] == "FAIL"


def test_a_recompile_in_the_second_generation_fails():
    seen = smoke._Seen(recompiled="Recompiling function evaluate")
    assert smoke._recompiles(seen)["status"] == "FAIL"
    assert smoke._recompiles(smoke._Seen(new_graphs_second=1))["status"] == "FAIL"
    assert smoke._recompiles(smoke._Seen())["status"] == "PASS"


def test_a_real_recompile_is_caught_and_fails(monkeypatch):
    """A graph case whose second generation meets a new shape recompiles: error_on_recompile stops it, FAIL."""
    fn, calls = torch.compile(lambda x: x.sin() + 1, dynamic=False), []

    def gen():
        calls.append(1)
        x = torch.zeros(2, 3) if len(calls) < 3 else torch.zeros(4, 3)  # the third call (graph 2) has a new shape
        return Generation(type("Out", (), {"latents": fn(x)})(), None, "graph")
    case = type("Case", (), {"run": staticmethod(gen), "setting": staticmethod(lambda: "fake")})()
    seen = smoke._Seen()
    smoke._generations(seen, case, case)
    assert seen.recompiled and len(seen.generations) == 2 and smoke._recompiles(seen)["status"] == "FAIL"
    report = smoke._report(seen, case, torch.device("cpu"), 1e-4, 1e-4)
    assert report["checks"]["matches_patch"]["status"] == "FAIL" and "recompile" in report["checks"]["matches_patch"]["detail"]


def test_cudagraph_skip_reasons_are_collected():
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    reasons = []
    with smoke._skip_reasons(reasons):
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (1 instances)")
    log_cudagraph_skip_and_bump_counter("outside: not collected")
    assert reasons == ["skipping cudagraphs due to mutated inputs (1 instances)"]
    st = type("St", (), {"graphs": 1, "fallback_evaluations": 0})()
    check = smoke._cuda_graphs(smoke._Seen(skips=1, skip_reasons=reasons, captured=0), st, torch.device("cuda"))
    assert check["status"] == "FAIL" and "mutated inputs" in check["detail"]


def test_cuda_graph_check_needs_captures_and_no_skips():
    st = type("St", (), {"graphs": 2, "fallback_evaluations": 0})()
    cuda = torch.device("cuda")
    assert smoke._cuda_graphs(smoke._Seen(captured=2), st, cuda)["status"] == "PASS"
    assert smoke._cuda_graphs(smoke._Seen(captured=2, skips=1), st, cuda)["status"] == "FAIL"
    assert smoke._cuda_graphs(smoke._Seen(captured=0), st, cuda)["status"] == "FAIL"
    assert smoke._cuda_graphs(smoke._Seen(captured=2), st, torch.device("cpu"))["status"] == "n/a (cpu)"


def test_int8_sized_differences_pass_at_fp16_tolerance():
    want = torch.linspace(-3, 3, 64).reshape(1, 4, 4, 4)  # (N, C, h, w)
    close = want + 0.01 * want.abs().amax() / 3  # well inside atol + rtol |want| at fp16
    assert smoke._matches(want, [close], *smoke.TOLERANCES[torch.float16])["status"] == "PASS"
    assert smoke._matches(want, [want + 0.5], *smoke.TOLERANCES[torch.float16])["status"] == "FAIL"
    assert smoke._matches(want, [want * float("nan")], 1.0, 1.0)["status"] == "FAIL"
    scattered = want.clone()  # as on the H200 in fp16: 5% of the elements past the elementwise bound, the tensor within
    scattered.view(-1)[::20] += 0.08
    seen = smoke._matches(want, [scattered], *smoke.TOLERANCES[torch.float16])
    assert seen["status"] == "PASS" and "elements outside the elementwise bound" in seen["detail"]
    assert smoke._matches(want, [want.flip(-1)], *smoke.TOLERANCES[torch.float16])["status"] == "FAIL"  # a wrong output
    nan = want.clone()
    nan[0, 0, 0, 0] = float("nan")  # the same NaN in both: equal (the model's problem, not the graph executor's)
    same = smoke._matches(nan, [nan.clone()], 1e-4, 1e-4)
    assert same["status"] == "PASS" and "1 non-finite values in patch's" in same["detail"]


@pytest.mark.parametrize("kw", [{"steps": 0}, {"batch": 0}, {"cases": ()}, {"cases": ("noreuse_compiled",)},
                                {"cases": ("fast_graph",)}, {"atol": -1.0}])
def test_smoke_settings_refuse_bad_values(kw):
    with pytest.raises(DqarError):
        smoke.SmokeSettings(**kw)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--cases", "nothing_graph"], ["--device", "tpu"]])
def test_smoke_bad_input_exits_2(argv, tmp_path, capsys):
    assert main(["smoke", "--out", str(tmp_path / "s"), *argv]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_time_follows_work_fails_a_reusing_case_no_faster_than_no_reuse():
    """On CUDA: 64% reused at 1.10x no reuse's time (the H200's host-bound full_dqar of 2026-12-04) is a FAIL."""
    cuda = torch.device("cuda")
    case = lambda t, skipped: {"stats": {"flops_skipped_fraction": skipped}, "replay_s": t}  # noqa: E731
    assert smoke._time_follows_work("full_dqar_graph", case(0.110, 0.64), 0.100, cuda)["status"] == "FAIL"
    passed = smoke._time_follows_work("full_dqar_graph", case(0.050, 0.64), 0.100, cuda)
    assert passed["status"] == "PASS" and "bound 0.68" in passed["detail"]
    assert smoke._time_follows_work("full_dqar_graph", case(0.05, 0.64), None, cuda)["status"] == "n/a"  # nothing to compare
    assert smoke._time_follows_work("noreuse_graph", case(0.1, 0.0), None, cuda)["status"] == "n/a"
    assert smoke._time_follows_work("full_dqar_graph", case(0.05, 0.64), 0.1, torch.device("cpu"))["status"] == "n/a (cpu)"
