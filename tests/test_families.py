"""Every diffusers DiT family through the block adapter, in its stock pipeline: PixArt-α / Σ, SD3 / 3.5, Flux.1
(guidance-distilled and true CFG as separate forwards), Wan, Qwen-Image. Tiny random components from configs (tests/families.py)."""
from dataclasses import replace

import numpy as np
import pytest
import torch

import dqar
from dqar.engine import adapter, branches
from dqar.engine.cache import LayerCache
from dqar.engine.flops import counted_flops, dit_model
from dqar.errors import DqarError

from families import FAMILIES, flux, run

STEPS = 5
NAMES = sorted(FAMILIES)


def hooks(module: torch.nn.Module) -> dict:
    """Every module's diffusers hook names (what enable adds and disable must remove)."""
    return {name: tuple(m._diffusers_hook._hook_order) for name, m in module.named_modules() if hasattr(m, "_diffusers_hook")}


@pytest.fixture(scope="module", params=NAMES)
def family(request):
    pipe, kwargs = FAMILIES[request.param]()
    with torch.no_grad():
        ref = run(pipe, kwargs, STEPS)
    return request.param, pipe, kwargs, ref


@pytest.mark.parametrize("granularity", ["attention", "block"])
def test_idle_reuse_is_bit_identical_to_the_stock_pipeline(family, granularity):
    _, pipe, kwargs, ref = family
    cfg = replace(dqar.preset("full_dqar"), granularity=granularity, warmup_frac=1.0)  # warm-up covers every evaluation
    with torch.no_grad(), dqar.enable(pipe, cfg, executor="patch") as handle:
        out = run(pipe, kwargs, STEPS)
        assert handle.stats.reused == 0
    assert torch.equal(out, ref)


def test_disable_restores_the_model_exactly(family):
    _, pipe, kwargs, ref = family
    before = hooks(pipe.transformer)
    handle = dqar.enable(pipe, "full_dqar")
    assert hooks(pipe.transformer) != before
    with torch.no_grad():
        reused = run(pipe, kwargs, STEPS)
    handle.disable()
    assert hooks(pipe.transformer) == before
    with torch.no_grad():
        assert torch.equal(run(pipe, kwargs, STEPS), ref)
    assert not torch.equal(reused, ref)  # reuse acted while attached


@pytest.mark.parametrize("granularity", ["attention", "block"])
def test_full_dqar_reuses_what_its_plan_says(family, granularity):
    name, pipe, kwargs, ref = family
    cfg = replace(dqar.preset("full_dqar"), granularity=granularity)
    with torch.no_grad(), dqar.enable(pipe, cfg) as handle:
        assert handle.executor == "patch"
        out = run(pipe, kwargs, STEPS)
        stats, plan = handle.stats, handle.plan
        assert plan.num_evaluations == STEPS and plan.num_layers == len(adapter.describe(pipe.transformer).blocks)
        assert np.array_equal(np.asarray(stats.reuse_mask, dtype=bool), plan.mask)  # every planned reuse ran, nothing else
        assert stats.reused > 0 and 0 < stats.flops_skipped < stats.flops_total
        # a second call starts a new generation whose plan follows its num_inference_steps
        run(pipe, kwargs, STEPS + 2)
        assert handle.stats.evaluations == STEPS + 2 and handle.plan.num_evaluations == STEPS + 2
    assert not torch.equal(out, ref)


@pytest.mark.parametrize("executor", ["fused", "compiled", "graph"])
def test_dit_only_executors_are_refused_at_enable(family, executor):
    name, pipe, _, _ = family
    before = hooks(pipe.transformer)
    with pytest.raises(DqarError) as err:
        dqar.enable(pipe, "full_dqar", executor=executor)
    assert type(pipe.transformer).__name__ in str(err.value) and "patch" in err.value.fix
    assert hooks(pipe.transformer) == before  # nothing attached


@pytest.mark.parametrize("config", [dict(gate=True), dict(target="kv", granularity="attention", forecast_kind="taylor", forecast_order=0), dict(cfg_share="cond_to_uncond")])
def test_dit_only_options_are_refused_with_a_reason(family, config):
    name, pipe, _, _ = family
    cfg = replace(dqar.preset("full_dqar"), **config)
    if name.startswith("pixart") and "cfg_share" not in config:  # PixArt's blocks are BasicTransformerBlocks: the gate and K/V run
        _, _, kwargs, ref = family
        with torch.no_grad(), dqar.enable(pipe, cfg, executor="patch") as handle:
            out = run(pipe, kwargs, STEPS)
            assert handle.stats.evaluations == STEPS
        assert out.shape == ref.shape and torch.isfinite(out).all()
        return
    with pytest.raises(DqarError, match=type(pipe.transformer).__name__):
        dqar.enable(pipe, cfg)


@pytest.mark.parametrize("name", ["flux_true_cfg", "qwen_image"])
def test_separate_forward_cfg_keeps_one_history_per_branch(monkeypatch, name):
    pipe, kwargs = FAMILIES[name]()
    writers: dict[int, set] = {}
    put = LayerCache.put_encoded

    def spy(self, *args, **kw):  # which cache context wrote into which cache
        writers.setdefault(id(self), set()).add(handle.engine.context)
        return put(self, *args, **kw)

    monkeypatch.setattr(LayerCache, "put_encoded", spy)
    handle = dqar.enable(pipe, replace(dqar.preset("full_dqar"), cache_dtype="model"))
    seen = []
    summarize = handle.engine._summarize
    monkeypatch.setattr(handle.engine, "_summarize", lambda st: seen.append((sorted(map(str, [*st.branches, st.branch])),
                                                                             branches.ran(st))) or summarize(st))
    with torch.no_grad():
        run(pipe, kwargs, STEPS)
    names, ran = seen[-1]
    assert names == ["cond", "uncond"] and len(ran) == 2
    assert len(writers) == 2 and sorted(next(iter(w)) for w in writers.values()) == ["cond", "uncond"]
    assert all(len(w) == 1 for w in writers.values())  # a forecast never mixes the two trajectories
    stats = handle.stats
    assert stats.evaluations == STEPS  # plans count denoising steps, not forwards
    assert all(b.evaluation == STEPS - 1 for b in ran)
    handle.disable()


def test_separate_forward_cfg_counts_both_branches_flops():
    pipe, kwargs = flux(true_cfg=True)
    cond_only = {k: v for k, v in kwargs.items() if not k.startswith("negative")} | {"true_cfg_scale": 1.0}
    with torch.no_grad(), dqar.enable(pipe, "full_dqar") as handle:
        run(pipe, cond_only, STEPS)
        one = handle.stats
        run(pipe, kwargs, STEPS)
        two = handle.stats
    assert two.flops_total == 2 * one.flops_total  # two forwards per step
    assert two.flops_skipped == 2 * one.flops_skipped > 0 and two.reuse_mask == one.reuse_mask


def test_counted_flops_include_text_tokens_and_match_the_dit_count():
    pipe, kwargs = flux()
    t = pipe.transformer
    x, ids = torch.randn(1, 16, 16), torch.zeros(16, 3)

    def count(tokens):
        return counted_flops(t, (), dict(hidden_states=x, encoder_hidden_states=torch.randn(1, tokens, 32),
                                         pooled_projections=torch.randn(1, 32), timestep=torch.ones(1), img_ids=ids,
                                         txt_ids=torch.zeros(tokens, 3), guidance=torch.ones(1), return_dict=False))
    short, long = count(4), count(12)
    for path in ("transformer_blocks.0", "transformer_blocks.0.attn", "single_transformer_blocks.1"):
        assert long[path] > short[path] > 0  # joint attention over text tokens is counted
    assert short[""] > sum(short[f"transformer_blocks.{i}"] + short[f"single_transformer_blocks.{i}"] for i in range(2))


def test_counted_flops_agree_with_the_analytic_dit_model(tiny_transformer):
    """Two counts of one DiT forward: the analytic model (documented numbers) and torch's counter on fake tensors."""
    tiny_dit = tiny_transformer
    c = tiny_dit.config
    x = torch.randn(2, c.in_channels, c.sample_size, c.sample_size)
    counted = counted_flops(tiny_dit, (x,), dict(timestep=torch.ones(2), class_labels=torch.zeros(2, dtype=torch.long)))
    analytic = dit_model(c, c.sample_size, c.sample_size, c.num_layers, "attention", "block")
    assert counted["transformer_blocks.0"] / 2 == pytest.approx(analytic.skip[0], rel=0.05)
    assert counted[""] / 2 == pytest.approx(analytic.forward, rel=0.05)


def test_unregistered_blocks_are_refused_at_enable():
    class Mine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(DqarError, match="Mine's Linear blocks are not in diffusers' TransformerBlockRegistry"):
        dqar.enable(Mine(), "full_dqar")
    with pytest.raises(DqarError, match="Linear has no diffusers transformer block lists"):
        dqar.enable(torch.nn.Linear(2, 2), "full_dqar")


def test_attention_granularity_needs_an_isolated_attention(monkeypatch):
    pipe, _ = flux()
    monkeypatch.setitem(adapter.ATTENTION_MODULES, "FluxSingleTransformerBlock", None)
    with pytest.raises(DqarError, match="attention granularity is not available for FluxSingleTransformerBlock") as err:
        dqar.enable(pipe, replace(dqar.preset("full_dqar"), granularity="attention"))
    assert "granularity = 'block'" in err.value.fix
    dqar.enable(pipe, replace(dqar.preset("full_dqar"), granularity="block")).disable()  # block granularity still runs


@pytest.mark.parametrize("order,dtype", [(0, "int8"), (1, "model"), (2, "model")])
def test_forecast_orders_and_histories_act_on_flux(order, dtype):
    pipe, kwargs = flux(true_cfg=True)
    cfg = replace(dqar.preset("full_dqar"), forecast_kind="taylor", forecast_order=order, cache_dtype=dtype)  # the taylor orders
    outs, steps = {}, 12  # enough steps for a three-entry history (order 2)
    with torch.no_grad(), dqar.enable(pipe, cfg) as handle:
        outs["reuse"] = run(pipe, kwargs, steps)
        stats = handle.stats
    assert stats.reused > 0 and (stats.forecasts > 0) == (order > 0) and (stats.quant_error is not None) == (dtype == "int8")
    with torch.no_grad(), dqar.enable(pipe, replace(cfg, forecast_order=(order + 1) % 3)):
        outs["other"] = run(pipe, kwargs, steps)
    assert not torch.equal(outs["reuse"], outs["other"])  # the order changes what a reuse returns


def test_enable_names_its_parameters():
    import inspect
    params = inspect.signature(dqar.enable).parameters
    assert [p for p in ("executor", "decider", "plan", "key") if params[p].kind is inspect.Parameter.KEYWORD_ONLY] == [
        "executor", "decider", "plan", "key"]
    with pytest.raises(TypeError):
        dqar.enable(torch.nn.Linear(2, 2), "full_dqar", executer="patch")


def test_a_plan_for_another_layer_count_is_refused():
    from dqar.engine.plan import Plan
    pipe, kwargs = flux()
    layers = len(adapter.describe(pipe.transformer).blocks)
    with dqar.enable(pipe, "full_dqar", plan=Plan(np.zeros((STEPS, layers + 1), dtype=bool))):
        with pytest.raises(DqarError, match="layer"):
            with torch.no_grad():
                run(pipe, kwargs, STEPS)


def test_enable_refuses_a_plan_file_of_another_stream_layout_before_attaching(tmp_path):
    from dqar.engine.plan import Plan, stream_layout

    pipe, _ = flux()
    layout = stream_layout(pipe.transformer)  # the tiny Flux: dual-stream blocks (2) then single-stream (1)
    before = hooks(pipe.transformer)
    path = tmp_path / "plan.json"
    path.write_text(Plan(np.zeros((STEPS, len(layout)), dtype=bool), key={"streams": [1] * len(layout)}).to_json())
    with pytest.raises(DqarError, match="plan was made for .*streams 1 x"):
        dqar.enable(pipe, replace(dqar.preset("full_dqar"), plan_file=str(path)))
    assert hooks(pipe.transformer) == before  # nothing attached
    path.write_text(Plan(np.zeros((STEPS, len(layout)), dtype=bool), key={"streams": layout}).to_json())
    dqar.enable(pipe, replace(dqar.preset("full_dqar"), plan_file=str(path))).disable()  # its own layout attaches


@pytest.mark.parametrize("key,expect", [({"steps": 3}, "plan was made for 8 layers but random-flux-tiny has 4 layers (streams 2 x4)"),
                                        ({"model": "embedded", "sampler": "ddim", "steps": 3},
                                         "plan was made for model='embedded' but this run has model='random-flux-tiny'")])
def test_a_plan_file_for_another_model_is_one_line_exit_2_on_a_flow_model(tmp_path, capsys, key, expect):
    """An 8-layer plan (the embedded DiT's shape; keyless, or saved for it) on random-flux-tiny's 2 + 2 blocks: refused in one line."""
    import json

    from dqar.cli import main

    (tmp_path / "plan.json").write_text(json.dumps({"format": "dqar-plan/1", "key": key, "rows": ["." * 8, "R" * 8, "R" * 8]}))
    (tmp_path / "cfg.toml").write_text(f"[reuse]\nplan_file = '{tmp_path / 'plan.json'}'\n")
    rc = main(["sample", "--model", "random-flux-tiny", "--device", "cpu", "--steps", "3", "--classes", "0", "--quiet",
               "--config", str(tmp_path / "cfg.toml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()  # nothing written
