"""CFG branches run as separate forwards: one history per branch, so a forecast never mixes two trajectories.

FluxPipeline's `true_cfg_scale`, Wan and Qwen-Image run the transformer twice per denoising step, inside
`transformer.cache_context("cond")` and `cache_context("uncond")`. diffusers hands that context to every
stateful hook (`hooks.hooks._set_cache_context`); dqar's evaluation hook passes it on to the engine. Each
context is a branch with its own cache, reuse mask and evaluation counter: a branch's k-th forward is the
generation's k-th evaluation (denoising step), so plans count steps, not forwards. A decider that decides inside the
forward (the verifying decider) decides a step on the branch that runs it first and replays that decision to the
others (`dqar.engine.verify`). A pipeline with one forward per step (batched CFG, or none) runs one branch and
nothing here changes what it computes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

FIELDS = ("cache", "executed", "shared", "rows_per_eval", "evaluation", "finished", "row_share")


@dataclass
class Branch:
    """One branch's part of a generation (mirrored on `GenerationState` while it runs)."""

    cache: Any  # LayerCache
    executed: np.ndarray  # (E, L) bool: reuse executed
    shared: np.ndarray  # (E, L) bool: attn1 computed on one CFG half
    rows_per_eval: list[int]  # batch rows of each of its forwards
    row_share: Any = None  # (E, L) float: share of rows reused where per-sample refresh split the batch
    evaluation: int = -1
    finished: int = 0


def switch(st, name: str | None, fresh: Callable[[], Branch]) -> None:
    """Make branch `name` current (its fields mirrored on the state `st`), keeping the one it replaces."""
    if name == st.branch:
        return
    st.branches[st.branch] = Branch(**{f: getattr(st, f) for f in FIELDS})
    b = st.branches.pop(name, None) or fresh()
    for f in FIELDS:
        setattr(st, f, getattr(b, f))
    st.branch = name


def ran(st) -> list[Branch]:
    """Every branch of the generation that has run a forward, the current one included."""
    current = Branch(**{f: getattr(st, f) for f in FIELDS})
    return [b for b in (*st.branches.values(), current) if b.evaluation >= 0]


class ContextTracker(StateManager):
    """Held by the evaluation hook, so diffusers' `cache_context` reaches it; forwards the context name to the engine."""

    def __init__(self, engine):
        super().__init__(BaseState)
        self.engine = engine

    def set_context(self, context: CacheContext | None) -> None:
        super().set_context(context)
        self.engine.context = None if context is None else context.name
