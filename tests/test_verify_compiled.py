"""The verifying decider on the compiled executors: "fused" / "compiled" (the DiT's block kernels) and "flow_compiled"
(Flux: patch's dispatch over compiled stock blocks) take the same decisions as on patch, measure the same errors and
give the same outputs within float tolerance, never recompile in a second generation, and read one scalar per deciding
evaluation. "graph" splits an evaluation it decides into two graphs (up to the probe, after it) with the verdict read
between them, and decides as patch does.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import dqar
from dqar.engine.api import compiled_takes, make_decider
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.models import load_model

from conftest import E, TAU_HUGE as HUGE, TAU_ZERO as ZERO, CountSyncs, drive, make_tiny_transformer

L = 4
START = int(np.ceil(0.2 * E))  # the first evaluation inside the reuse window
CONFIGS = {
    # block granularity, anchored INT8 per-channel history, forecast order 2: the adaptive preset's engine
    "adaptive": replace(preset("adaptive"), warmup_frac=0.2, cooldown_frac=0.0),
    # attention granularity, plain INT8 per-token history (the cache encodes the probe's output outside the graph)
    "attention_int8": ReuseConfig(decider="verify", granularity="attention", forecast_order=1, warmup_frac=0.2, cooldown_frac=0.0,
                                  cache_dtype="int8", quant_mode="token", verify_max_interval=3),
}
TOLERANCE = {"fused": dict(atol=2e-5, rtol=1e-4), "compiled": dict(atol=2e-3, rtol=1e-3)}  # as tests/test_compiled.py (INT8)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return make_tiny_transformer(num_layers=L)


def run(model, cfg, executor, guard=None):
    decider = make_decider(cfg)
    with dqar.enable(model, cfg, decider=decider, executor=executor) as h:
        assert h.executor == executor
        outs = drive(model, h, guard=guard)
        return outs, h.stats, decider


def mask(stats) -> np.ndarray:
    return np.array(stats.reuse_mask, dtype=bool)  # (E, L)


def tau_with_margin(model, cfg) -> tuple:
    """A constant τ that reuses some layers on patch and lies ≥ 5% away from every error read there (no verdict flips
    on a last-bit difference), with the patch run at it."""
    errors = run(model, replace(cfg, verify_tau=ZERO), "patch")[2].errors
    for q in (50, 40, 60, 30, 70, 80):
        tau = float(np.nanpercentile(errors, q)) * 1.02
        knots = ((0.0, tau), (1.0, tau))
        ref = run(model, replace(cfg, verify_tau=knots), "patch")
        read = ref[2].errors[np.isfinite(ref[2].errors)]
        if ref[1].reused and (np.abs(read - tau) > 0.05 * tau).all():
            return knots, ref
    pytest.fail(f"no τ with a 5% margin among the errors {errors}")


@pytest.mark.parametrize("executor", ["fused", "compiled"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_dit_kernels_decide_as_patch(model, name, executor):
    cfg = CONFIGS[name]
    knots, (ref_outs, ref, ref_decider) = tau_with_margin(model, cfg)
    outs, stats, decider = run(model, replace(cfg, verify_tau=knots), executor)
    assert 0 < stats.reused < E * L
    np.testing.assert_array_equal(mask(stats), mask(ref))
    np.testing.assert_array_equal(decider.decisions, ref_decider.decisions)
    np.testing.assert_allclose(decider.errors, ref_decider.errors, rtol=1e-3, atol=1e-6)  # NaN where neither read
    assert stats.host_syncs == ref.host_syncs == int(np.isfinite(decider.errors).sum())
    assert stats.flops_skipped == ref.flops_skipped and stats.cache_bytes_peak == ref.cache_bytes_peak
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, **TOLERANCE[executor])


@pytest.mark.parametrize("max_interval", [1, 3])
def test_on_compiled_a_huge_threshold_reuses_up_to_max_interval_and_zero_never(model, max_interval):
    cfg = replace(CONFIGS["adaptive"], verify_max_interval=max_interval)
    _, stats, _ = run(model, replace(cfg, verify_tau=HUGE), "compiled")
    want = np.zeros((E, L), dtype=bool)
    for e in range(START, E):
        want[e, 1:] = (e - START) % (max_interval + 1) != max_interval  # max_interval reuses, then a refresh
    np.testing.assert_array_equal(mask(stats), want)
    assert stats.host_syncs == E - START - int((~want[START:, 1]).sum())  # a refresh the bound forces reads nothing
    _, stats, decider = run(model, replace(cfg, verify_tau=ZERO), "compiled")
    assert stats.reused == 0 and stats.host_syncs == E - START and (decider.errors[START:] > 0).all()


def test_host_syncs_are_one_per_deciding_evaluation_and_counted_honestly(model):
    """The fused kernels uncompiled run under a dispatch mode that counts every device→host scalar read."""
    knots, _ = tau_with_margin(model, CONFIGS["adaptive"])
    counter = CountSyncs()
    _, stats, decider = run(model, replace(CONFIGS["adaptive"], verify_tau=knots), "fused", guard=counter)
    assert stats.host_syncs == counter.count == int(np.isfinite(decider.errors).sum()) > 0
    assert counter.count <= E - START


def test_a_second_compiled_generation_never_recompiles(model):
    cfg = replace(CONFIGS["adaptive"], verify_tau=tau_with_margin(model, CONFIGS["adaptive"])[0])
    first = run(model, cfg, "compiled")[1]
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = run(model, cfg, "compiled")[1]
    assert counters["stats"]["unique_graphs"] == graphs and second.reused > 0
    assert first.to_dict() == second.to_dict()


def test_graph_splits_a_decided_evaluation_at_the_probe_as_patch_decides(model):
    """Two graphs per decided evaluation (up to the probe, after it), the verdict read between them: the same decisions,
    errors and syncs as patch, outputs within compiled tolerance; a second generation compiles nothing."""
    cfg = CONFIGS["adaptive"]
    knots, (ref_outs, ref, ref_decider) = tau_with_margin(model, cfg)
    cfg = replace(cfg, verify_tau=knots)
    outs, stats, decider = run(model, cfg, "graph")
    assert 0 < stats.reused < E * L and stats.fallback_evaluations == 0 and stats.graphs >= 3  # plain, head, tail
    np.testing.assert_array_equal(mask(stats), mask(ref))
    np.testing.assert_array_equal(decider.decisions, ref_decider.decisions)
    np.testing.assert_allclose(decider.errors, ref_decider.errors, rtol=1e-3, atol=1e-6)
    assert stats.host_syncs == ref.host_syncs == int(np.isfinite(decider.errors).sum())
    assert stats.flops_skipped == ref.flops_skipped
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, **TOLERANCE["compiled"])
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(model, cfg, "graph")[1]
    assert counters["stats"]["unique_graphs"] == graphs and again.reuse_mask == stats.reuse_mask
    assert again.host_syncs == stats.host_syncs


def test_graph_refuses_other_probe_readers_in_one_line_and_compiled_takes_verify(model):
    from dqar.engine.graph import check_graph_supported

    class Reader:  # a decider that, like the probe-error gate, reads the probe inside the forward
        verifies, name, needs = True, "the probe-error gate", None

    with pytest.raises(DqarError, match="the probe-error gate reads its probe block's error") as exc:
        check_graph_supported(CONFIGS["adaptive"], Reader(), model)
    assert "\n" not in str(exc.value)
    assert compiled_takes(CONFIGS["adaptive"], make_decider(CONFIGS["adaptive"]), model)


# ----- flow_compiled (Flux, true CFG as cond / uncond forwards) ---------------------------------------------------
STEPS = 6
FLUX = replace(preset("adaptive"), warmup_frac=0.2, cooldown_frac=0.0, verify_max_interval=2)
FLUX_START = int(np.ceil(0.2 * STEPS))


@pytest.fixture(scope="module")
def flux():
    torch.set_num_threads(1)
    return load_model("random-flux-tiny")


def flux_run(loaded, cfg, executor):
    decider = make_decider(cfg)
    g = generate(loaded, [0, 1], RunConfig(reuse=cfg, sample=SampleConfig(steps=STEPS, cfg=4.0, seed=0)), decider=decider,
                 executor=executor)
    assert g.executor == executor
    return g, decider


def flux_tau(flux) -> tuple:
    """A τ reusing some layers on patch, ≥ 5% away from every error read there, with the patch run at it."""
    errors = flux_run(flux, replace(FLUX, verify_tau=ZERO), "patch")[1].errors
    for q in (50, 40, 60, 30, 70):
        tau = float(np.nanpercentile(errors, q)) * 1.02
        ref = flux_run(flux, replace(FLUX, verify_tau=((0.0, tau), (1.0, tau))), "patch")
        read = ref[1].errors[np.isfinite(ref[1].errors)]
        if ref[0].stats.reused and (np.abs(read - tau) > 0.05 * tau).all():
            return ((0.0, tau), (1.0, tau)), ref
    pytest.fail(f"no τ with a 5% margin among the errors {errors}")


def test_flow_compiled_decides_as_patch_and_never_recompiles(flux):
    knots, (ref, ref_decider) = flux_tau(flux)
    cfg = replace(FLUX, verify_tau=knots)
    got, decider = flux_run(flux, cfg, "flow_compiled")
    assert 0 < got.stats.reused and got.stats.reuse_mask == ref.stats.reuse_mask
    np.testing.assert_array_equal(decider.decisions, ref_decider.decisions)
    np.testing.assert_allclose(decider.errors, ref_decider.errors, rtol=1e-3, atol=1e-6)
    assert got.stats.host_syncs == ref.stats.host_syncs == int(np.isfinite(decider.errors).sum()) <= STEPS - FLUX_START
    assert (decider.replays == 1).all()  # the uncond forward replays each step's decision: one read per step
    assert got.stats.flops_skipped == ref.stats.flops_skipped
    torch.testing.assert_close(got.output.latents, ref.output.latents, atol=2e-3, rtol=1e-3)
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        again, _ = flux_run(flux, cfg, "flow_compiled")
    assert counters["stats"]["unique_graphs"] == graphs and again.stats.to_dict() == got.stats.to_dict()


def test_flow_compiled_acts_on_the_threshold(flux):
    never = flux_run(flux, replace(FLUX, verify_tau=ZERO), "flow_compiled")[0]
    always = flux_run(flux, replace(FLUX, verify_tau=HUGE), "flow_compiled")[0]
    assert never.stats.reused == 0 and never.stats.host_syncs == STEPS - FLUX_START
    assert always.stats.reused > 0 and always.stats.host_syncs < never.stats.host_syncs  # a forced refresh reads nothing
