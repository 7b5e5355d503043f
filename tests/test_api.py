"""The Python API inside a stock DiTPipeline: step information from the forward inputs, reset per call."""
import numpy as np
import torch

import dqar
from dqar.engine.config import ReuseConfig
from dqar.sampling import sample

from conftest import NoSync, make_pipe, pipe_images

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
