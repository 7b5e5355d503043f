"""Issue 21 item 5, "auto never storms": what "auto" picks and why, the fallback's shared layer functions,
one forecast-weights upload per generation, buffers outside inference mode.

Most tests run the graph executor's code eagerly (`compiled_copy` patched to a plain copy of the function, counted),
so they take seconds; tests/test_graph.py checks the real compiled graphs.
"""
import pytest
import torch

import dqar
import dqar.engine.api as api
import dqar.engine.graph as graph
import dqar.engine.variants as variants
from dqar.engine import history as H
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig

from conftest import drive, make_tiny_transformer

E = 6
FORECAST = ReuseConfig(schedule="constant", granularity="block", forecast_order=2, refresh_interval=3, max_staleness=2,
                       warmup_frac=0.0)


@pytest.fixture
def eager(monkeypatch):
    """`compiled_copy` in graph and variants returns the function uncompiled; the names of the copies made are recorded."""
    made = []

    def copy(fn, name, mode=None):
        made.append(name)
        return variants.own_code(fn, name)

    monkeypatch.setattr(graph, "compiled_copy", copy)
    monkeypatch.setattr(variants, "compiled_copy", copy)
    return made


def _patch_outputs(model, cfg, evaluations=E):
    with dqar.enable(model, cfg, executor="patch") as h:
        return drive(model, h, evaluations=evaluations)


def _close(got, want):
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


# ----- 1. "auto" and its reason -------------------------------------------------------------------
def test_auto_picks_compiled_when_the_plan_has_more_patterns_than_max_patterns(monkeypatch):
    monkeypatch.setattr(api, "on_cuda", lambda transformer: True)
    model = make_tiny_transformer(num_layers=4)
    many = ReuseConfig(schedule="linear", max_patterns=1)
    with dqar.enable(model, many) as h:
        assert h.executor == "compiled" and type(h.engine) is api.ReuseEngine
        assert h.executor_reason.startswith("compiled: ") and "above max_patterns 1" in h.executor_reason
        assert "bound_patterns = true" in h.executor_reason
    with dqar.enable(model, ReuseConfig(schedule="linear", max_patterns=1, bound_patterns=True)) as h:
        assert h.executor == "graph" and h.executor_reason == "graph: 1 patterns fit max_patterns 1"
    with dqar.enable(model, ReuseConfig(schedule="linear")) as h:
        assert h.executor == "graph" and h.executor_reason.startswith("graph: ") and "fit max_patterns 16" in h.executor_reason
    # cfg_share runs on graph or patch only: beyond the bound it is patch
    with dqar.enable(model, ReuseConfig(schedule="linear", max_patterns=1, cfg_share="cond_to_uncond")) as h:
        assert h.executor == "patch" and "above max_patterns 1" in h.executor_reason


def test_auto_counts_patterns_at_the_run_configs_steps(monkeypatch):
    """With a RunConfig the count uses its sample steps (else SampleConfig's default); one evaluation has one pattern."""
    monkeypatch.setattr(api, "on_cuda", lambda transformer: True)
    model = make_tiny_transformer(num_layers=4)
    cfg = ReuseConfig(schedule="linear", max_patterns=1)
    with dqar.enable(model, RunConfig(reuse=cfg, sample=SampleConfig(steps=1))) as h:
        assert h.executor == "graph" and h.executor_reason == "graph: 1 patterns fit max_patterns 1"
    with dqar.enable(model, RunConfig(reuse=cfg, sample=SampleConfig(steps=20))) as h:
        assert h.executor == "compiled" and "over 20 evaluations" in h.executor_reason


def test_auto_reasons_off_cuda_unsupported_and_asked(monkeypatch):
    model = make_tiny_transformer(num_layers=2)
    with dqar.enable(model, ReuseConfig()) as h:
        assert h.executor == "patch" and h.executor_reason == "patch: not on CUDA"
    with dqar.enable(model, ReuseConfig(), executor="fused") as h:
        assert h.executor_reason == "fused: asked for"
    monkeypatch.setattr(api, "on_cuda", lambda transformer: True)
    with dqar.enable(model, ReuseConfig(target="kv")) as h:
        assert h.executor == "patch" and "K/V" in h.executor_reason


# ----- 2. the fallback shares its compiled layer functions ------------------------------------------
def test_fallback_shares_one_compiled_copy_per_decision_among_layers(eager):
    """8 layers, every evaluation beyond one pattern falls back: copies per (reuse, store, share), not per layer."""
    model = make_tiny_transformer(num_layers=8)
    cfg = ReuseConfig(schedule="linear", warmup_frac=0.0, max_patterns=1)
    with dqar.enable(model, cfg, executor="graph") as h:
        outs, stats = drive(model, h, evaluations=E), h.stats
        layer_copies = [n for n in eager if not n.startswith("dqar_pattern_")]
        assert stats.fallback_evaluations > 0 and len(layer_copies) <= 5 < 8  # per decision, whatever the layer count
        assert len(layer_copies) == len(h.engine.layer_kernels.copies)
    _close(outs, _patch_outputs(model, cfg))


# ----- 3. forecast weights: one upload per generation ---------------------------------------------
@pytest.fixture
def uploads(monkeypatch):
    seen = []
    real = graph.device_weights

    def count(weights, device):
        seen.append(len(weights))
        return real(weights, device)

    monkeypatch.setattr(graph, "device_weights", count)
    return seen


def test_forecast_weights_go_up_once_per_generation(eager, uploads):
    model = make_tiny_transformer(num_layers=2)
    with dqar.enable(model, FORECAST, executor="graph") as h:
        first, stats = drive(model, h, evaluations=E), h.stats
        assert len(uploads) == 1 and uploads[0] == E * 2 * 3  # the (E, L, K) table
        second = drive(model, h, evaluations=E)
        assert len(uploads) == 2
    assert stats.forecasts > 0
    want = _patch_outputs(model, FORECAST)
    _close(first, want), _close(second, want)


def test_no_weights_upload_at_forecast_order_zero(eager, uploads):
    model = make_tiny_transformer(num_layers=2)
    cfg = ReuseConfig(schedule="constant", warmup_frac=0.0)
    with dqar.enable(model, cfg, executor="graph") as h:
        outs = drive(model, h, evaluations=E)
    assert uploads == []
    _close(outs, _patch_outputs(model, cfg))


def test_weight_table_matches_the_host_bookkeeping():
    """The simulated table is what `StaticHistory.step` computes evaluation by evaluation."""
    spec = H.Spec(block=True, kind="model", slots=3)
    rows = [(False, False), (True, False), (True, True), (False, True), (True, True), (True, False)]
    stores = [(True, True)] * len(rows)
    positions = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    table = H.weight_table(2, 2, 3, rows, stores, positions)
    hist = H.StaticHistory(spec, 2, 2)
    hist.use((1, 4, 8), torch.float32, torch.device("cpu"))
    for e, row in enumerate(rows):
        hist.at(positions[e])
        row = tuple(r and hist.has(i) for i, r in enumerate(row))
        assert hist.step(row, stores[e]) == table[e]
    assert hist.forecasts > 0


# ----- 4. buffers are plain tensors, whatever the caller's mode -------------------------------------
@pytest.mark.parametrize("kind,order", [("model", 0), ("model", 2), ("int8", 0), ("anchored", 1)])
def test_buffers_allocated_under_inference_mode_are_not_inference_tensors(kind, order):
    spec = H.Spec(block=False, kind=kind, slots=order + 1)
    hist = H.StaticHistory(spec, 2, order)
    with torch.inference_mode():
        layers, error_sum, bad = hist.use((2, 4, 8), torch.float32, torch.device("cpu"))
    tensors = [*(t for layer in layers for t in layer), error_sum, bad]
    assert tensors and not any(t.is_inference() for t in tensors)
    with torch.inference_mode():
        assert not hist.weight_buffer(torch.device("cpu")).is_inference()
