"""Fused and compiled executors: same decisions, same outputs as the patched path, no recompiles, no syncs."""
import pytest
import torch
from torch._dynamo.utils import counters

import dqar
from dqar.engine.config import ReuseConfig
from dqar.errors import DqarError

from conftest import NoSync, drive, make_tiny_transformer

CONFIGS = {
    "off": ReuseConfig(enabled=False),
    "attn_model": ReuseConfig(schedule="constant", cache_dtype="model"),
    "attn_int8_token": ReuseConfig(schedule="linear", cache_dtype="int8", quant_mode="token"),
    "attn_int8_head": ReuseConfig(schedule="constant", cache_dtype="int8", quant_mode="head"),
    "block_int8": ReuseConfig(schedule="constant", granularity="block", cache_dtype="int8", quant_mode="channel"),
    "block_model": ReuseConfig(schedule="constant", granularity="block"),
}


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=4)


# compiled graphs round differently in the last bit; under INT8 a value at a rounding boundary then lands one INT8
# step (amax / 127 of its group) apart, which the following evaluations carry: outputs of magnitude ~2 move by < 2e-3
TOLERANCE = {"fused": dict(atol=2e-5, rtol=1e-4), "compiled": dict(atol=1e-4, rtol=1e-3), "compiled_int8": dict(atol=2e-3, rtol=1e-3)}


@pytest.mark.parametrize("executor", ["fused", "compiled"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_patched(model, name, executor):
    """Same plan through each executor: identical stats (mask, bytes, FLOPs, host syncs, INT8 error), close outputs."""
    cfg = CONFIGS[name]
    with dqar.enable(model, cfg) as h:
        ref, ref_stats = drive(model, h), h.stats
    with dqar.enable(model, cfg, executor=executor) as h:
        out, stats = drive(model, h), h.stats
    assert stats.reuse_mask == ref_stats.reuse_mask
    assert stats.cache_bytes_peak == ref_stats.cache_bytes_peak
    want, got = ref_stats.to_dict(), stats.to_dict()
    want_error, got_error = want.pop("quant_error"), got.pop("quant_error")
    assert got == want
    if cfg.cache_dtype == "int8" and ref_stats.reused:
        assert got_error == pytest.approx(want_error, rel=1e-3) and got_error > 0
    else:
        assert got_error is None and want_error is None
    tolerance = TOLERANCE["compiled_int8" if executor == "compiled" and cfg.cache_dtype == "int8" else executor]
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, **tolerance)


def test_compiled_agrees_with_eager_and_never_recompiles(model):
    cfg = CONFIGS["attn_int8_token"]
    with dqar.enable(model, cfg) as h:
        eager = drive(model, h)
    torch._dynamo.reset()
    counters.clear()
    with dqar.enable(model, cfg, executor="compiled") as h:
        first = drive(model, h)
        graphs = counters["stats"]["unique_graphs"]
        frames = counters["stats"]["calls_captured"]
        second = drive(model, h)  # a second generation: no new graphs
        assert counters["stats"]["unique_graphs"] == graphs
        assert counters["stats"]["calls_captured"] == frames
        drive(model, h, guard=NoSync())  # and no host syncs on the way
    # compute + quantized compute + INT8 reuse: one graph each, shared by every block and evaluation
    assert graphs <= 3
    assert not counters["graph_break"]
    for a, b, c in zip(eager, first, second):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
        assert torch.equal(b, c)


def test_fused_path_refuses_kv_target(model):
    with pytest.raises(DqarError, match="K/V"):
        dqar.enable(model, ReuseConfig(target="kv"), executor="fused")


def test_unknown_executor(model):
    with pytest.raises(DqarError, match="executor"):
        dqar.enable(model, "full_dqar", executor="jit")


def test_many_configurations_in_one_process_never_pass_the_recompile_limit():
    """An ablation runs dozens of configurations through the shared compiled kernels: each codec variant (history length,
    INT8 mode, error tracking) compiles as its own function. The limit is lowered so that two configurations would pass it."""
    model = make_tiny_transformer(num_layers=2)
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=2):
        for track in (True, False):
            cfg = ReuseConfig(schedule="constant", warmup_frac=0.1, cache_dtype="int8", quant_mode="tensor", forecast_order=2,
                              refresh_interval=3, max_staleness=2, track_quant_error=track, granularity="block")
            with dqar.enable(model, cfg, executor="compiled") as h:
                drive(model, h, evaluations=6)
    limits = [k for k in counters["unimplemented"] if "recompile limit" in k.lower()]
    assert counters["stats"]["unique_graphs"] > 2 and not limits, limits
