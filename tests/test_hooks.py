"""dqar attaches through diffusers' HookRegistry: it composes with other registry hooks and detaches exactly."""
import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook, PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

import dqar
from dqar.engine.config import ReuseConfig
from dqar.engine.hooks import ATTENTION_HOOK, EVALUATION_HOOK

from conftest import E, drive, make_tiny_transformer

CFG = ReuseConfig(schedule="constant", warmup_frac=0.1)
PAB = "pyramid_attention_broadcast"


class Scale(ModelHook):
    """Another library's hook: scales its module's output."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def post_forward(self, module, output):
        return output * self.factor


class Count(ModelHook):
    """Another library's hook on the transformer: counts its forwards."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def add_scale(model, factor=0.5):
    for block in model.transformer_blocks:
        HookRegistry.check_if_exists_or_initialize(block.attn1).register_hook(Scale(factor), "scale")


def remove_scale(model):
    for block in model.transformer_blocks:
        block.attn1._diffusers_hook.remove_hook("scale", recurse=False)


def module_dicts(model):
    return {name: set(vars(m)) for name, m in model.named_modules()}


@pytest.fixture
def model():
    return make_tiny_transformer(num_layers=4)


@pytest.mark.parametrize("cfg", [CFG, ReuseConfig(schedule="constant", granularity="block"), ReuseConfig(schedule="constant", target="kv")])
def test_a_hook_added_after_dqar_keeps_acting_when_dqar_detaches(model, cfg):
    ref = drive(model)
    add_scale(model)
    scaled = drive(model)
    remove_scale(model)
    assert not torch.equal(scaled[-1], ref[-1])
    h = dqar.enable(model, cfg)
    add_scale(model)  # registered after dqar: it wraps dqar's attn1 hook
    both = drive(model, h)
    assert h.stats.reused > 0 and not torch.equal(both[-1], scaled[-1])
    h.disable()
    assert all(torch.equal(a, b) for a, b in zip(drive(model), scaled))  # the other hook still acts, dqar does not
    remove_scale(model)
    assert all(torch.equal(a, b) for a, b in zip(drive(model), ref))  # everything detached: stock output bit for bit


def test_a_hook_added_before_dqar_and_one_on_the_transformer_compose(model):
    add_scale(model)
    scaled = drive(model)
    counter = Count()
    h = dqar.enable(model, CFG)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(counter, "count")
    drive(model, h)
    assert counter.calls == E and h.stats.reused > 0
    h.disable()
    assert all(torch.equal(a, b) for a, b in zip(drive(model), scaled))
    assert counter.calls == 2 * E  # dqar's evaluation hook went, the counter stayed
    model._diffusers_hook.remove_hook("count", recurse=False)


def test_diffusers_pab_added_after_dqar_keeps_skipping(model):
    clock = [999]

    def run(handle=None):
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
        return drive(model, handle)

    ref = drive(model)
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 10_000),
                                             current_timestep_callback=lambda: clock[0])
    apply_pyramid_attention_broadcast(model, config)
    pab_only = run()
    assert not torch.equal(pab_only[-1], ref[-1])
    model._diffusers_hook.remove_hook(PAB, recurse=True)
    h = dqar.enable(model, CFG)
    apply_pyramid_attention_broadcast(model, config)
    h.begin_generation(E)  # a registry reset ends dqar's generation too; begin the next one after it
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)
    assert h.engine.state is None
    run(h)
    h.disable()
    assert all(torch.equal(a, b) for a, b in zip(run(), pab_only))
    model._diffusers_hook.remove_hook(PAB, recurse=True)
    assert all(torch.equal(a, b) for a, b in zip(drive(model), ref))


@pytest.mark.parametrize("executor", ["patch", "fused"])
def test_dqar_keeps_no_state_on_the_modules(model, executor):
    before = module_dicts(model)
    h = dqar.enable(model, ReuseConfig(schedule="constant", cache_dtype="int8"), executor=executor)
    drive(model, h)
    added = {k for name, keys in module_dicts(model).items() for k in keys - before[name]}
    assert added == {"_diffusers_hook", "forward"}  # diffusers' registry and the forward it wraps; nothing of dqar's
    assert model._diffusers_hook.get_hook(EVALUATION_HOOK) is not None
    h.disable()
    assert module_dicts(model) == before


def test_named_hooks_and_a_registry_reset_end_the_generation(model):
    h = dqar.enable(model, CFG)
    assert model.transformer_blocks[0].attn1._diffusers_hook.get_hook(ATTENTION_HOOK) is not None
    h.begin_generation(E)
    with torch.no_grad():
        x, labels = torch.randn(4, 4, 8, 8), torch.tensor([3, 7, 1000, 1000])
        for e in range(3):
            model(x, timestep=torch.full((4,), 999 - 80 * e), class_labels=labels)
    model._diffusers_hook.reset_stateful_hooks(recurse=True)
    assert h.engine.state is None and h.stats.evaluations == 3
    full = drive(model, h)  # the next generation begins as usual
    assert h.stats.evaluations == E and len(full) == E
    h.disable()
