"""Schedules → plans: every knob changes the plan; plans round-trip as JSON and refuse mismatches."""
from dataclasses import replace

import numpy as np
import pytest

from dqar.engine.config import SCHEDULES, ReuseConfig
from dqar.errors import DqarError
from dqar.engine.plan import Plan, build_plan, load_plan, max_run_staleness, save_plan

E, L = 30, 8


def plan(**kw):
    kw.setdefault("schedule", "linear")
    if kw["schedule"] == "custom":
        kw.setdefault("custom_layers", (1, 4, 6))
    return build_plan(ReuseConfig(**kw), E, L)


def test_every_schedule_type_gives_a_different_plan():
    masks = {s: plan(schedule=s).mask for s in SCHEDULES}
    for a in SCHEDULES:
        for b in SCHEDULES:
            if a < b:
                assert not np.array_equal(masks[a], masks[b]), (a, b)


def test_linear_grows_and_reverse_shrinks_over_time():
    lin = plan(schedule="linear", refresh_interval=100, max_staleness=100).mask.sum(axis=1)
    rev = plan(schedule="linear_reverse", refresh_interval=100, max_staleness=100).mask.sum(axis=1)
    assert lin[-1] > lin[8] and rev[8] > rev[-1]


@pytest.mark.parametrize("knob,a,b", [("warmup_frac", 0.1, 0.5), ("layer_frac", 0.25, 1.0), ("refresh_interval", 2, 4),
                                      ("cooldown_frac", 0.0, 0.3), ("max_staleness", 1, 3), ("exp_rate", 1.0, 6.0), ("step_stages", 2, 5)])
def test_each_knob_changes_the_plan(knob, a, b):
    schedule = {"exp_rate": "exponential", "step_stages": "step"}.get(knob, "constant" if knob == "layer_frac" else "linear")
    kw = {"refresh_interval": 4} if knob == "max_staleness" else {}
    assert not np.array_equal(plan(schedule=schedule, **kw, **{knob: a}).mask, plan(schedule=schedule, **kw, **{knob: b}).mask)


def test_warmup_and_cooldown_windows_hold():
    m = plan(schedule="constant", warmup_frac=0.2, cooldown_frac=0.1).mask
    assert not m[:6].any() and not m[-3:].any() and m[6:-3].any()


def test_layer_fraction_bounds_the_eligible_layers():
    m = plan(schedule="constant", layer_frac=0.5).mask
    assert not m[:, 4:].any() and m[:, :4].any()


def test_custom_schedule_uses_exactly_its_layers():
    m = plan(schedule="custom", custom_layers=(1, 4, 6)).mask
    assert set(np.nonzero(m.any(axis=0))[0]) == {1, 4, 6}


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_staleness_never_exceeds_the_refresh_limit(k):
    m = plan(schedule="constant", refresh_interval=k, max_staleness=10, warmup_frac=0.0).mask
    assert max_run_staleness(m) == k - 1
    assert not m[0].any()  # nothing cached yet at the first evaluation


@pytest.mark.parametrize("start,end", [(4, 2), (2, 5)])
def test_a_ramped_refresh_interval_moves_the_staleness_limit_over_the_window(start, end):
    cfg = ReuseConfig(schedule="constant", refresh_interval=start, refresh_interval_end=end, max_staleness=10, warmup_frac=0.0)
    m = build_plan(cfg, 30, 4).mask
    runs, run = [], np.zeros(4, dtype=np.int64)
    for row in m:  # (L,) the staleness of each reuse, in evaluation order
        run = np.where(row, run + 1, 0)
        runs.append(int(run.max()))
    early, late = max(runs[:5]), max(runs[-5:])
    assert (early, late) == (start - 1, end - 1)
    assert not np.array_equal(m, build_plan(replace(cfg, refresh_interval_end=0), 30, 4).mask)
    assert np.array_equal(build_plan(replace(cfg, refresh_interval_end=start), 30, 4).mask,
                          build_plan(replace(cfg, refresh_interval_end=0), 30, 4).mask)


def test_disabled_config_never_reuses():
    assert not plan(enabled=False).mask.any()


def test_json_round_trip_and_key_checks(tmp_path):
    p = build_plan(ReuseConfig(), E, L, key={"model": "m", "sampler": "ddim", "steps": E})
    path = tmp_path / "plan.json"
    save_plan(p, path)
    q = load_plan(path)
    assert np.array_equal(p.mask, q.mask) and q.key == p.key
    q.check_key(model="m", steps=E)
    with pytest.raises(DqarError, match="steps"):
        q.check_key(steps=50)
    with pytest.raises(DqarError, match="shape"):
        q.check_shape(50, L)
    assert "R" in str(q) and f"{E} evaluations" in str(q)


def test_plan_file_replaces_the_schedule_and_checks_its_key(tmp_path):
    mask = np.zeros((E, L), dtype=bool)
    mask[5:, 2] = True
    path = tmp_path / "p.json"
    save_plan(Plan(mask=mask, key={"steps": E}), path)
    got = build_plan(ReuseConfig(plan_file=str(path)), E, L, key={"steps": E})
    assert np.array_equal(got.mask, mask)
    with pytest.raises(DqarError):
        build_plan(ReuseConfig(plan_file=str(path)), 20, L, key={"steps": 20})


@pytest.mark.parametrize("text", ["", "{}", '{"format": "dqar-plan/1", "rows": ["RX"]}', "[1,2]"])
def test_corrupt_plan_files_are_refused(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DqarError, match="not a valid dqar plan"):
        load_plan(path)


def test_bound_patterns_limits_a_linear_schedule_to_max_patterns():
    e, l = 50, 28
    free = build_plan(ReuseConfig(schedule="linear"), e, l)
    assert free.num_patterns > 16  # a linear schedule has a row per eligible-layer count and refresh phase
    assert np.array_equal(build_plan(ReuseConfig(schedule="linear", bound_patterns=False), e, l).mask, free.mask)
    for n in (16, 4):
        bounded = build_plan(ReuseConfig(schedule="linear", bound_patterns=True, max_patterns=n), e, l)
        assert bounded.num_patterns <= n and not np.array_equal(bounded.mask, free.mask)
        assert not (bounded.mask & ~free.mask).any()  # rows only compute more
    few = build_plan(ReuseConfig(schedule="constant"), e, l)  # a constant schedule already fits
    assert np.array_equal(build_plan(ReuseConfig(schedule="constant", bound_patterns=True), e, l).mask, few.mask)


def test_bound_patterns_keeps_a_ramped_refresh_within_its_limits():
    from dqar.engine.plan import staleness_limits

    cfg = ReuseConfig(schedule="linear", refresh_interval=4, refresh_interval_end=2, max_staleness=10, bound_patterns=True, max_patterns=5)
    m = build_plan(cfg, 40, 8).mask
    assert Plan(mask=m).num_patterns <= 5
    run = np.zeros(8, dtype=np.int64)
    for row, limit in zip(m, staleness_limits(cfg, 40)):  # (L,) row, the evaluation's most consecutive reuses
        run = np.where(row, run + 1, 0)
        assert run.max() <= limit


def test_bound_patterns_bounds_a_plan_file_and_refuses_online_deciders(tmp_path):
    mask = np.random.default_rng(1).random((E, L)) < 0.5
    mask[0] = False
    path = tmp_path / "p.json"
    save_plan(Plan(mask=mask), path)
    got = build_plan(ReuseConfig(plan_file=str(path), bound_patterns=True, max_patterns=3), E, L)
    assert got.num_patterns <= 3 and not (got.mask & ~mask).any()
    with pytest.raises(DqarError, match="bound_patterns"):
        ReuseConfig(gate=True, bound_patterns=True)


def test_a_plan_ranked_for_one_forecaster_refuses_another():
    from dqar.engine.config import RunConfig
    from dqar.generate import plan_key

    run = RunConfig(reuse=ReuseConfig(forecast_order=2, forecast_kind="bdf2_heun"))
    plan = Plan(mask=np.zeros((50, 8), dtype=bool), key=plan_key("embedded", run))
    plan.check_key(**plan_key("embedded", run))  # the same kind passes
    with pytest.raises(DqarError, match="forecast_kind='bdf2_heun'"):
        plan.check_key(**plan_key("embedded", replace(run, reuse=replace(run.reuse, forecast_kind="taylor"))))


def test_a_plan_records_its_stream_layout_and_refuses_another():
    from dqar.engine.plan import layout_text

    plan = Plan(mask=np.zeros((3, 4), dtype=bool), key={"streams": [2, 2, 1, 1]})
    assert Plan.from_json(plan.to_json()).streams == (2, 2, 1, 1)
    plan.check_streams([2, 2, 1, 1])  # its own layout passes
    with pytest.raises(DqarError, match=r"made for 4 layers \(streams 2 x2, 1 x2\) but tiny has 4 layers \(streams 1 x4\)"):
        plan.check_streams([1, 1, 1, 1], model="tiny")
    with pytest.raises(DqarError, match="streams 1 x4"):
        plan.check_key(model="tiny", streams=[1, 1, 1, 1])
    assert layout_text([2, 2, 2, 1]) == "4 layers (streams 2 x3, 1 x1)"


def test_a_plan_without_a_stream_layout_is_checked_by_its_layer_count_only():
    old = Plan.from_json('{"format": "dqar-plan/1", "key": {"steps": 2}, "rows": ["..", "RR"]}')  # written before streams
    assert old.streams is None
    old.check_streams([2, 2])
    old.check_streams([1, 1])
    with pytest.raises(DqarError, match="made for 2 layers but this model has 3 layers"):
        old.check_streams([1, 1, 1])


@pytest.mark.parametrize("streams", ['[1, 1]', '[1, 0, 1]', '"3"', '[1, true, 1]'])
def test_a_malformed_stream_layout_is_not_a_valid_plan(streams):
    with pytest.raises(DqarError, match="not a valid dqar plan .*streams"):
        Plan.from_json(f'{{"format": "dqar-plan/1", "key": {{"streams": {streams}}}, "rows": ["...", "RRR"]}}')


def test_stream_layout_reads_the_block_adapter(tiny_transformer):
    from dqar.engine.plan import stream_layout
    from dqar.models import random_flow

    assert stream_layout(tiny_transformer) == [1] * 4  # BasicTransformerBlock: the image stream
    assert stream_layout(random_flow("random-flux-tiny").transformer) == [2] * 4  # dual- and single-stream Flux blocks
