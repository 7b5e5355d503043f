"""The gate on the verify signal (`gate_signal = "probe_error"`, dqar/engine/gate.py): the probe block's forecast error
against τ inside the schedule's eligibility and staleness cap, one counted host read per evaluation."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import dqar
from dqar.engine.config import ReuseConfig
from dqar.engine.gate import GateDecider, ProbeGateDecider
from dqar.engine.plan import build_plan, max_run_staleness
from dqar.engine.verify import relative_l1
from dqar.errors import DqarError

from conftest import E, CountSyncs, drive, make_tiny_transformer

L = 4
BASE = dict(gate=True, gate_signal="probe_error", schedule="constant", warmup_frac=0.1, refresh_interval=4, max_staleness=3,
            granularity="block", forecast_order=1)
OPEN = dict(BASE, verify_scale=1e6)  # τ = 0.03 × 1e6: every measured error passes (τ = ∞)


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=L)


def run(model, guard=None, **cfg):
    """(reuse mask (E, L), stats, decider) of one driven generation with the patch executor."""
    with dqar.enable(model, ReuseConfig(**cfg), executor="patch") as h:
        drive(model, h, guard=guard)
        return np.array(h.stats.reuse_mask, dtype=bool), h.stats, h.engine.decider


def test_the_gate_config_builds_the_probe_error_gate():
    assert isinstance(GateDecider(ReuseConfig(**BASE)), ProbeGateDecider)
    assert type(GateDecider(ReuseConfig(gate=True))) is GateDecider  # the entropy gate by default


@pytest.mark.parametrize("probe", ["first", 2])
def test_infinite_tau_executes_the_schedule_plan_except_the_probe(model, probe):
    mask, stats, d = run(model, **OPEN, verify_probe=probe)
    p = 0 if probe == "first" else probe
    plan = build_plan(replace(ReuseConfig(**OPEN), gate=False, gate_signal="entropy"), E, L).mask  # (E, L)
    others = [l for l in range(L) if l != p]
    assert not mask[:, p].any()  # the probe computes at every evaluation
    if p == 0:
        assert np.array_equal(mask[:, others], plan[:, others]) and mask.sum() > 0
    else:  # the layers before the probe follow the last verdict read: the one of the evaluation before
        assert np.array_equal(mask[:, p + 1:], plan[:, p + 1:])
        passed_before = np.r_[False, np.isfinite(d.errors[:-1])]  # (E,) the evaluation before read ε (and passed: τ = ∞)
        assert mask[:, :p].any() and not mask[~passed_before, :p].any()
    assert max_run_staleness(mask) <= 3


def test_the_verdict_follows_the_probe_error(model):
    _, _, open_d = run(model, **OPEN)
    tau = float(np.nanmedian(open_d.errors))  # ε measured at τ = ∞
    mask, stats, d = run(model, **BASE, verify_tau=((0.0, tau), (1.0, tau)), verify_scale=1.0)
    read = np.isfinite(d.errors)
    assert read.any() and 0 < mask.sum() < run(model, **OPEN)[0].sum()
    after = mask[:, 1:].any(axis=1)  # (E,) the layers after the probe reused
    assert np.array_equal(after[read], d.errors[read] <= tau)  # reuse exactly where ε <= τ
    assert not after[~read].any()  # no history measured: refresh
    assert mask.sum() == 0 or max_run_staleness(mask) <= 3  # the staleness cap still holds


def test_zero_tau_reuses_nothing(model):
    mask, stats, _ = run(model, **BASE, verify_scale=0.0)
    assert mask.sum() == 0 and stats.host_syncs > 0


def test_decisions_differ_from_the_entropy_gate(model):
    _, _, open_d = run(model, **OPEN)
    tau = float(np.nanmedian(open_d.errors))
    probe_mask, _, _ = run(model, **BASE, verify_tau=((0.0, tau), (1.0, tau)))
    entropy_mask, _, _ = run(model, **{**BASE, "gate_signal": "entropy", "entropy_tau": 1.0, "snr_max": 1e9})
    assert entropy_mask[:, 0].any() and not probe_mask[:, 0].any()
    assert not np.array_equal(probe_mask, entropy_mask)


def test_one_counted_host_read_per_evaluation_with_candidates(model):
    counter = CountSyncs()
    mask, stats, d = run(model, guard=counter, **OPEN)
    reads = int(np.isfinite(d.errors).sum())
    assert 0 < reads <= E - 1 and stats.host_syncs == counter.count == reads
    assert reads == int(d.active.sum())  # every evaluation with candidates after the probe reads ε once


def test_the_probe_error_is_the_relative_l1_against_the_copy(model):
    """At order 0 the forecast is a copy of the probe's last stored residual: ε equals `verify.relative_l1` of it."""
    cfg = ReuseConfig(**{**OPEN, "forecast_order": 0})
    residuals = []
    block = model.transformer_blocks[0]
    hook = block.register_forward_hook(lambda m, args, kwargs, out: residuals.append((out - args[0]).detach()) if args
                                       else residuals.append((out - kwargs["hidden_states"]).detach()), with_kwargs=True)
    try:
        with dqar.enable(model, cfg, executor="patch") as h:
            drive(model, h)
            d, mask = h.engine.decider, np.array(h.stats.reuse_mask, dtype=bool)
    finally:
        hook.remove()
    assert len(residuals) == E
    e = int(np.flatnonzero(np.isfinite(d.errors))[0])
    stored = max(i for i in range(e) if not mask[i].any())  # the probe's history: its last output where nothing reused
    expect = float(relative_l1(residuals[e], residuals[stored]))
    assert d.errors[e] == pytest.approx(expect, rel=1e-4)


@pytest.mark.parametrize("bad, match", [
    ({"gate": True, "gate_signal": "probe"}, "did you mean 'probe_error'"),
    ({"gate_signal": "probe_error"}, "gate = false"),
    ({"gate": True, "gate_signal": "probe_error", "target": "kv"}, "not K/V"),
])
def test_gate_signal_is_validated(bad, match):
    with pytest.raises(DqarError, match=match):
        ReuseConfig(**bad)


def test_a_probe_outside_the_model_is_refused(model):
    with pytest.raises(DqarError, match="does not exist"):
        run(model, **OPEN, verify_probe=9)


@pytest.mark.parametrize("tau", [0.3, 0.45, 1e6])
def test_on_a_constant_schedule_it_decides_as_the_verifying_decider(model, tau):
    """Probe "first", every layer eligible, cap m: the gate's rows are the verifying decider's with verify_max_interval m."""
    knots = ((0.0, tau), (1.0, tau))
    gate_mask, _, g = run(model, **{**BASE, "verify_tau": knots, "verify_scale": 1.0})
    verify = dict(BASE, gate=False, gate_signal="entropy", decider="verify", verify_tau=knots, verify_max_interval=3)
    verify_mask, _, v = run(model, **verify)
    assert np.array_equal(gate_mask, verify_mask) and np.array_equal(np.isnan(g.errors), np.isnan(v.errors))
    assert np.allclose(g.errors[np.isfinite(g.errors)], v.errors[np.isfinite(v.errors)])


@pytest.mark.parametrize("executor", ["fused", "compiled"])
def test_the_dit_kernels_gate_on_the_probe_error_as_patch_does(model, executor):
    """τ = 0.27 (scale 9) lies ≥ 8% from every error the tiny model reads, so a last-bit difference flips no verdict."""
    ref_mask, ref, _ = run(model, **dict(BASE, verify_scale=9))
    with dqar.enable(model, ReuseConfig(**dict(BASE, verify_scale=9)), executor=executor) as h:
        assert h.executor == executor
        drive(model, h)
        got, stats = np.array(h.stats.reuse_mask, dtype=bool), h.stats
    assert 0 < ref_mask.sum() < ref_mask.size - E  # some eligible cells reuse, some refresh
    np.testing.assert_array_equal(got, ref_mask)
    assert stats.host_syncs == ref.host_syncs and stats.flops_skipped == ref.flops_skipped
