"""The verifying decider on Flux (dual- then single-stream blocks, true CFG as "cond" / "uncond" forwards).

On random-flux-tiny and the trained embedded-flux, at 4-6 steps: τ = 0 never reuses, a huge τ reuses up to
verify_max_interval, a different τ schedule changes the mask, both CFG branches execute the decision taken on the
first branch's probe (one read per step), host syncs are counted, two generations are identical.
"""
from dataclasses import replace

import numpy as np
import pytest
import torch

import dqar
from dqar.engine import reuse as reuse_module
from dqar.engine.api import make_decider
from dqar.engine.config import RunConfig, SampleConfig, preset
from dqar.engine.verify import stream_error
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.models import load_model

from conftest import CountSyncs

STEPS = 6
BASE = replace(preset("adaptive"), warmup_frac=0.2, cooldown_frac=0.0, verify_max_interval=2)
START = int(np.ceil(0.2 * STEPS))  # first evaluation inside the reuse window
HUGE = ((0.0, 1e9), (1.0, 1e9))
ZERO = ((0.0, 0.0), (1.0, 0.0))


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model("random-flux-tiny")


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return load_model("embedded-flux")


def run(loaded, cfg, steps=STEPS, monkeypatch=None):
    """One generation of two prompts with true CFG; returns (Generation, decider, per-branch executed masks)."""
    decider, seen = make_decider(cfg), []
    if monkeypatch is not None:
        original = reuse_module.branches.ran

        def ran(st):
            out = original(st)
            seen[:] = [b.executed.copy() for b in out]  # (E, L) per branch, at the generation's summary
            return out
        monkeypatch.setattr(reuse_module.branches, "ran", ran)
    g = generate(loaded, [0, 1], RunConfig(reuse=cfg, sample=SampleConfig(steps=steps, cfg=4.0)), decider=decider, executor="patch")
    return g, decider, seen


def mask(g) -> np.ndarray:
    return np.array(g.stats.reuse_mask, dtype=bool)  # (E, L)


@pytest.mark.parametrize("which", ["tiny", "trained"])
def test_a_zero_threshold_never_reuses_and_reads_once_per_step(which, request):
    loaded = request.getfixturevalue(which)
    steps = STEPS if which == "tiny" else 4
    g, decider, _ = run(loaded, replace(BASE, verify_tau=ZERO), steps)
    start = int(np.ceil(0.2 * steps))
    assert g.executor == "patch" and g.stats.reused == 0
    assert g.stats.host_syncs == steps - start and (decider.errors[start:] > 0).all()  # one read per step, not per forward
    assert (decider.replays == 1).all()  # the uncond forward of each step replays its decision


@pytest.mark.parametrize("max_interval", [1, 3])
def test_a_huge_threshold_reuses_up_to_max_interval(tiny, max_interval):
    g, _, _ = run(tiny, replace(BASE, verify_tau=HUGE, verify_max_interval=max_interval))
    m, layers = mask(g), mask(g).shape[1]
    want = np.zeros((STEPS, layers), dtype=bool)
    for e in range(START, STEPS):
        want[e, 1:] = (e - START) % (max_interval + 1) != max_interval  # max_interval reuses, then a refresh
    assert (m == want).all(), m.astype(int)
    assert g.stats.host_syncs == STEPS - START - int((~want[START:, 1]).sum())  # a forced refresh reads nothing


def median_error(loaded, steps=STEPS) -> float:
    return float(np.nanmedian(run(loaded, replace(BASE, verify_tau=ZERO), steps)[1].errors))


@pytest.mark.parametrize("which", ["tiny", "trained"])
def test_the_tau_schedule_changes_the_executed_mask(which, request):
    loaded = request.getfixturevalue(which)
    mid = median_error(loaded)
    masks = {name: mask(run(loaded, replace(BASE, verify_tau=knots))[0]) for name, knots in {
        "low": ((0.0, mid / 4), (1.0, mid / 4)), "mid": ((0.0, mid), (1.0, mid)), "high": ((0.0, 4 * mid), (1.0, 4 * mid))}.items()}
    assert masks["low"].sum() < masks["mid"].sum() <= masks["high"].sum()
    assert len({m.tobytes() for m in masks.values()}) >= 2


@pytest.mark.parametrize("which", ["tiny", "trained"])
def test_both_cfg_branches_execute_the_decision_of_the_first(which, request, monkeypatch):
    loaded = request.getfixturevalue(which)
    mid = median_error(loaded)
    g, decider, executed = run(loaded, replace(BASE, verify_tau=((0.0, mid), (1.0, 2 * mid))), monkeypatch=monkeypatch)
    assert len(executed) == 2 and 0 < g.stats.reused
    np.testing.assert_array_equal(executed[0], executed[1])  # cond and uncond reuse the same layers at every step
    np.testing.assert_array_equal(executed[0], decider.decisions)
    assert g.stats.host_syncs <= STEPS - START and (decider.replays == 1).all()


def test_host_syncs_are_counted_honestly(tiny):
    counter, mid = CountSyncs(), median_error(tiny)
    cfg = replace(BASE, verify_tau=((0.0, mid), (1.0, 2 * mid)))
    pre = tiny.transformer.register_forward_pre_hook(lambda *_: counter.__enter__() and None)  # count inside the forwards only
    post = tiny.transformer.register_forward_hook(lambda *_: counter.__exit__(None, None, None) and None)
    try:
        g, _, _ = run(tiny, cfg)
    finally:
        pre.remove(), post.remove()
    assert g.stats.host_syncs == counter.count > 0


@pytest.mark.parametrize("which", ["tiny", "trained"])
def test_two_generations_give_identical_results(which, request):
    loaded = request.getfixturevalue(which)
    mid = median_error(loaded)
    cfg = replace(BASE, verify_tau=((0.0, mid), (1.0, 2 * mid)))
    decider, run_cfg = make_decider(cfg), RunConfig(reuse=cfg, sample=SampleConfig(steps=STEPS, cfg=4.0))
    first, e1 = generate(loaded, [0, 1], run_cfg, decider=decider), decider.errors.copy()
    second, e2 = generate(loaded, [0, 1], run_cfg, decider=decider), decider.errors.copy()
    assert first.stats.to_dict() == second.stats.to_dict() and 0 < first.stats.reused
    np.testing.assert_array_equal(e1, e2)
    assert torch.equal(first.output.latents, second.output.latents)


def test_attention_granularity_runs_on_flux(tiny):
    g, decider, _ = run(tiny, replace(BASE, granularity="attention", verify_tau=ZERO))
    assert g.stats.reused == 0 and g.stats.host_syncs == STEPS - START
    assert mask(run(tiny, replace(BASE, granularity="attention", verify_tau=HUGE))[0]).any()


def test_the_stream_error_is_the_max_of_the_streams():
    image, text = torch.ones(1, 4, 2), torch.ones(1, 2, 2)
    err = stream_error([(image, image * 0.9), (text, text * 0.5)])
    assert float(err) == pytest.approx(0.5) and err.dim() == 0


def test_other_executors_are_refused_on_flux_in_one_line(tiny):
    for executor in ("compiled", "graph"):
        with pytest.raises(DqarError, match="'patch'") as exc:
            dqar.enable(tiny.transformer, BASE, executor=executor)
        assert "\n" not in str(exc.value)
