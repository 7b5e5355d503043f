"""Policy traces at block granularity, on any family the block adapter describes (Flux, SD3, the DiT).

A whole-block reuse at evaluation e returns the block's inputs plus what the engine's forecaster makes of the
residuals `r = out − in` it stored before (`dqar.engine.forwards.block`, one residual per output stream). Forward
hooks on every block (nothing of the engine attached) keep, per CFG branch (diffusers' `cache_context`), each
layer's newest residuals, and measure at every evaluation e, layer l and age a = 1..`max_age`:

- the **label**: `max_s ‖ŷ_s − r_e,s‖ / ‖h_e,s‖` over the output streams s (image, and text for joint blocks), ŷ the
  run's forecast (`forecast_kind`, `forecast_order`, the evaluation axis) from the residuals computed at e−a, e−a−1, …,
  h the stream's block input: the relative perturbation the reuse injects into that stream. The largest over the
  branches: a step's decision holds in every branch (`dqar.engine.branches`). The max over streams is the verifying
  decider's rule (`dqar.engine.verify`): the text tokens are few, yet every later block attends to them.
- the **change** the engine measures when a layer computes with a policy attached: `‖r_e − r_(e−a)‖ / ‖r_(e−a)‖` of the
  image stream, on the first branch (the engine measures signals on that branch only).

and, per evaluation, the RMS of the transformer's input (first branch). `collect` makes a `FullCompute` of the result
and its rows with `features.BLOCK_FEATURES` (or `BLOCK_PROBE_FEATURES`).
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from dqar.engine.adapter import Layout, describe, outputs
from dqar.engine.config import RunConfig
from dqar.engine.forecasters import Forecaster, forecaster_of
from dqar.engine.hooks import add_hook, refresh_child_registries, remove_hook
from dqar.engine.signals import Trace
from dqar.generate import generate
from dqar.tuning.block_trace import TRACE_HOOK, Evaluations

EPS = 1e-12


class BlockErrors:
    """Hooks on every block: per branch, the residual history and the per-age label and change (module docstring)."""

    def __init__(self, layout: Layout, max_age: int, forecaster: Forecaster):
        self.layout, self.max_age, self.forecaster = layout, max_age, forecaster
        self.context: str | None = None  # set by the ContextTracker
        self.first: str | None = None  # the first branch run: where the engine measures signals
        self.evaluation: dict[str | None, int] = {}
        self.x_rms: list[torch.Tensor] = []  # () per evaluation, first branch
        self.inputs: list[tuple[torch.Tensor, torch.Tensor | None]] = [(None, None)] * len(layout.blocks)
        self.past: dict[tuple[str | None, int], list[list[torch.Tensor]]] = {}  # newest first, residual per stream
        self.labels: dict[tuple[str | None, int, int, int], torch.Tensor] = {}  # (branch, e, layer, age) → ()
        self.changes: dict[tuple[int, int, int], torch.Tensor] = {}  # (e, layer, age) → (), first branch
        self.handles = []
        for i, b in enumerate(layout.blocks):
            self.handles += [b.register_forward_pre_hook(functools.partial(self._block_in, i), with_kwargs=True),
                             b.register_forward_hook(functools.partial(self._block_out, i))]

    def begin_evaluation(self, timestep, hidden: torch.Tensor | None = None) -> None:
        if not self.evaluation:
            self.first = self.context
        e = self.evaluation.get(self.context, -1) + 1
        self.evaluation[self.context] = e
        if self.context == self.first and hidden is not None:
            self.x_rms.append(hidden.detach().float().pow(2).mean().sqrt())  # (), as `SignalRecorder` measures it

    def _block_in(self, layer: int, module, args, kwargs) -> None:
        hidden, encoder = self.layout.inputs(layer, args, kwargs)  # (B, T, C), (B, S, C) or None
        self.inputs[layer] = (hidden.detach().float(), None if encoder is None else encoder.detach().float())

    def _block_out(self, layer: int, module, args, output) -> None:
        h, e_out = outputs(self.layout.specs[layer], output)
        h_in, e_in = self.inputs[layer]
        streams = [(h.detach().float() - h_in, h_in)]  # (residual, block input) per stream
        if e_out is not None and e_in is not None:
            streams.append((e_out.detach().float() - e_in, e_in))
        branch = self.context
        e = self.evaluation.get(branch, 0)
        past = self.past.setdefault((branch, layer), [])
        for a in range(1, min(self.max_age, len(past)) + 1):
            known = past[a - 1:]  # newest first: the newest computed a evaluations ago
            w = self.forecaster.weights([float(e - a - i) for i in range(len(known))], float(e))
            errors = [(sum(wi * old[s] for wi, old in zip(w, known)) - r).norm() / x.norm().clamp_min(EPS)
                      for s, (r, x) in enumerate(streams)]
            self.labels[(branch, e, layer, a)] = errors[0] if len(errors) == 1 else torch.stack(errors).max()
            if branch == self.first:
                old = known[0][0]
                self.changes[(e, layer, a)] = (streams[0][0] - old).norm() / old.norm().clamp_min(EPS)
        past.insert(0, [r for r, _ in streams])
        del past[self.max_age + self.forecaster.depth:]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def host(self, num_evaluations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x_rms (E,), change (E, L, A), label (E, L, A)) on the host in one read, NaN where undefined."""
        keys_l, keys_c = list(self.labels), list(self.changes)
        values = [self.labels[k] for k in keys_l] + [self.changes[k] for k in keys_c] + self.x_rms
        host = torch.stack(values).cpu().numpy().astype(np.float64) if values else np.zeros(0)
        shape = (num_evaluations, len(self.layout.blocks), self.max_age)
        label, change = np.full(shape, np.nan), np.full(shape, np.nan)
        for (_, e, l, a), v in zip(keys_l, host[: len(keys_l)]):
            label[e, l, a - 1] = v if not np.isfinite(label[e, l, a - 1]) else max(label[e, l, a - 1], v)
        for (e, l, a), v in zip(keys_c, host[len(keys_l): len(keys_l) + len(keys_c)]):
            change[e, l, a - 1] = v
        return host[len(keys_l) + len(keys_c):], change, label


def block_full_compute(loaded, labels: Sequence[int], run: RunConfig, max_age: int):
    """Sample `labels` with every block computed, measuring block-residual labels and changes: the fields of a
    `collect.FullCompute`, (trace, x_rms (E,), change (E, L, A), label (E, L, A), images (N, C, H, W))."""
    transformer = loaded.transformer
    layout = describe(transformer)
    recorder = BlockErrors(layout, max_age, forecaster_of(run.reuse))
    created = add_hook(transformer, TRACE_HOOK, Evaluations(recorder))
    try:
        out = generate(loaded, labels, replace(run, reuse=replace(run.reuse, enabled=False))).output
    finally:
        recorder.remove()
        remove_hook(transformer, TRACE_HOOK, created)
        refresh_child_registries(transformer)
    e_count = recorder.evaluation.get(recorder.first, -1) + 1
    x_rms, change, errors = recorder.host(e_count)
    nan_el, nan_e = np.full((e_count, len(layout.blocks)), np.nan), np.full(e_count, np.nan)
    trace = Trace(entropy=nan_el, change=change[:, :, 0], snr_scheduler=nan_e, snr_prediction=nan_e)
    return trace, x_rms, change, errors, out.images
