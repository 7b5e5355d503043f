"""Full-compute traces measured outside the engine, for families whose signals the engine does not record (Flux, SD3).

The engine measures signals (entropy, change) on DiT `BasicTransformerBlock`s only and refuses a tracing decider on
other blocks. A calibrated plan needs only the change a reuse would miss, and plain forward hooks measure that on any
family the block adapter describes: the model samples with nothing of the engine attached, and a hook on each layer's
reused module (its attention module at attention granularity, else the block) keeps the layer's newest outputs per CFG
branch (diffusers' `cache_context`). At evaluation e ≥ 1 the trace holds, per layer, `‖o_e − r_e‖ / ‖r_e‖` over the
layer's output streams together, `r_e` what a reuse would return there (order 0: `o_(e−1)`; else the engine's own
forecast from the newest outputs, `Forecaster.weights` of the run's `forecast_kind`, on the run's forecast axis), and the
largest of the branches' values: a plan reuses a cell in every branch (plans count denoising steps). Entropy and the
prediction SNR are not measured (NaN); the scheduler SNR is rectified flow's `((1 − σ) / σ)²`.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.hooks import ModelHook

from dqar.engine.adapter import Layout, describe
from dqar.engine.branches import ContextTracker
from dqar.engine.config import RunConfig
from dqar.engine.forecasters import Forecaster, forecaster_of
from dqar.engine.hooks import add_hook, refresh_child_registries, remove_hook
from dqar.engine.signals import Trace
from dqar.generate import generate

TRACE_HOOK = "dqar_block_trace"
SNR_EPS = 1e-12


class Evaluations(ModelHook):
    """On the transformer: tells the recorder each forward's timestep and input (it counts each branch's forwards)."""

    _is_stateful = True

    def __init__(self, recorder):
        super().__init__()
        self.recorder = recorder
        self.contexts = ContextTracker(recorder)  # diffusers' cache_context reaches the recorder through it

    def pre_forward(self, module, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")  # (B, T, C) tokens, or (B, C, H, W)
        self.recorder.begin_evaluation(kwargs.get("timestep", args[1] if len(args) > 1 else None), hidden)
        return args, kwargs


class BlockTrace:
    """Forward hooks on one transformer's reused modules: per branch, per layer, the error of the reuse at each evaluation."""

    def __init__(self, layout: Layout, granularity: str, forecaster: Forecaster, axis: str):
        self.layout, self.forecaster, self.axis = layout, forecaster, axis
        self.context: str | None = None  # set by the ContextTracker
        self.evaluation: dict[str | None, int] = {}  # branch → its current evaluation
        self.timesteps: list[float] = []  # of the first branch's evaluations
        self.past: dict[tuple[str | None, int], list[tuple[float, list[torch.Tensor]]]] = {}  # newest first
        self.values: dict[tuple[str | None, int, int], torch.Tensor] = {}  # (branch, evaluation, layer) → () error
        modules = [layout.attention_module(i) if granularity == "attention" else b for i, b in enumerate(layout.blocks)]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def begin_evaluation(self, timestep: Any, hidden: torch.Tensor | None = None) -> None:
        e = self.evaluation.get(self.context, -1) + 1
        self.evaluation[self.context] = e
        if e == len(self.timesteps):
            t = torch.as_tensor(timestep).reshape(-1)[:1].float().cpu() if timestep is not None else None
            self.timesteps.append(float(t) if t is not None else float(e))

    def position(self, e: int) -> float:
        return float(e) if self.axis == "evaluation" else self.timesteps[e]

    def _hook(self, layer: int):
        def hook(module, args, output):
            streams = [t.detach().float() for t in (output if isinstance(output, (tuple, list)) else (output,)) if torch.is_tensor(t)]
            branch = self.context
            e = self.evaluation.get(branch, 0)
            at = self.position(e)
            past = self.past.setdefault((branch, layer), [])
            if past:
                w = self.forecaster.weights([p for p, _ in past], at)
                ref = [sum(wi * old[s] for wi, (_, old) in zip(w, past)) for s in range(len(streams))]
                diff = sum(((o - r) ** 2).sum() for o, r in zip(streams, ref))
                norm = sum((r ** 2).sum() for r in ref)
                self.values[(branch, e, layer)] = (diff / norm.clamp_min(SNR_EPS)).sqrt()
            past.insert(0, (at, streams))
            del past[self.forecaster.depth:]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def trace(self, num_layers: int, sigma_of) -> Trace:
        """The host copy: (E, L) change as the largest over branches, NaN entropy, rectified-flow SNR."""
        e_count = len(self.timesteps)
        keys = list(self.values)
        host = torch.stack([self.values[k] for k in keys]).cpu().numpy() if keys else np.zeros(0)
        change = np.full((e_count, num_layers), np.nan)
        for (_, e, l), v in zip(keys, host):
            change[e, l] = v if not np.isfinite(change[e, l]) else max(change[e, l], v)
        sigma = np.clip(np.array([sigma_of(t) for t in self.timesteps]), SNR_EPS, 1.0)
        return Trace(entropy=np.full((e_count, num_layers), np.nan), change=change,
                     snr_scheduler=((1.0 - sigma) / sigma) ** 2, snr_prediction=np.full(e_count, np.nan))


def record_block_trace(loaded, labels: Sequence[int], run: RunConfig, *, progress: bool = False) -> Trace:
    """Signals of one full-compute generation of `labels` under `run`'s sampling settings, measured by forward hooks."""
    transformer = loaded.transformer
    layout = describe(transformer)
    r = run.reuse
    recorder = BlockTrace(layout, r.granularity, forecaster_of(r), r.forecast_axis)
    created = add_hook(transformer, TRACE_HOOK, Evaluations(recorder))
    try:
        generate(loaded, labels, replace(run, reuse=replace(r, enabled=False)), progress=progress)
    finally:
        recorder.remove()
        remove_hook(transformer, TRACE_HOOK, created)
        refresh_child_registries(transformer)
    flux = getattr(loaded, "family", "") == "flux"  # Flux receives σ = t / 1000; SD3 the timestep t
    return recorder.trace(len(layout.blocks), (lambda t: t) if flux else (lambda t: t / 1000.0))
