"""dqar's diffusers hooks: how the engine attaches to a transformer and composes with other registry hooks.

Every module dqar changes gets a named `diffusers.hooks.ModelHook` in its `HookRegistry`: the
transformer an `EvaluationHook` (one forward is one model evaluation, of the pipeline's cache
context where it sets one), each block or its attention module a `LayerHook` whose forward is
the engine's reuse forward for that layer. Hooks other libraries register before or after dqar
keep acting when dqar detaches; a registry dqar created and left empty is removed again, so a
detached module is exactly what it was. The hooks hold no state of
their own beyond the engine they call into.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from dqar.engine.branches import ContextTracker

EVALUATION_HOOK = "dqar_evaluation"
ATTENTION_HOOK = "dqar_attn1"
BLOCK_HOOK = "dqar_block"


class EvaluationHook(ModelHook):
    """On the transformer: decisions before each forward, signals after it; registry resets end the generation."""

    _is_stateful = True

    def __init__(self, engine):
        super().__init__()
        self.engine = engine
        self.contexts = ContextTracker(engine)  # diffusers' cache_context("cond" / "uncond") reaches the engine through it

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        if not self.engine.counting:
            self.engine.on_evaluation(args, kwargs)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if not self.engine.counting:
            self.engine.after_evaluation(output)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.engine.reset()
        return module


class LayerHook(ModelHook):
    """On a block or an `attn1`: its forward becomes `forward(original, *args, **kwargs)`, the engine's for one layer."""

    def __init__(self, forward: Callable):
        super().__init__()
        self.forward = forward

    def new_forward(self, module: torch.nn.Module, *args, **kwargs) -> Any:
        return self.forward(self.fn_ref.original_forward, *args, **kwargs)


def has_hook(module: torch.nn.Module, name: str) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(name) is not None


def add_hook(module: torch.nn.Module, name: str, hook: ModelHook) -> bool:
    """Register `hook` as `name`; True when this created the module's registry."""
    created = not hasattr(module, "_diffusers_hook")
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    return created


def remove_hook(module: torch.nn.Module, name: str, created: bool) -> None:
    """Remove hook `name`; a registry `add_hook` created and nothing else uses goes too (with its instance forward)."""
    registry = module._diffusers_hook
    _unlink(registry, name)
    if created and not registry.hooks:
        bound = module.__dict__.get("forward")
        if getattr(bound, "__func__", None) is type(module).forward and getattr(bound, "__self__", None) is module:
            del module.forward  # the registry left the stock forward bound on the instance
        del module._diffusers_hook


def _unlink(registry: HookRegistry, name: str) -> None:
    """`registry.remove_hook(name)`, keeping a hook registered after it in the chain.

    diffusers (0.42) points the next hook's `forward` at what lay beneath the removed one; for a hook
    with its own `new_forward` (PyramidAttentionBroadcast, FirstBlockCache, …) that drops it from the
    chain and leaves its `original_forward` calling the removed hook. Here it keeps its `new_forward`
    and its `original_forward` is what lay beneath (a no-op where diffusers already does so).
    """
    i = registry._hook_order.index(name)
    refs = registry._fn_refs
    removed, nxt = refs[i], (refs[i + 1] if i + 1 < len(refs) else None)
    beneath = removed.original_forward if removed.original_forward is not None else removed.forward
    kept = nxt.forward if nxt is not None else None
    registry.remove_hook(name, recurse=False)
    if nxt is not None and nxt.original_forward is not None:
        nxt.forward, nxt.original_forward = kept, beneath


def refresh_child_registries(root: torch.nn.Module) -> None:
    """After adding or removing hooks below `root`: drop the child-registry lists diffusers caches (as `enable_cache` does)."""
    registry = getattr(root, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()
