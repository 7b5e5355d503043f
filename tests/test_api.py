"""The Python API inside a stock DiTPipeline (step information from the forward inputs, reset per call); executor "auto"."""
import numpy as np
import pytest
import torch

import dqar
import dqar.engine.api as api
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.engine.decider import TracingDecider
from dqar.engine.graph import GraphEngine
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.sampling import sample

from conftest import NoSync, make_pipe, make_tiny_transformer, pipe_images, tiny_loaded

CFG = ReuseConfig(schedule="constant", cache_dtype="int8", warmup_frac=0.2)


def test_enable_on_a_stock_pipeline_reuses_and_resets_between_calls():
    pipe = make_pipe()
    ref = pipe_images(pipe)
    handle = dqar.enable(pipe, CFG)
    first = pipe_images(pipe)
    s1 = handle.stats
    second = pipe_images(pipe)
    s2 = handle.stats
    assert s1.evaluations == 10 and s1.reuse_fraction > 0.3
    assert s1.reuse_mask == s2.reuse_mask
    assert np.array_equal(first, second)  # state reset at each call
    assert not np.array_equal(first, ref)
    other_steps = pipe_images(pipe, steps=6)  # a new step count builds a new plan
    assert handle.stats.evaluations == 6 and other_steps.shape == ref.shape
    handle.disable()
    assert np.array_equal(pipe_images(pipe), ref)


def test_stats_are_summarized_once_per_generation():
    """After a pipeline call (no end_generation there) the first read summarizes; every later read is that object."""
    pipe = make_pipe()
    with dqar.enable(pipe, CFG) as handle:
        pipe_images(pipe)
        first = handle.stats
        with NoSync():  # the INT8 error is read back once, by the first read only
            again = handle.stats
        assert again is first and first.quant_error > 0
        pipe_images(pipe)
        assert handle.stats is not first and handle.stats is handle.stats
        assert handle.stats.reuse_mask == first.reuse_mask


def test_pipeline_and_dqar_sampler_agree_under_reuse():
    pipe = make_pipe()
    with dqar.enable(pipe, CFG):
        via_pipe = pipe_images(pipe)
    with dqar.enable(pipe.transformer, CFG) as handle:
        ours = sample(pipe.transformer, [1, 2], scheduler=pipe.scheduler, steps=10, cfg=4.0, vae=pipe.vae,
                      generator=torch.Generator().manual_seed(0), null_class=1000, reuse=handle)
    assert np.array_equal(via_pipe, ours.images.permute(0, 2, 3, 1).numpy())


def test_default_config_is_full_dqar():
    pipe = make_pipe()
    with dqar.enable(pipe) as handle:
        assert handle.config == dqar.preset("full_dqar")


# ----- executor "auto" ------------------------------------------------------------------------------
PLAN_CFG = ReuseConfig(schedule="constant", warmup_frac=0.0)


def test_auto_is_the_default_and_runs_patch_on_the_cpu():
    """On the CPU "auto" is the patch executor (the graph one compiles 30-150 s per configuration there)."""
    model = make_tiny_transformer(num_layers=2)
    assert not api.on_cuda(model) and not api.on_cuda(torch.nn.Identity())
    for kwargs in ({}, {"executor": "auto"}):
        with dqar.enable(model, PLAN_CFG, **kwargs) as h:
            assert h.executor == "patch" and type(h.engine) is api.ReuseEngine
    with dqar.enable(model, PLAN_CFG, executor="graph") as h:
        assert h.executor == "graph"


@pytest.mark.parametrize("cfg,decider,want", [
    (PLAN_CFG, None, "graph"),
    (ReuseConfig(cfg_share="cond_to_uncond", forecast_order=2), None, "graph"),
    (ReuseConfig(granularity="block", cache_dtype="int8"), None, "graph"),
    (ReuseConfig(gate=True), None, "patch"),
    (ReuseConfig(target="kv"), None, "patch"),
    (ReuseConfig(nonfinite_guard=True), None, "patch"),
    (PLAN_CFG, TracingDecider(entropy_rows=4), "patch"),
], ids=["plan", "cfg_share_order2", "block_int8", "gate", "kv", "guard", "tracing"])
def test_auto_picks_graph_on_cuda_where_it_runs(monkeypatch, cfg, decider, want):
    """With the parameters on CUDA (the check monkeypatched, no GPU needed): graph wherever the graph executor accepts."""
    monkeypatch.setattr(api, "on_cuda", lambda transformer: True)
    model = make_tiny_transformer(num_layers=2)
    with dqar.enable(model, cfg, decider=decider) as h:
        assert h.executor == want and isinstance(h.engine, GraphEngine) == (want == "graph")


def test_auto_on_non_dit_blocks_is_patch(monkeypatch):
    monkeypatch.setattr(api, "on_cuda", lambda transformer: True)
    model = make_tiny_transformer(num_layers=1)
    model.transformer_blocks[0].norm_type = "layer_norm"
    with dqar.enable(model, PLAN_CFG) as h:
        assert h.executor == "patch"


def test_unknown_executor_names_auto():
    with pytest.raises(DqarError, match="auto, patch, fused, compiled, graph"):
        dqar.enable(make_tiny_transformer(num_layers=1), PLAN_CFG, executor="jit")


def test_generate_reports_the_executor_and_keeps_the_baseline_bare():
    """generate(executor=None) is "auto" (patch on the CPU); a disabled config under auto or patch attaches nothing."""
    loaded = tiny_loaded()
    sample_cfg = SampleConfig(steps=4, cfg=4.0, seed=7)
    on = RunConfig(reuse=PLAN_CFG, sample=sample_cfg)
    default, patch = generate(loaded, [1, 2], on), generate(loaded, [1, 2], on, executor="patch")
    assert default.executor == patch.executor == "patch" and torch.equal(default.output.images, patch.output.images)
    assert default.stats.reused > 0
    off = RunConfig(reuse=ReuseConfig(enabled=False), sample=sample_cfg)
    for executor in (None, "auto", "patch"):
        gen = generate(loaded, [1, 2], off, executor=executor)
        assert gen.stats is None and gen.executor is None
    fused = generate(loaded, [1, 2], off, executor="fused")  # the fused no-reuse path is attached
    assert fused.executor == "fused" and fused.stats.reused == 0
