"""Forecast reuse: a reused output is extrapolated from the layer's last computed outputs (forecast_order 1, 2).

A synthetic transformer whose every `attn1` returns a polynomial of the evaluation's position
(index or timestep), whatever its input, checks the engine cell by cell against an independent
extrapolation; the tiny DiT checks executors, INT8 history, host syncs, recompiles and deciders.
"""
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import dqar
from dqar.cli import main
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.engine.decider import store_rows
from dqar.engine.forecast import weights
from dqar.engine.quant import dequantize, quantize
from dqar.engine.plan import Plan, build_plan, save_plan
from dqar.errors import DqarError
from dqar.generate import plan_key
from dqar.models import save_pipeline_folder

from conftest import E, NoSync, drive, make_pipe, make_tiny_transformer, pipe_images

B, T, C = 2, 4, 3  # synthetic batch rows, tokens, channels


@pytest.fixture(autouse=True)
def synthetic_is_a_dit(monkeypatch):
    """The synthetic model stands in for the DiT: its blocks are registered with diffusers as a BasicTransformerBlock's."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    from dqar.engine import adapter

    TransformerBlockRegistry.register(Block, TransformerBlockMetadata(return_hidden_states_index=0))
    monkeypatch.setitem(adapter.ATTENTION_MODULES, "Block", "attn1")
    monkeypatch.setattr(adapter, "DIT_FAMILIES", adapter.DIT_FAMILIES | {"Synthetic"})


class Clock:
    """The synthetic model's host-side position of the evaluation in progress."""

    def __init__(self, positions):
        self.positions = [float(p) for p in positions]
        self.calls = 0
        self.now = 0.0

    def tick(self) -> None:
        self.now = self.positions[self.calls]
        self.calls += 1


class Polynomial(torch.nn.Module):
    """An `attn1` stand-in: Σ_i coefs[i] · x^i at the evaluation's position x, whatever its input."""

    heads = 1

    def __init__(self, coefs: torch.Tensor, clock: Clock):
        super().__init__()
        self.register_buffer("coefs", coefs)  # (D + 1, B, T, C)
        self.clock = clock

    def forward(self, hidden_states, *args, **kwargs):
        return sum(c * self.clock.now ** i for i, c in enumerate(self.coefs))  # (B, T, C)


class Block(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn1 = attn

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.attn1(hidden_states)


class Synthetic(torch.nn.Module):
    """The transformer shape the engine attaches to: `transformer_blocks`, a DiT-like config, (B, C, H, W) in and out."""

    def __init__(self, layers: int, degree: int, positions, seed: int = 0, fn=None, drift: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.clock = Clock(positions)
        scale = torch.tensor([1.0] + [drift] * degree, dtype=torch.float64)[:, None, None, None]  # (D + 1, 1, 1, 1)
        attn = lambda: Polynomial(torch.randn(degree + 1, B, T, C, generator=g, dtype=torch.float64) * scale, self.clock)  # noqa: E731
        self.transformer_blocks = torch.nn.ModuleList([Block(fn(self.clock, g) if fn else attn()) for _ in range(layers)])
        self.config = SimpleNamespace(patch_size=1, num_attention_heads=1, attention_head_dim=C, in_channels=C, out_channels=C,
                                      num_layers=layers, num_embeds_ada_norm=1000)

    def forward(self, hidden_states, timestep=None, class_labels=None):
        self.clock.tick()
        h = hidden_states.flatten(2).transpose(1, 2)  # (B, T, C)
        for block in self.transformer_blocks:
            h = block(h)
        return SimpleNamespace(sample=h.transpose(1, 2).reshape(hidden_states.shape))


def run(model, handle=None, scheduler=None):
    """One generation over the model's positions; (E, B, T, C) outputs minus the (zero) input."""
    e_count = len(model.clock.positions)
    model.clock.calls = 0
    if handle is not None:
        handle.begin_generation(e_count, scheduler=scheduler)
    x = torch.zeros(B, C, 2, 2, dtype=torch.float64)  # T = 4 tokens
    with torch.no_grad():
        outs = [model(x).sample.flatten(2).transpose(1, 2) for _ in range(e_count)]
    if handle is not None:
        handle.end_generation()
    return torch.stack(outs)


def neville(xs, ys, x) -> float:
    """The value at x of the polynomial through (xs, ys), by Neville's scheme (an independent check of the weights)."""
    p = list(ys)
    for k in range(1, len(xs)):
        p = [((x - xs[i + k]) * p[i] + (xs[i] - x) * p[i + 1]) / (xs[i] - xs[i + k]) for i in range(len(p) - 1)]
    return p[0]


def extrapolated(xs_hist, x, order) -> np.ndarray:
    """x^0, x^1, x^2 as the engine should extrapolate them from the newest min(order, n - 1) + 1 computed positions."""
    pts = [float(v) for v in xs_hist[: min(order, len(xs_hist) - 1) + 1]]
    return np.array([neville(pts, [v ** i for v in pts], x) for i in range(3)])


def expected(model, mask: np.ndarray, positions, order: int) -> torch.Tensor:
    """What every cell should hold: the computed polynomial, or its extrapolation from the layer's computed cells."""
    e_count, l_count = mask.shape
    total = torch.zeros(e_count, B, T, C, dtype=torch.float64)
    for l, block in enumerate(model.transformer_blocks):
        coefs = block.attn1.coefs
        computed: list[float] = []  # newest first
        for e in range(e_count):
            x = float(positions[e])
            scal = extrapolated(computed, x, order) if mask[e, l] else np.array([x ** i for i in range(3)])
            total[e] += sum(float(s) * c for s, c in zip(scal, coefs))
            if not mask[e, l]:
                computed.insert(0, x)
    return total


@st.composite
def cases(draw):
    e_count, l_count = draw(st.integers(2, 12)), draw(st.integers(1, 3))
    rows = draw(st.lists(st.lists(st.booleans(), min_size=l_count, max_size=l_count), min_size=e_count - 1, max_size=e_count - 1))
    mask = np.array([[False] * l_count] + rows, dtype=bool)  # evaluation 0 computes
    order = draw(st.sampled_from([1, 2]))
    axis = draw(st.sampled_from(["evaluation", "timestep"]))
    steps = draw(st.lists(st.floats(1.0, 60.0), min_size=e_count - 1, max_size=e_count - 1))
    timesteps = 999.0 - np.concatenate([[0.0], np.cumsum(steps)])  # falling, unevenly spaced
    return mask, order, axis, timesteps, draw(st.sampled_from(["attention", "block"])), draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(cases())
def test_order_k_reproduces_a_degree_k_sequence_exactly(case):
    mask, order, axis, timesteps, granularity, seed = case
    positions = timesteps if axis == "timestep" else np.arange(len(mask), dtype=np.float64)
    model = Synthetic(mask.shape[1], degree=order, positions=positions, seed=seed)
    scheduler = SimpleNamespace(timesteps=torch.as_tensor(timesteps))
    cfg = ReuseConfig(forecast_order=order, forecast_axis=axis, granularity=granularity)
    with dqar.enable(model, cfg, plan=Plan(mask)) as h:
        out = run(model, h, scheduler)
        assert h.stats.reuse_mask == mask.astype(int).tolist()
    want = expected(model, mask, positions, order)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    full = run(model)  # a reuse with order + 1 computed outputs behind it is exact
    history = np.cumsum(~mask, axis=0) - ~mask  # (E, L) computed outputs before each evaluation
    exact = (~mask | (history >= order + 1)).all(axis=1)  # evaluations whose every reuse has the history it needs
    torch.testing.assert_close(out[exact], full[exact], rtol=1e-9, atol=1e-9 * float(full.abs().max()))


def test_the_timestep_axis_follows_uneven_timesteps():
    timesteps = np.array([999.0, 990, 960, 900, 800, 650, 450, 200])  # DPM-Solver-like: uneven
    mask = np.zeros((8, 2), dtype=bool)
    mask[5:, :] = True
    scheduler = SimpleNamespace(timesteps=torch.as_tensor(timesteps))
    errors = {}
    for axis in ("timestep", "evaluation"):
        model = Synthetic(2, degree=2, positions=timesteps)  # quadratic in the timestep
        with dqar.enable(model, ReuseConfig(forecast_order=2, forecast_axis=axis), plan=Plan(mask)) as h:
            out = run(model, h, scheduler)
        full = run(model)
        errors[axis] = float((out - full).abs().max() / full.abs().max())
    assert errors["timestep"] < 1e-10 and errors["evaluation"] > 1e-3


class Smooth(torch.nn.Module):
    """An `attn1` stand-in that moves smoothly but is no polynomial: a · cos(x / 12) + b · exp(-x / 18)."""

    heads = 1

    def __init__(self, clock: Clock, g: torch.Generator):
        super().__init__()
        self.register_buffer("ab", torch.randn(2, B, T, C, generator=g, dtype=torch.float64))
        self.clock = clock

    def forward(self, hidden_states, *args, **kwargs):
        x = self.clock.now
        return self.ab[0] * np.cos(x / 12) + self.ab[1] * np.exp(-x / 18)


def test_forecasting_beats_a_copy_on_a_smooth_model():
    model = Synthetic(3, degree=0, positions=np.arange(24.0), fn=Smooth)
    full = run(model)
    errors = []
    for order in (0, 1, 2):
        with dqar.enable(model, ReuseConfig(schedule="constant", refresh_interval=3, forecast_order=order)) as h:
            out = run(model, h)
            assert h.stats.reused > 0 and h.stats.forecasts == (0 if order == 0 else h.stats.reused)
        errors.append(float((out - full).norm() / full.norm()))
    assert errors[0] > 2 * errors[1] > 4 * errors[2] > 0, errors


# ----- the tiny DiT ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dit():
    return make_tiny_transformer(num_layers=4)


FORECAST = ReuseConfig(schedule="constant", refresh_interval=3, warmup_frac=0.25, forecast_order=2)


def test_forecasting_changes_outputs_and_keeps_what_later_reuses_need(dit):
    outs, stats = {}, {}
    for order in (0, 1, 2):
        with dqar.enable(dit, replace(FORECAST, forecast_order=order)) as h:
            outs[order], stats[order] = drive(dit, h), h.stats
    assert stats[0].reuse_mask == stats[1].reuse_mask == stats[2].reuse_mask and stats[0].reused > 0
    assert not torch.equal(outs[0][-1], outs[1][-1]) and not torch.equal(outs[1][-1], outs[2][-1])
    assert stats[0].forecasts == 0 and stats[1].forecasts == stats[2].forecasts == stats[1].reused
    assert [s.cache_entries_peak for s in stats.values()] == [4, 8, 12]  # 4 layers x order + 1 entries


def test_store_rows_keep_every_output_a_later_reuse_may_read():
    mask = np.array([[0], [0], [1], [0], [0], [0], [1], [0]], dtype=bool)  # (E, L)
    assert [r[0] for r in store_rows(mask, keep_for_later=False)] == [False, True, False, False, False, True, False, False]
    assert [r[0] for r in store_rows(mask, keep_for_later=True)] == [True, True, True, True, True, True, False, False]


@pytest.mark.parametrize("mode", ["token", "tensor", "head"])
def test_int8_history_bytes_are_exact(dit, mode):
    """Per layer: order + 1 INT8 entries with their float32 scales, and for a forecast the INT8 anchor they refer to."""
    rows, tokens, width, heads = 4, 16, 32, 2  # drive's batch, the tiny DiT's tokens, width and heads
    groups = {"token": rows * tokens, "tensor": 1, "head": heads}[mode]
    for order in (0, 1, 2):
        with dqar.enable(dit, replace(FORECAST, forecast_order=order, cache_dtype="int8", quant_mode=mode)) as h:
            drive(dit, h)
            s = h.stats
        tensors = order + 1 + (order > 0)
        assert s.cache_bytes_peak == s.cache_bytes == 4 * tensors * (rows * tokens * width + 4 * groups)
        assert s.cache_entries_peak == 4 * (order + 1)
        assert 0 < s.quant_error < (0.02 if order == 0 else 2e-4)  # anchored: the newest is stored in two INT8 passes


@pytest.mark.parametrize("granularity", ["attention", "block"])
def test_the_anchored_int8_history_stays_close_to_the_model_dtype_history(dit, granularity):
    """Independent INT8 errors of each entry would be amplified by the extrapolation weights; anchored ones are not."""
    ref = drive(dit)
    gap = {}
    for order in (1, 2):
        cfg = replace(FORECAST, granularity=granularity, forecast_order=order, quant_mode="token")
        outs = {}
        for dtype in ("model", "int8"):
            with dqar.enable(dit, replace(cfg, cache_dtype=dtype)) as h:
                outs[dtype] = drive(dit, h)[-1]
        gap[order] = float((outs["int8"] - outs["model"]).norm() / (outs["model"] - ref[-1]).norm())
    assert max(gap.values()) < 0.035, gap  # < 3.5% of the reuse error itself: within 0.3 dB of the model-dtype history


def plain_int8_forecast(model, mask, positions, order) -> torch.Tensor:
    """What each evaluation would give if every computed output were quantized on its own (per tensor) and forecast."""
    total = torch.zeros(len(mask), B, T, C, dtype=torch.float64)
    for l, block in enumerate(model.transformer_blocks):
        value = lambda x: sum(c * x ** i for i, c in enumerate(block.attn1.coefs))  # noqa: E731
        computed: list[float] = []  # newest first
        for e, x in enumerate(positions):
            if mask[e, l]:
                w = weights(computed, float(x), order)
                total[e] += sum(wi * dequantize(quantize(value(xi))) for wi, xi in zip(w, computed))
            else:
                total[e] += value(float(x))
                computed.insert(0, float(x))
    return total


def test_the_anchored_int8_history_beats_independently_quantized_entries():
    mask = np.zeros((12, 2), dtype=bool)
    mask[4:] = True
    mask[[6, 9], :] = False
    timesteps = 0.1 * np.arange(12.0)
    model = Synthetic(2, degree=2, positions=timesteps, drift=0.1)  # outputs move by a few % per evaluation
    scheduler = SimpleNamespace(timesteps=torch.as_tensor(timesteps))
    full = run(model)
    rel = lambda out: float((out - full).abs().max() / full.abs().max())  # noqa: E731
    errors = {}
    for dtype in ("model", "int8"):
        cfg = ReuseConfig(forecast_order=2, forecast_axis="timestep", cache_dtype=dtype, quant_mode="tensor")
        with dqar.enable(model, cfg, plan=Plan(mask)) as h:
            errors[dtype] = rel(run(model, h, scheduler))
    plain = rel(plain_int8_forecast(model, mask, timesteps, 2))
    assert errors["model"] < 1e-12 and errors["int8"] < plain / 5, (errors, plain)


@pytest.mark.parametrize("granularity", ["attention", "block"])
@pytest.mark.parametrize("dtype", ["model", "int8"])
def test_no_host_syncs_on_the_plan_path_with_forecasting(dit, granularity, dtype):
    with dqar.enable(dit, replace(FORECAST, granularity=granularity, cache_dtype=dtype)) as h:
        drive(dit, h, guard=NoSync())
        assert h.stats.forecasts > 0 and h.stats.host_syncs == 0


@pytest.mark.parametrize("executor", ["fused", "compiled"])
@pytest.mark.parametrize("granularity,dtype", [("attention", "model"), ("attention", "int8"), ("block", "int8")])
def test_executors_agree_with_forecasting(dit, executor, granularity, dtype):
    cfg = replace(FORECAST, granularity=granularity, cache_dtype=dtype, quant_mode="token")
    with dqar.enable(dit, cfg) as h:
        ref, ref_stats = drive(dit, h), h.stats
    with dqar.enable(dit, cfg, executor=executor) as h:
        out, stats = drive(dit, h), h.stats
    want, got = ref_stats.to_dict(), stats.to_dict()
    want_error, got_error = want.pop("quant_error"), got.pop("quant_error")
    assert got == want and got["forecasts"] > 0
    if want_error is None:
        assert got_error is None
    else:
        assert got_error == pytest.approx(want_error, rel=1e-3)
    atol = 2e-3 if executor == "compiled" and dtype == "int8" else 1e-4  # see tests/test_compiled.py TOLERANCE
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-3)


@pytest.mark.parametrize("granularity", ["attention", "block"])
def test_compiled_forecasting_never_recompiles_and_makes_no_host_syncs(dit, granularity):
    torch._dynamo.reset()
    counters.clear()
    with dqar.enable(dit, replace(FORECAST, granularity=granularity, cache_dtype="int8", quant_mode="token"), executor="compiled") as h:
        first = drive(dit, h)
        graphs, frames = counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]
        second = drive(dit, h)  # new weights every evaluation, a second generation: no new graphs
        assert counters["stats"]["unique_graphs"] == graphs and counters["stats"]["calls_captured"] == frames
        drive(dit, h, guard=NoSync())
        assert h.stats.forecasts > 0
    assert not counters["graph_break"]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_open_gate_forecasts_as_the_schedule_plan_does(dit):
    open_gate = replace(FORECAST, gate=True, entropy_tau=1.0, snr_min=0.0, snr_max=1e9)
    outs = {}
    for name, cfg in (("plan", FORECAST), ("gate", open_gate)):
        with dqar.enable(dit, cfg) as h:
            outs[name], mask = drive(dit, h), h.stats.reuse_mask
            assert h.stats.forecasts > 0
    assert mask == build_plan(FORECAST, E, 4).mask.astype(int).tolist()
    assert all(torch.equal(a, b) for a, b in zip(outs["plan"], outs["gate"]))


def test_forecasting_with_cfg_sharing_and_inside_whole_blocks(dit):
    for granularity in ("attention", "block"):
        shared = replace(FORECAST, cfg_share="cond_to_uncond", cfg_share_from=0.5, granularity=granularity)
        outs = {}
        for order in (0, 2):
            with dqar.enable(dit, replace(shared, forecast_order=order)) as h:
                outs[order] = drive(dit, h)
                assert h.stats.cfg_shared > 0 and (h.stats.forecasts > 0) == (order > 0)
        assert not torch.equal(outs[0][-1], outs[2][-1])


def test_plan_files_forecast_as_the_schedule_does(dit, tmp_path):
    save_plan(build_plan(FORECAST, E, 4), tmp_path / "plan.json")
    outs = {}
    for name, cfg in (("schedule", FORECAST), ("file", replace(FORECAST, plan_file=str(tmp_path / "plan.json")))):
        with dqar.enable(dit, cfg) as h:
            outs[name] = drive(dit, h)
            assert h.stats.forecasts > 0
    assert all(torch.equal(a, b) for a, b in zip(outs["schedule"], outs["file"]))


def test_a_stock_pipeline_forecasts_over_its_scheduler_timesteps():
    pipe = make_pipe()
    images = {}
    for order, axis in ((0, "evaluation"), (1, "evaluation"), (1, "timestep")):
        cfg = ReuseConfig(schedule="constant", warmup_frac=0.2, refresh_interval=3, forecast_order=order, forecast_axis=axis)
        with dqar.enable(pipe, cfg) as h:
            images[order, axis] = pipe_images(pipe)
            assert h.stats.forecasts == (h.stats.reused if order else 0) and h.stats.reused > 0
    assert not np.array_equal(images[0, "evaluation"], images[1, "evaluation"])
    # DDIM's timesteps are evenly spaced: both axes give the same forecast (weights are invariant to the spacing)
    np.testing.assert_allclose(images[1, "timestep"], images[1, "evaluation"], atol=1e-5)


def test_full_dqar_acts_on_a_stock_pipeline_it_was_never_tuned_on():
    """The preset's plan is static: on a random-weight DiTPipeline it skips most block work, by forecasting."""
    pipe = make_pipe()
    stock = pipe_images(pipe, steps=20)
    with dqar.enable(pipe, "full_dqar") as h:
        images = pipe_images(pipe, steps=20)
        s = h.stats
    assert s.evaluations == 20 and s.reuse_fraction >= 0.6 and s.flops_skipped_fraction >= 0.55
    assert 0.8 * s.reused <= s.forecasts < s.reused and s.quant_error is not None  # all but the reuses before a second computed output extrapolate
    assert not np.array_equal(images, stock)
    np.testing.assert_array_equal(pipe_images(pipe, steps=20), stock)  # detached: stock output again


# ----- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [
    (dict(forecast_order=3), "forecast_order = 3"), (dict(forecast_order=-1), "forecast_order = -1"),
    (dict(forecast_order=1.0), "forecast_order = 1.0"), (dict(forecast_order=True), "forecast_order = True"),
    (dict(forecast_axis="time"), "unknown forecast_axis 'time'"), (dict(forecast_order=1, target="kv"), "not K/V"),
    (dict(refresh_interval_end=-1), "refresh_interval_end = -1"),
])
def test_bad_forecast_config_is_one_line(bad, match):
    with pytest.raises(DqarError, match=match) as exc:
        ReuseConfig(**bad)
    assert "\n" not in str(exc.value) and exc.value.fix


@pytest.mark.parametrize("run_with,match", [(dict(forecast_order=0), "forecast_order=2"), (dict(granularity="attention"), "granularity"),
                                            (dict(forecast_axis="timestep"), "forecast_axis")])
def test_a_forecast_plan_refuses_a_run_at_another_order_or_granularity(tmp_path, capsys, run_with, match):
    made = dict(granularity="block", forecast_order=2, forecast_axis="evaluation")
    path = tmp_path / "plan.json"
    save_plan(Plan(mask=np.zeros((4, 2), dtype=bool), key={"model": "m", "sampler": "ddim", "steps": 4, **made}), path)
    cfg = ReuseConfig(plan_file=str(path), **{**made, **run_with})
    with pytest.raises(DqarError, match=match):
        build_plan(cfg, 4, 2, key=plan_key("m", RunConfig(reuse=cfg, sample=SampleConfig(steps=4))))
    build_plan(replace(cfg, **made), 4, 2, key=plan_key("m", RunConfig(reuse=replace(cfg, **made), sample=SampleConfig(steps=4))))
    model = save_pipeline_folder(tmp_path / "model", make_tiny_transformer(num_classes=10, in_channels=1, learned_sigma=False))
    body = "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in {**made, **run_with}.items())
    (tmp_path / "run.toml").write_text(f"[reuse]\nplan_file = {str(path)!r}\n{body}\n[sample]\nsteps = 4\n".replace("'", '"'))
    rc = main(["sample", "--model", str(model), "--config", str(tmp_path / "run.toml"), "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and match in err[0]


@pytest.mark.parametrize("toml,match", [("forecast_order = 3", "forecast_order"), ("forecast_axis = 'steps'", "forecast_axis"),
                                        ("forecast_order = 1\ntarget = 'kv'", "K/V")])
def test_bad_forecast_config_at_the_cli_exits_2(tmp_path, capsys, toml, match):
    model = save_pipeline_folder(tmp_path / "model", make_tiny_transformer(num_classes=10, in_channels=1, learned_sigma=False))
    (tmp_path / "bad.toml").write_text(f"[reuse]\n{toml}\n")
    rc = main(["sample", "--model", str(model), "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and match in err[0] and "Traceback" not in err[0]


def test_a_forecast_trace_measures_without_counting_forecasts():
    """TracingDecider(forecast=True) reads what a reuse would return to measure change; that is no reuse and no forecast."""
    from dqar.engine.decider import TracingDecider

    model = make_tiny_transformer(num_layers=2)
    with dqar.enable(model, ReuseConfig(forecast_order=2), decider=TracingDecider(4, forecast=True)) as h:
        drive(model, h)
        stats, trace = h.stats, h.engine.decider.trace()
    assert stats.reused == 0 and stats.forecasts == 0
    assert np.isfinite(trace.change[3:]).all()  # the forecast's change was measured
