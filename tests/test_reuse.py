"""The reuse engine: it executes the plan, reads back the stored form, detaches exactly, syncs never."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import dqar
from dqar.engine.config import ReuseConfig
from dqar.errors import DqarError
from dqar.engine.plan import build_plan

from conftest import E, NoSync, drive, make_tiny_transformer


@pytest.fixture
def model():
    return make_tiny_transformer(num_layers=4)


def test_engine_executes_the_plan_exactly(model):
    cfg = ReuseConfig(schedule="linear", warmup_frac=0.1, refresh_interval=3, max_staleness=2)
    h = dqar.enable(model, cfg)
    drive(model, h)
    expected = build_plan(cfg, E, 4).mask
    assert np.array_equal(np.array(h.stats.reuse_mask, dtype=bool), expected)
    assert h.stats.reused == expected.sum() > 0
    assert h.stats.per_layer_reused == expected.sum(axis=0).tolist()


def test_reuse_changes_outputs_and_baseline_does_not(model):
    ref = drive(model)
    h = dqar.enable(model, ReuseConfig(enabled=False))
    assert all(torch.equal(a, b) for a, b in zip(ref, drive(model, h)))
    h.disable()
    h = dqar.enable(model, ReuseConfig(schedule="constant"))
    out = drive(model, h)
    assert not torch.equal(out[-1], ref[-1])
    assert torch.equal(out[0], ref[0])  # evaluation 0 always computes


def test_detach_restores_bit_identical_outputs_and_attach_twice_raises(model):
    ref = drive(model)
    h = dqar.enable(model, "full_dqar")
    with pytest.raises(DqarError, match="already attached"):
        dqar.enable(model, "full_dqar")
    drive(model, h)
    h.disable()
    assert all(torch.equal(a, b) for a, b in zip(ref, drive(model)))
    assert "forward" not in model.transformer_blocks[0].attn1.__dict__
    with dqar.enable(model, "scheduling_only") as h2:  # can attach again after detach
        drive(model, h2)
    assert all(torch.equal(a, b) for a, b in zip(ref, drive(model)))


def test_state_resets_between_generations(model):
    h = dqar.enable(model, "full_dqar")
    first = drive(model, h)
    s1 = h.stats
    second = drive(model, h)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert h.stats.reuse_mask == s1.reuse_mask


def test_stats_are_computed_once_and_summarize_a_generation_in_progress(model):
    h = dqar.enable(model, ReuseConfig(schedule="constant", cache_dtype="int8"))
    drive(model, h)  # ends the generation
    ended = h.stats
    with NoSync():
        assert h.stats is ended and h.end_generation() is ended
    h.begin_generation(E)
    assert h.stats is ended  # nothing ran in the new generation yet
    with torch.no_grad():
        x, labels = torch.randn(4, 4, 8, 8), torch.tensor([3, 7, 1000, 1000])
        for e in range(5):
            model(x, timestep=torch.full((4,), 999 - 80 * e), class_labels=labels)
    partial = h.stats
    assert partial.evaluations == 5 and partial.reuse_mask == ended.reuse_mask[:5]
    h.disable()


def test_int8_cache_is_what_is_read_back(model):
    outs = {}
    for dtype in ("model", "int8"):
        with dqar.enable(model, ReuseConfig(schedule="constant", cache_dtype=dtype, quant_mode="tensor")) as h:
            outs[dtype] = drive(model, h)
            stats = h.stats
        if dtype == "int8":
            assert 0 < stats.quant_error < 0.02
            int8_bytes = stats.cache_bytes_peak
        else:
            assert stats.quant_error is None
            model_bytes = stats.cache_bytes_peak
    assert not torch.equal(outs["model"][-1], outs["int8"][-1])
    assert torch.allclose(outs["model"][-1], outs["int8"][-1], atol=0.1)
    assert int8_bytes < 0.3 * model_bytes  # fp32 model: INT8 values are a quarter, plus one scale per tensor


@pytest.mark.parametrize("mode", ["tensor", "channel", "head", "token"])
def test_each_quant_mode_changes_the_result(model, mode):
    with dqar.enable(model, ReuseConfig(schedule="constant", cache_dtype="int8", quant_mode=mode)) as h:
        out = drive(model, h)[-1]
    with dqar.enable(model, ReuseConfig(schedule="constant", cache_dtype="int8", quant_mode="tensor" if mode != "tensor" else "token")) as h:
        other = drive(model, h)[-1]
    assert not torch.equal(out, other)


def test_kv_target_matches_attention_when_computing_and_differs_when_reusing(model):
    ref = drive(model)
    with dqar.enable(model, ReuseConfig(target="kv", enabled=False)) as h:
        same = drive(model, h)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, same))
    with dqar.enable(model, ReuseConfig(target="kv", schedule="constant")) as h:
        kv = drive(model, h)
        kv_stats = h.stats
    with dqar.enable(model, ReuseConfig(target="attention", schedule="constant")) as h:
        attn = drive(model, h)
        attn_stats = h.stats
    assert not torch.allclose(kv[-1], attn[-1]) and not torch.allclose(kv[-1], ref[-1])
    assert kv_stats.flops_skipped < attn_stats.flops_skipped


def test_kv_mixed_keeps_k_in_model_dtype(model):
    peaks = {}
    for mixed, dtype in ((False, "int8"), (True, "model")):
        with dqar.enable(model, ReuseConfig(target="kv", schedule="constant", cache_dtype=dtype, kv_mixed=mixed)) as h:
            drive(model, h)
            peaks[mixed] = h.stats.cache_bytes_peak
    with dqar.enable(model, ReuseConfig(target="kv", schedule="constant", cache_dtype="model")) as h:
        drive(model, h)
        full = h.stats.cache_bytes_peak
    assert peaks[False] < peaks[True] < full


def test_block_granularity_skips_more_and_changes_more(model):
    ref = drive(model)
    results = {}
    for gran in ("attention", "block"):
        with dqar.enable(model, ReuseConfig(schedule="constant", granularity=gran)) as h:
            results[gran] = (drive(model, h)[-1], h.stats)
    (a_out, a_st), (b_out, b_st) = results["attention"], results["block"]
    assert a_st.reused == b_st.reused
    assert b_st.flops_skipped > 2 * a_st.flops_skipped
    assert (b_out - ref[-1]).norm() > (a_out - ref[-1]).norm() > 0


def test_stats_count_flops_and_bytes(model):
    with dqar.enable(model, ReuseConfig(schedule="constant", cache_dtype="model")) as h:
        drive(model, h)
        s = h.stats
    assert s.evaluations == E and s.layers == 4
    assert 0 < s.flops_skipped < s.flops_total
    assert s.cache_bytes_peak == 4 * (4 * 16 * 32 * 4)  # 4 layers x (B=4, T=16, C=32) fp32
    assert s.host_syncs == 0


@pytest.mark.parametrize("preset", ["scheduling_only", "quant_cache_only", "full_dqar"])
def test_no_host_syncs_on_the_plan_path(model, preset):
    cfg = dqar.preset(preset)
    h = dqar.enable(model, replace(cfg, gate=False))  # full_dqar's gate syncs once per evaluation: tests/test_gate.py
    drive(model, h, guard=NoSync())  # every model evaluation with reuse; stats are read after
    assert h.stats.reused > 0


def test_no_sync_mode_catches_a_sync(model):
    with pytest.raises(AssertionError, match="host sync"):
        with NoSync():
            torch.ones(2).sum().item()


def test_too_many_evaluations_and_no_generation_are_clear_errors(model):
    h = dqar.enable(model, "full_dqar")
    with pytest.raises(DqarError, match="no generation"):
        drive(model)
    with pytest.raises(DqarError, match="called 4 times"):
        h.begin_generation(3)
        drive(model, evaluations=4)


def _poison(handle, layer):
    """After each store, replace layer `layer`'s cached entry with NaN (as a corrupted cache would hold)."""
    cache_put = type(handle.engine.state.cache).put_encoded

    def put(self, l, entry, error=None):
        if l == layer:
            entry = tuple(torch.full_like(v, float("nan")) if isinstance(v, torch.Tensor) else v for v in entry)
        cache_put(self, l, entry, error)
    return put


@pytest.mark.parametrize("guard", [True, False])
def test_nonfinite_cache_recomputes_with_guard_and_is_counted_without(model, guard, monkeypatch):
    from dqar.engine.cache import LayerCache

    cfg = ReuseConfig(schedule="constant", cache_dtype="model", nonfinite_guard=guard)
    ref_h = dqar.enable(model, cfg)
    clean = drive(model, ref_h)
    planned = ref_h.stats.reused
    ref_h.disable()
    h = dqar.enable(model, cfg)
    h.begin_generation(E)
    monkeypatch.setattr(LayerCache, "put_encoded", _poison(h, 1))
    if guard:
        out = drive(model, h)
        s = h.stats
        assert s.nonfinite_recomputes == build_plan(cfg, E, 4).mask[:, 1].sum() > 0  # every planned reuse of layer 1
        assert s.per_layer_reused[1] == 0 and s.reused < planned
        assert all(torch.isfinite(o).all() for o in out)
        assert s.host_syncs <= E
    else:
        with pytest.warns(RuntimeWarning, match="NaN/Inf"):
            out = drive(model, h)
            s = h.stats
        assert s.nonfinite_reused >= build_plan(cfg, E, 4).mask[:, 1].sum() > 0  # NaN then spreads to later layers' stores
        assert s.host_syncs == 0 and not torch.isfinite(out[-1]).all()
    h.disable()
    assert torch.isfinite(clean[-1]).all()
