"""The decider interface: per generation a context, per evaluation a row of reuse flags and a row of store flags.

The engine calls `begin(ctx)` once per generation, then `row(e)` and `store_row(e)` once at the
start of each evaluation e. A decider that declares `needs` (`dqar.engine.signals.Needs`) gets
the engine's `SignalRecorder` as `ctx.signals` (None for a decider that needs nothing); `row(e)`
may read the signals back at most once, counting it in `signals.host_syncs`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from dqar.engine.config import ReuseConfig
from dqar.engine.forecasters import forecaster_of
from dqar.engine.plan import Plan, build_plan, eligibility, staleness_limits
from dqar.engine.signals import Needs, SignalRecorder, Trace
from dqar.errors import DqarError


@dataclass(frozen=True)
class DeciderContext:
    """What a decider knows about the generation that begins."""

    num_evaluations: int
    num_layers: int
    scheduler: Any = None  # the sampler's scheduler, when known
    signals: SignalRecorder | None = None  # the engine's measurements; None when the decider needs none


class Decider(Protocol):
    """Chooses, per evaluation, which layers reuse and which computed outputs the cache keeps."""

    needs: Needs

    def begin(self, ctx: DeciderContext) -> None: ...

    def row(self, evaluation: int) -> tuple[bool, ...]: ...

    def store_row(self, evaluation: int) -> tuple[bool, ...]: ...


def store_rows(reusable: np.ndarray, keep_for_later: bool) -> list[tuple[bool, ...]]:
    """Per evaluation, which layers store what they compute: (E, L) where a reuse can happen → E rows.

    `keep_for_later`: store while any later evaluation may reuse (the cache then always holds the
    last computed outputs); else only when the next one may.
    """
    e, l = reusable.shape
    later = np.flip(np.cumsum(np.flip(reusable, 0), 0), 0) > 0 if keep_for_later else reusable  # (E, L)
    return [tuple(r) for r in np.concatenate([later[1:], np.zeros((1, l), dtype=bool)]).tolist()]


class PlanDecider:
    """Decisions read from a plan built once per (evaluations, layers) and kept."""

    needs = Needs()

    def __init__(self, cfg: ReuseConfig, key: dict[str, Any] | None = None, plan: Plan | None = None):
        self.cfg = cfg
        self.key = dict(key or {})
        self.fixed = plan
        self.plans: dict[tuple[int, int], tuple[Plan, list, list]] = {}
        self.plan: Plan | None = None
        self._rows: list[tuple[bool, ...]] = []
        self._store: list[tuple[bool, ...]] = []

    def begin(self, ctx: DeciderContext) -> None:
        shape = (ctx.num_evaluations, ctx.num_layers)
        if shape not in self.plans:
            plan = self.fixed or build_plan(self.cfg, *shape, {**self.key, "steps": ctx.num_evaluations})
            plan.check_shape(*shape)
            # a copy reads one computed output, and a reuse run only extends from one: "the next evaluation reuses" is enough
            # for it; a forecast reads the layer's last computed outputs, so each is kept while the layer reuses later
            self.plans[shape] = (plan, plan.rows(), store_rows(plan.mask, keep_for_later=forecaster_of(self.cfg).extrapolates))
        self.plan, self._rows, self._store = self.plans[shape]

    def row(self, evaluation: int) -> tuple[bool, ...]:
        return self._rows[evaluation]

    def store_row(self, evaluation: int) -> tuple[bool, ...]:
        return self._store[evaluation]


class EligibleDecider(ABC):
    """Online decisions inside the schedule: eligible cells (warmup, cooldown, layer schedule) under the staleness cap.

    A subclass accepts some of the candidates with one host read per evaluation that has any (`accept`).
    """

    keep_for_later = False  # store every computed output while a later evaluation may reuse it (always so for forecasts)
    name = "this decider"
    needs: Needs  # set by each subclass; one that measures nothing (`Needs()`) runs without the signal recorder

    def __init__(self, cfg: ReuseConfig):
        self.cfg = cfg
        self.signals: SignalRecorder | None = None
        self.decisions = np.zeros((0, 0), dtype=bool)  # (E, L) rows decided in the current generation

    def begin(self, ctx: DeciderContext) -> None:
        if ctx.signals is None and self.needs.any:
            raise DqarError(f"{self.name} needs the engine's signal recorder", "attach it with dqar.enable(model, config)")
        self.signals = ctx.signals
        e, l = ctx.num_evaluations, ctx.num_layers
        self.eligible = eligibility(self.cfg, e, l) if self.cfg.enabled else np.zeros((e, l), dtype=bool)  # (E, L)
        self.eligible[0] = False  # evaluation 0 always computes
        self.limits = staleness_limits(self.cfg, e)  # (E,) most consecutive reuses at each evaluation
        self._store = store_rows(self.eligible, self.keep_for_later or forecaster_of(self.cfg).extrapolates)
        self.staleness = np.zeros(l, dtype=np.int64)  # (L,) evaluations reused since the cached output was computed
        self.decisions = np.zeros((e, l), dtype=bool)
        self.through = -1  # the last evaluation decided

    @abstractmethod
    def accept(self, evaluation: int, candidate: np.ndarray) -> np.ndarray:
        """(L,) bool on the host: which candidates reuse (the one host read of this evaluation)."""

    def decided(self, evaluation: int, reuse: np.ndarray) -> None:
        """Called with each evaluation's final decisions (for deciders that track more than staleness)."""

    def row(self, evaluation: int) -> tuple[bool, ...]:
        if evaluation <= self.through:  # a later CFG branch (separate forwards) of a decided step: its row again, nothing read
            return tuple(self.decisions[evaluation].tolist())
        self.through = evaluation
        candidate = self.eligible[evaluation] & (self.staleness < self.limits[evaluation])  # (L,)
        if candidate.any():
            candidate = candidate & self.accept(evaluation, candidate)
            self.signals.host_syncs += 1
        self.decided(evaluation, candidate)
        self.staleness = np.where(candidate, self.staleness + 1, 0)
        self.decisions[evaluation] = candidate
        return tuple(candidate.tolist())

    def store_row(self, evaluation: int) -> tuple[bool, ...]:
        return self._store[evaluation]


class TracingDecider:
    """Full compute: every layer computes and stores, every signal is recorded (for calibration and policy traces).

    `input_rms`: also keep each evaluation's input RMS (`x_rms`, one 0-dim tensor per evaluation, on the device).
    `forecast`: record each change against what a reuse would read (the forecast at age 1 where forecast_order > 0).
    """

    def __init__(self, entropy_rows: int = 16, input_rms: bool = False, forecast: bool = False):
        self.needs = Needs(entropy=True, change=True, snr=("scheduler", "prediction"), entropy_rows=entropy_rows, record=True,
                           state_norm=input_rms, change_of_reuse=forecast)
        self.signals: SignalRecorder | None = None
        self.x_rms: list[torch.Tensor] = []

    def begin(self, ctx: DeciderContext) -> None:
        self.signals = ctx.signals
        self.x_rms = []
        self._compute = (False,) * ctx.num_layers
        self._store = (True,) * ctx.num_layers

    def row(self, evaluation: int) -> tuple[bool, ...]:
        if self.needs.state_norm:
            self.x_rms.append(self.signals.x_norm)  # () on the device; set by the engine before this call
        return self._compute

    def store_row(self, evaluation: int) -> tuple[bool, ...]:
        return self._store

    def trace(self) -> Trace:
        """The host copy of the signals recorded in the last generation."""
        return self.signals.trace()
