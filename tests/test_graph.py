"""The graph executor: one compiled whole-model graph per plan pattern, equal to the patch executor, bounded, no recompiles.

Compiling on CPU is slow: a 2-layer model, few evaluations and few patterns per test.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import dqar
from dqar.engine.config import ReuseConfig
from dqar.engine.plan import Plan, build_plan
from dqar.errors import DqarError

from conftest import NoSync, drive, make_tiny_transformer

E = 6
GRAPH_FIELDS = ("graphs", "fallback_evaluations", "fallback_rows", "compile_seconds", "quant_error")
# a computing layer the plan reuses always stores under the graph executor (one graph per row): it may hold more entries
HELD = ("cache_bytes", "cache_bytes_peak", "cache_entries_peak")


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=2)


def _compare(model, cfg, graph_outs, graph_stats, atol=1e-5):
    with dqar.enable(model, cfg, executor="patch") as h:
        ref, ref_stats = drive(model, h, evaluations=E), h.stats
    want, got = ref_stats.to_dict(), graph_stats.to_dict()
    for name in GRAPH_FIELDS + HELD:
        want.pop(name), got.pop(name)
    assert got == want  # same mask, forecasts, FLOPs, host syncs
    assert graph_stats.cache_bytes_peak >= ref_stats.cache_bytes_peak > 0
    if cfg.cache_dtype == "int8":
        assert graph_stats.quant_error == pytest.approx(ref_stats.quant_error, rel=1e-3)
    for a, b in zip(ref, graph_outs):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-5)


def test_graph_equals_patch_and_never_recompiles(model):
    """Attention reuse, model-dtype copy: equal outputs; a second generation compiles nothing and matches bit for bit."""
    cfg = ReuseConfig(schedule="constant", warmup_frac=0.0)
    torch._dynamo.reset()
    counters.clear()
    with dqar.enable(model, cfg, executor="graph") as h:
        first, stats = drive(model, h, evaluations=E), h.stats
        graphs, frames = counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]
        second, again = drive(model, h, evaluations=E), h.stats
        assert counters["stats"]["unique_graphs"] == graphs and counters["stats"]["calls_captured"] == frames
    with dqar.enable(model, cfg, executor="graph") as h:  # a new handle on the same model: its graphs and buffers again
        fourth = drive(model, h, evaluations=E)
        assert h.stats.compile_seconds == 0.0
        assert counters["stats"]["unique_graphs"] == graphs and counters["stats"]["calls_captured"] == frames
        third = drive(model, h, evaluations=E, guard=NoSync())  # no host syncs (last: dynamo runs frames eagerly under a dispatch mode)
    assert all(torch.equal(a, d) for a, d in zip(first, fourth))
    assert not counters["graph_break"]
    assert stats.graphs == 2 and stats.fallback_evaluations == 0 and stats.compile_seconds > 0
    assert again.compile_seconds == 0.0 and again.graphs == 2
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for a, c in zip(first, third):
        torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)
    _compare(model, cfg, first, stats)


@pytest.mark.parametrize("cfg", [
    ReuseConfig(schedule="constant", granularity="block", forecast_order=2, refresh_interval=3, max_staleness=2, warmup_frac=0.0),
    ReuseConfig(schedule="constant", forecast_order=1, forecast_axis="timestep", refresh_interval=3, max_staleness=2, warmup_frac=0.0),
], ids=["block_order2", "attention_order1"])
def test_graph_forecasts_equal_patch(model, cfg):
    with dqar.enable(model, cfg, executor="graph") as h:
        outs, stats = drive(model, h, evaluations=E), h.stats
    assert stats.forecasts > 0
    _compare(model, cfg, outs, stats)


def test_graph_int8_anchored_history(model):
    """INT8 history that forecasts (the anchored codec): close to the patch executor within one INT8 step, same bytes."""
    cfg = ReuseConfig(schedule="constant", granularity="block", cache_dtype="int8", quant_mode="token", forecast_order=2,
                      refresh_interval=3, max_staleness=2, warmup_frac=0.0)
    with dqar.enable(model, cfg, executor="graph") as h:
        outs, stats = drive(model, h, evaluations=E), h.stats
    assert stats.quant_error > 0
    _compare(model, cfg, outs, stats, atol=2e-3)


class Guided:
    """A handle whose generations are begun as CFG batches (no look at the labels: no host read)."""

    def __init__(self, handle):
        self.handle = handle

    def begin_generation(self, evaluations):
        self.handle.begin_generation(evaluations, guided=True)

    def end_generation(self):
        self.handle.end_generation()


SHARE = dict(schedule="constant", warmup_frac=0.0, cfg_share_from=0.5)


@pytest.mark.parametrize("share", ["cond_to_uncond", "uncond_to_cond"])
@pytest.mark.parametrize("extra", [{}, dict(forecast_order=2, refresh_interval=3, max_staleness=2)], ids=["copy", "order2"])
def test_graph_shares_cfg_halves_like_patch(model, share, extra):
    """cfg_share from half-way: the patch executor's outputs and stats, shared layers counted; no recompiles, no host syncs."""
    cfg = ReuseConfig(**SHARE, cfg_share=share, **extra)
    counters.clear()
    with dqar.enable(model, cfg, executor="graph") as h:
        outs, stats = drive(model, h, evaluations=E), h.stats
        graphs, frames = counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]
        again = drive(model, h, evaluations=E)  # a second generation compiles nothing
        assert counters["stats"]["unique_graphs"] == graphs and counters["stats"]["calls_captured"] == frames
        assert h.stats.compile_seconds == 0.0 and h.stats.cfg_shared == stats.cfg_shared
        assert all(torch.equal(a, b) for a, b in zip(outs, again))
        quiet = drive(model, Guided(h), evaluations=E, guard=NoSync())  # known CFG batches: no host read (last, see above)
    assert stats.cfg_shared > 0 and stats.reused > 0 and stats.fallback_evaluations == 0
    assert stats.graphs == len({(r, e >= E // 2) for e, r in enumerate(map(tuple, stats.reuse_mask))})  # (row, share) patterns
    assert (stats.forecasts > 0) == bool(extra)
    _compare(model, cfg, outs, stats)
    for a, b in zip(outs, quiet):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with dqar.enable(model, ReuseConfig(**SHARE, **extra), executor="graph") as h:  # the share acts: other outputs without it
        plain = drive(model, h, evaluations=E)
    for a, b in zip(outs[: E // 2], plain):  # before cfg_share_from: the same patterns
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[-1], plain[-1], atol=1e-3)


def test_graph_shares_cfg_at_block_granularity(model):
    """Whole-block reuse with cfg_share (the patch executor shares attn1 inside computed blocks): equal to it."""
    cfg = ReuseConfig(**SHARE, granularity="block", cfg_share="uncond_to_cond")
    with dqar.enable(model, cfg, executor="graph") as h:
        outs, stats = drive(model, h, evaluations=E), h.stats
    assert stats.cfg_shared > 0 and stats.reused > 0
    _compare(model, cfg, outs, stats)


def test_graph_without_cfg_batches_counts_no_sharing(model):
    """An odd batch (no CFG halves) under cfg_share: nothing shared, every evaluation on a graph of the plain patterns."""
    cfg = ReuseConfig(**SHARE, cfg_share="cond_to_uncond", max_patterns=2)
    x, labels = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7, 1])
    outs = {}
    for executor in ("graph", "patch"):
        with dqar.enable(model, cfg, executor=executor) as h, torch.no_grad():
            h.begin_generation(E)
            outs[executor] = [model(x, timestep=torch.full((3,), 999 - 80 * e), class_labels=labels).sample for e in range(E)]
            h.end_generation()
            assert h.stats.cfg_shared == 0
            if executor == "graph":
                assert h.stats.fallback_evaluations == 0 and h.stats.graphs == 2
    for a, b in zip(outs["patch"], outs["graph"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_patterns_beyond_the_bound_fall_back(model):
    """max_patterns = 1: the most frequent row gets a graph, the others run per block, are counted and named."""
    mask = np.array([[0, 0], [1, 0], [0, 0], [1, 1], [0, 0], [1, 0]], dtype=bool)
    plan = Plan(mask=mask)
    assert plan.num_patterns == 3
    cfg = ReuseConfig(max_patterns=1)
    with dqar.enable(model, cfg, plan=plan, executor="graph") as h:
        outs, stats = drive(model, h, evaluations=E), h.stats
    assert stats.graphs == 1
    assert stats.fallback_evaluations == 3 and stats.fallback_rows == ["R.", "RR"]
    with dqar.enable(model, cfg, plan=plan, executor="patch") as h:
        ref = drive(model, h, evaluations=E)
    for a, b in zip(ref, outs):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_a_bounded_schedule_never_falls_back(model):
    """bound_patterns: a linear schedule with more rows than max_patterns is bounded, so every evaluation runs a graph."""
    cfg = ReuseConfig(schedule="linear", warmup_frac=0.0, refresh_interval=3, max_staleness=2, max_patterns=2)
    assert build_plan(cfg, E, 2).num_patterns > 2
    for bounded, fallbacks in ((False, lambda n: n > 0), (True, lambda n: n == 0)):
        with dqar.enable(model, replace(cfg, bound_patterns=bounded), executor="graph") as h:
            drive(model, h, evaluations=E)
            assert fallbacks(h.stats.fallback_evaluations) and h.stats.graphs <= 2, (bounded, h.stats.fallback_evaluations)


def test_num_patterns_counts_distinct_rows():
    mask = np.zeros((10, 4), dtype=bool)
    assert Plan(mask=mask.copy()).num_patterns == 1
    mask[1::2, :2] = True
    mask[9] = True
    assert Plan(mask=mask).num_patterns == 3


@pytest.mark.parametrize("cfg,match", [
    (ReuseConfig(target="kv"), "K/V"),
    (ReuseConfig(gate=True), "executor = 'patch'"),
    (ReuseConfig(nonfinite_guard=True), "executor = 'compiled'"),
])
def test_graph_refuses_what_it_cannot_run(model, cfg, match):
    with pytest.raises(DqarError, match=match):
        dqar.enable(model, cfg, executor="graph")


def test_graph_refuses_non_dit_blocks():
    other = make_tiny_transformer(num_layers=1)
    other.transformer_blocks[0].norm_type = "layer_norm"
    with pytest.raises(DqarError, match="executor = 'patch'"):
        dqar.enable(other, ReuseConfig(), executor="graph")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_max_patterns_below_one_is_refused(bad):
    with pytest.raises(DqarError, match="max_patterns"):
        ReuseConfig(max_patterns=bad)


def test_graph_inside_a_stock_pipeline_loop():
    """dqar.enable(pipe, executor='graph') inside DiTPipeline's own loop (CFG batch): the patch executor's images."""
    from conftest import make_pipe, pipe_images

    pipe = make_pipe()
    pipe.set_progress_bar_config(disable=True)
    cfg = ReuseConfig(schedule="constant", granularity="block", forecast_order=1, refresh_interval=3, max_staleness=2)
    with dqar.enable(pipe, cfg, executor="patch"):
        ref = pipe_images(pipe, steps=6)
    with dqar.enable(pipe, cfg, executor="graph") as h:
        got = pipe_images(pipe, steps=6)
        assert h.stats.reused > 0 and h.stats.fallback_evaluations == 0
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_dqar_sample_runs_the_graph_executor_and_refuses_what_it_cannot_run(tmp_path, capsys):
    from dqar.cli import main as cli_main
    from dqar.models import save_pipeline_folder

    folder = save_pipeline_folder(tmp_path / "m", make_tiny_transformer(num_layers=2, num_classes=10, in_channels=1, learned_sigma=False))
    common = ["sample", "--model", str(folder), "--steps", "6", "--classes", "0", "--quiet"]
    assert cli_main([*common, "--preset", "quant_cache_only", "--executor", "graph", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "stats.json").is_file()
    capsys.readouterr()
    assert cli_main([*common, "--preset", "gate", "--executor", "graph", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "patch" in err


def test_dqar_sample_default_executor_is_auto_and_printed(tmp_path, capsys, monkeypatch):
    """`dqar sample` without --executor: patch on the CPU, graph where the parameters are on CUDA (check monkeypatched)."""
    import json

    import dqar.engine.api as api
    from dqar.cli import main as cli_main
    from dqar.models import save_pipeline_folder

    folder = save_pipeline_folder(tmp_path / "m", make_tiny_transformer(num_layers=2, num_classes=10, in_channels=1, learned_sigma=False))
    common = ["sample", "--model", str(folder), "--steps", "6", "--classes", "0", "--preset", "quant_cache_only", "--quiet"]
    seen = {}
    for name, cuda in (("cpu", False), ("cuda", True)):
        monkeypatch.setattr(api, "on_cuda", lambda transformer, cuda=cuda: cuda)
        capsys.readouterr()
        assert cli_main([*common, "--out", str(tmp_path / name)]) == 0
        record = json.loads((tmp_path / name / "stats.json").read_text())
        seen[name] = record["executor"], record["stats"]["graphs"], capsys.readouterr().out
    assert seen["cpu"][:2] == ("patch", 0) and "on the patch executor" in seen["cpu"][2]
    assert seen["cuda"][0] == "graph" and seen["cuda"][1] > 0 and "on the graph executor" in seen["cuda"][2]
