"""Dynamic reuse: signals, the online gate, calibrated plans and CFG-branch sharing on tiny models."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import dqar
from dqar.tuning.calibrate import derive_plan, estimated_error, record_trace
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.engine.decider import TracingDecider
from dqar.errors import DqarError
from dqar.engine.flops import attention_flops, dit_shape
from dqar.generate import generate
from dqar.models import DIT_SCHEDULER_CONFIG
from dqar.engine.plan import build_plan, load_plan, max_run_staleness, save_plan
from dqar.engine.signals import (alpha_bar_at, attention_with_entropy, dit_alphas_cumprod, predicted_x0, prediction_snr,
                          scheduler_snr, subsample_rows)

from conftest import E, CountSyncs, NoSync, drive, make_pipe, make_tiny_transformer, pipe_images, tiny_loaded

OPEN = dict(gate=True, schedule="constant", warmup_frac=0.1, entropy_tau=1.0, snr_min=0.0, snr_max=1e9)


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=4)


def reused(model, **cfg):
    with dqar.enable(model, ReuseConfig(**cfg)) as h:
        drive(model, h)
        return h.stats.reused


# ----- signals -----------------------------------------------------------------------------------
def full_map_entropy(attn, x):
    """Entropy of the whole attention map, computed the slow way."""
    b, t, _ = x.shape
    q = attn.to_q(x).view(b, t, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(x).view(b, t, attn.heads, -1).transpose(1, 2)
    a = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, T, T)
    return float(-(a * torch.log(a + 1e-12)).sum(-1).mean() / math.log(t))


def test_entropy_on_all_rows_equals_the_full_map_and_a_subsample_is_close(model):
    attn = model.transformer_blocks[1].attn1
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(0)) * 3  # (B, T, C)
    with torch.no_grad():
        out, ent_all = attention_with_entropy(attn, x, subsample_rows(16, 16))
        _, ent_sub = attention_with_entropy(attn, x, subsample_rows(16, 8))
        full = full_map_entropy(attn, x)
        stock = attn(x)
    assert torch.allclose(out, stock, atol=1e-6)  # the gate's own attention matches diffusers' processor
    assert abs(float(ent_all) - full) < 1e-6
    assert abs(float(ent_sub) - full) < 0.05 * full and 0 < full < 1  # sharp maps (x * 3): half the rows within 5%
    assert len(subsample_rows(16, 6)) == 6


def test_scheduler_and_prediction_snr():
    sched = DDIMScheduler.from_config(DIT_SCHEDULER_CONFIG)
    alphas = sched.alphas_cumprod.float()
    assert torch.allclose(dit_alphas_cumprod(), alphas)
    t = torch.full((4,), 500)
    a = alpha_bar_at(alphas, t)
    assert torch.isclose(scheduler_snr(a), alphas[500] / (1 - alphas[500]))
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    x0_hat = predicted_x0(x_t, torch.cat([eps, eps], 1), a, "epsilon")  # learned-sigma channels ignored
    assert torch.allclose(x0_hat, x0, atol=1e-4)
    assert torch.isclose(prediction_snr(x_t, x0_hat), x0.pow(2).sum() / (x_t - x0).pow(2).sum(), rtol=1e-4)


def test_trace_records_every_signal(model):
    with dqar.enable(model, ReuseConfig(), decider=_trace_decider()) as h:
        drive(model, h)
        trace = h.engine.decider.signals.trace()
    assert trace.entropy.shape == (E, 4) and np.all((trace.entropy > 0) & (trace.entropy <= 1))
    assert np.isnan(trace.change[0]).all() and np.isfinite(trace.change[1:]).all() and (trace.change[1:] > 0).all()
    assert np.all(np.diff(trace.snr_scheduler) > 0)  # timesteps fall, SNR rises
    assert np.isfinite(trace.snr_prediction).all()


def _trace_decider():
    return TracingDecider(entropy_rows=4)


# ----- the online gate ----------------------------------------------------------------------------
@pytest.mark.parametrize("ramp", [{}, {"refresh_interval": 4, "refresh_interval_end": 2, "max_staleness": 3}])
def test_open_gate_executes_the_schedule_plan(model, ramp):
    cfg = ReuseConfig(**OPEN, **ramp)
    with dqar.enable(model, cfg) as h:
        drive(model, h)
        mask = np.array(h.stats.reuse_mask, dtype=bool)
    assert np.array_equal(mask, build_plan(replace(cfg, gate=False), E, 4).mask) and mask.sum() > 0


def test_lower_tau_means_less_reuse(model):
    with dqar.enable(model, ReuseConfig(), decider=_trace_decider()) as h:
        drive(model, h)
        entropy = h.engine.decider.signals.trace().entropy  # (E, L) with full compute
    taus = (1.0, float(np.median(entropy)), float(entropy.min()) - 1e-3, 0.0)
    counts = [reused(model, **{**OPEN, "entropy_tau": tau}) for tau in taus]
    assert counts[0] > counts[1] > counts[2] == counts[3] == 0, (taus, counts)


def test_narrower_snr_window_means_less_reuse(model):
    windows = [(0.0, 1e9), (0.0, 1.0), (0.0, 0.05), (2.0, 3.0)]
    counts = [reused(model, **{**OPEN, "snr_min": a, "snr_max": b}) for a, b in windows]
    assert counts[0] > counts[1] > counts[2] > counts[3] == 0, counts


def test_prediction_snr_source_moves_decisions(model):
    wide = reused(model, **{**OPEN, "snr_source": "prediction"})
    narrow = reused(model, **{**OPEN, "snr_source": "prediction", "snr_max": 1e-3})
    assert wide > narrow == 0


def test_gate_makes_at_most_one_host_sync_per_evaluation(model):
    counter = CountSyncs()
    with dqar.enable(model, ReuseConfig(**{**OPEN, "refresh_interval": 4, "max_staleness": 3})) as h:
        drive(model, h, guard=counter)
        stats = h.stats
    assert 0 < counter.count <= E - 1  # evaluation 0 always computes: nothing to read
    assert stats.host_syncs == counter.count


def test_gate_preset_uses_the_gate(model):
    cfg = dqar.preset("gate")
    assert cfg.gate and cfg.cache_dtype == "int8"
    counter = CountSyncs()
    with dqar.enable(model, cfg) as h:
        drive(model, h, guard=counter)
        assert h.stats.host_syncs == counter.count <= E


# ----- CFG-branch sharing -------------------------------------------------------------------------
SHARE = dict(warmup_frac=1.0, cfg_share="cond_to_uncond", cfg_share_from=0.5)  # no reuse across steps, sharing only


def test_cfg_sharing_changes_outputs_and_skips_flops(model):
    ref = drive(model)
    with dqar.enable(model, ReuseConfig(**SHARE)) as h:
        out = drive(model, h)
        stats = h.stats
    start = E // 2
    assert all(torch.equal(a, b) for a, b in zip(ref[:start], out[:start]))
    assert torch.allclose(out[start][:2], ref[start][:2], atol=1e-5)  # the conditional half computed as before
    assert not torch.allclose(out[start][2:], ref[start][2:])  # the unconditional half got its attention
    assert stats.reused == 0 and stats.cfg_shared == (E - start) * 4
    per_layer = attention_flops(dit_shape(model.config, 8, 8))
    assert stats.flops_skipped == stats.cfg_shared * 2 * per_layer  # half of the 4 rows, per shared layer
    assert stats.host_syncs == 1  # guidance layout read once from the labels (no sampler told it)


def test_cfg_sharing_directions_differ_and_compose_with_reuse(model):
    outs = {}
    for direction in ("cond_to_uncond", "uncond_to_cond"):
        with dqar.enable(model, ReuseConfig(**{**SHARE, "cfg_share": direction})) as h:
            outs[direction] = drive(model, h)[-1]
    assert not torch.allclose(outs["cond_to_uncond"], outs["uncond_to_cond"])
    plan_cfg = ReuseConfig(schedule="constant", warmup_frac=0.1)
    with dqar.enable(model, plan_cfg) as h:
        drive(model, h)
        plain = h.stats
    with dqar.enable(model, replace(plan_cfg, cfg_share="cond_to_uncond", cfg_share_from=0.5)) as h:
        drive(model, h)
        both = h.stats
    computed_late = (E - E // 2) * 4 - int(np.array(plain.reuse_mask)[E // 2:].sum())
    assert both.reuse_mask == plain.reuse_mask and both.cfg_shared == computed_late > 0
    assert both.flops_skipped > plain.flops_skipped


def test_cfg_sharing_needs_a_guided_batch(model):
    ref = drive(model)
    with dqar.enable(model, ReuseConfig(**SHARE)) as h:
        h.begin_generation(E, guided=False)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 4, 8, 8, generator=g)
        with torch.no_grad():
            out = model(x, timestep=torch.full((4,), 999), class_labels=torch.tensor([3, 7, 1000, 1000])).sample
        assert torch.equal(out, ref[0]) and h.stats.cfg_shared == 0


# ----- calibrated plans ---------------------------------------------------------------------------
def test_derive_plan_hits_the_target_and_respects_staleness():
    rng = np.random.default_rng(0)
    change = rng.uniform(0.01, 0.1, size=(20, 6))
    change[:, 2] = 1e-4  # a layer that barely changes is reused first
    change[0] = np.nan
    for ms in (1, 2, 3):
        plan = derive_plan(change, target_fraction=0.3, max_staleness=ms)
        assert plan.mask.sum() == round(0.3 * 120) and not plan.mask[0].any()
        assert max_run_staleness(plan.mask) <= ms
    small = derive_plan(change, target_fraction=0.1, max_staleness=3)
    assert small.mask[:, 2].sum() == small.mask.sum()
    budget = derive_plan(change, error_budget=0.05, max_staleness=3)
    assert 0 < budget.mask.sum() and estimated_error(change, budget.mask).max() <= 0.05
    with pytest.raises(DqarError, match="target"):
        derive_plan(change)


def test_calibrate_save_sample_reproduces_the_plan_without_syncs(tmp_path):
    from dqar.tuning.calibrate import calibrate

    loaded = tiny_loaded()
    run = RunConfig(sample=SampleConfig(steps=8, cfg=4.0, seed=5))
    cal = calibrate(loaded, [1, 2], run, target_fraction=0.4, max_staleness=2)
    assert cal.plan.key == {"model": "tiny", "sampler": "ddim", "steps": 8, "granularity": "attention", "forecast_order": 0,
                            "forecast_axis": "evaluation", "forecast_kind": "taylor", "structure": "cells",
                            "streams": [1, 1, 1]}  # the 3-layer DiT: one output stream per layer (f96ee2e)
    assert np.isfinite(cal.trace.change[1:]).all()
    path = tmp_path / "plan.json"
    save_plan(cal.plan, path)
    assert np.array_equal(load_plan(path).mask, cal.plan.mask)
    use = replace(run, reuse=ReuseConfig(plan_file=str(path)), sample=replace(run.sample, seed=9))
    gen = generate(loaded, [3, 4], use)
    assert gen.stats.reused == cal.plan.mask.sum() > 0 and gen.stats.host_syncs == 0
    with dqar.enable(loaded.transformer, use.reuse) as h:  # inside model evaluations: no read at all
        drive(loaded.transformer, h, evaluations=8, guard=NoSync())
        assert h.stats.reused == cal.plan.mask.sum()
    with pytest.raises(DqarError, match="steps"):
        generate(loaded, [3], replace(use, sample=replace(use.sample, steps=10)))
    with pytest.raises(DqarError, match="sampler"):
        generate(loaded, [3], replace(use, sample=replace(use.sample, sampler="dpm")))


def test_record_trace_leaves_the_model_untouched():
    loaded = tiny_loaded()
    run = RunConfig(sample=SampleConfig(steps=4, cfg=4.0, seed=1))
    before = generate(loaded, [1], replace(run, reuse=ReuseConfig(enabled=False))).output.images
    trace = record_trace(loaded, [1], run)
    after = generate(loaded, [1], replace(run, reuse=ReuseConfig(enabled=False))).output.images
    assert torch.equal(before, after) and trace.entropy.shape == (4, 3)


# ----- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"entropy_tau": 1.5}, "entropy_tau"),
    ({"snr_min": -1.0}, "snr_min"),
    ({"snr_min": 2.0, "snr_max": 1.0}, "snr_min"),
    ({"snr_source": "schedular"}, "did you mean 'scheduler'"),
    ({"entropy_rows": 0}, "entropy_rows"),
    ({"cfg_share": "cond"}, "cfg_share"),
    ({"cfg_share_from": 1.2}, "cfg_share_from"),
    ({"gate": True, "plan_file": "p.json"}, "exclusive"),
    ({"cfg_share": "cond_to_uncond", "target": "kv"}, "cfg_share"),
])
def test_gate_and_sharing_config_is_validated(bad, match):
    with pytest.raises(DqarError, match=match):
        ReuseConfig(**bad)


# ----- other targets and granularities, stock pipeline ----------------------------------------------
@pytest.mark.parametrize("extra", [dict(granularity="block"), dict(target="kv")])
def test_gate_runs_with_block_granularity_and_kv_target(model, extra):
    cfg = ReuseConfig(**{**OPEN, **extra})
    with dqar.enable(model, cfg) as h:
        drive(model, h)
        mask = np.array(h.stats.reuse_mask, dtype=bool)
        assert 0 < h.stats.host_syncs < E
    assert np.array_equal(mask, build_plan(replace(cfg, gate=False), E, 4).mask)  # open thresholds: the schedule's plan
    with dqar.enable(model, replace(cfg, entropy_tau=0.0)) as h:
        drive(model, h)
        assert h.stats.reused == 0


def test_cfg_sharing_inside_whole_block_reuse(model):
    with dqar.enable(model, ReuseConfig(schedule="constant", granularity="block", cfg_share="uncond_to_cond")) as h:
        drive(model, h)
        s = h.stats
    assert s.reused > 0 and s.cfg_shared == (E - E // 2) * 4 - int(np.array(s.reuse_mask)[E // 2:].sum())


def test_gate_and_sharing_inside_a_stock_pipeline():
    pipe = make_pipe()
    ref = pipe_images(pipe)
    with dqar.enable(pipe, ReuseConfig(**{**OPEN, "cfg_share": "cond_to_uncond"})) as h:
        out = pipe_images(pipe)
        s = h.stats
    assert s.evaluations == 10 and s.reused > 0 and s.cfg_shared > 0
    assert s.host_syncs <= 1 + s.evaluations  # gate: <= 1 per evaluation; CFG layout: 1 per generation
    assert not np.array_equal(out, ref)
