"""`PolicyDecider`: reuse decisions from a learned policy while sampling, one host read per evaluation.

At the start of an evaluation, for every layer the schedule and the staleness cap allow to
reuse, the features (`dqar.engine.features`) are built on the device from the engine's signals,
the MLP predicts the relative error of reusing the cached attention output (a `BLOCK_FEATURES` policy: the whole
block's residual, on any family, at block granularity), and layers whose
prediction is at most `policy_threshold` reuse (at most `policy_budget` of the layers, lowest
prediction first). The flags come back in one read, counted in `signals.host_syncs`. Warmup,
cooldown, the layer schedule and the staleness cap act as for the gate. A checkpoint trained with the probe
feature (`features.PROBE_FEATURES`) keeps its probe layer out of the candidates and stores it at every evaluation,
so its change, measured as it computes, is the feature the next evaluation reads.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dqar.engine.config import ReuseConfig
from dqar.engine.decider import DeciderContext, EligibleDecider
from dqar.errors import DqarError
from dqar.engine.gate import read_flags
from dqar.engine.signals import Needs
from dqar.engine.features import (FEATURES, MISSING_CHANGE, PROBE_FEATURE, PROBE_LAYER, dit_only, feature_matrix, latest_vector,
                                  log_threshold, step_fraction)
from dqar.engine.policy_net import PolicyCheckpoint, load_policy


TRAINED_DEFAULTS = {"granularity": "attention", "forecast_kind": "taylor", "forecast_axis": "evaluation"}  # what a checkpoint without these keys was labelled on


def policy_needs(ckpt: PolicyCheckpoint) -> Needs:
    """The signals the policy's features are built from (entropy subsample as in training); a `BLOCK_FEATURES` policy
    needs only block changes and the input RMS, which the engine measures on every family."""
    if not dit_only(feature_names(ckpt)):
        return Needs(change=True, state_norm=True)
    return Needs(entropy=True, change=True, snr=("scheduler", "prediction"), state_norm=True,
                 entropy_rows=int(ckpt.meta.get("entropy_rows", 16)))


def feature_names(ckpt: PolicyCheckpoint) -> tuple[str, ...]:
    """The feature set the checkpoint was trained on (`features.FEATURE_SETS`)."""
    return tuple(ckpt.meta.get("features", FEATURES))


def keep_lowest(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """(L,) bool: the at most `k` allowed entries with the lowest scores, on the device (no host read)."""
    masked = torch.where(allowed, scores, torch.full_like(scores, math.inf))  # (L,)
    order = torch.argsort(masked, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return allowed & (ranks < k)


class PolicyDecider(EligibleDecider):
    """Per-evaluation decisions from a learned reuse policy; at most one host sync per evaluation."""

    # keep every computed output while a later evaluation may reuse it: the cache always holds the last computed
    # output, so the change measured on each compute spans a known number of evaluations
    keep_for_later = True
    name = "the policy"

    def __init__(self, cfg: ReuseConfig, key: dict[str, Any] | None = None, checkpoint: PolicyCheckpoint | None = None):
        super().__init__(cfg)
        self.key = dict(key or {})
        self.checkpoint = checkpoint if checkpoint is not None else load_policy(cfg.policy)
        self.needs = policy_needs(self.checkpoint)
        self.names = feature_names(self.checkpoint)
        self.probe = PROBE_LAYER if PROBE_FEATURE in self.names else None  # None: no probe feature
        self._on_device: dict[torch.device, PolicyCheckpoint] = {}
        self.predictions: list[torch.Tensor] = []  # (L,) predicted log error per deciding evaluation, on the device

    def _check(self, num_layers: int) -> None:
        meta = self.checkpoint.meta
        trained = meta.get("num_layers")
        if trained is not None and int(trained) != num_layers:
            raise DqarError(f"the policy was trained for a {trained}-layer model but this one has {num_layers} layers",
                            "train a policy for this model with `dqar policy collect` and `dqar policy train`")
        order = meta.get("forecast_order")
        if order is not None and int(order) != self.cfg.forecast_order:
            raise DqarError(f"the policy was trained on order-{order} forecast labels but this run has forecast_order = "
                            f"{self.cfg.forecast_order}", f"set forecast_order = {order}, or collect and train a policy at "
                            f"this order (`dqar policy collect --forecast-order {self.cfg.forecast_order}`)")
        for name in TRAINED_DEFAULTS:
            have = getattr(self.cfg, name)
            trained_with = meta.get(name, TRAINED_DEFAULTS[name])  # policies before block features: attention, taylor
            if trained_with != have:
                raise DqarError(f"the policy was trained on {name} = {trained_with!r} labels but this run has {name} = {have!r}",
                                f"set {name} = {trained_with!r}, or collect and train a policy for this setting")
        model, have = meta.get("model"), self.key.get("model")
        if model is not None and have is not None and model != have:
            raise DqarError(f"the policy was trained for model {model!r} but this run uses {have!r}",
                            "train a policy for this model with `dqar policy collect` and `dqar policy train`")

    def begin(self, ctx: DeciderContext) -> None:
        self._check(ctx.num_layers)
        super().begin(ctx)
        l, p = ctx.num_layers, self.probe
        if p is not None:  # the probe computes and stores at every evaluation: its change is measured each time
            self.eligible[:, p] = False
            self._store = [row[:p] + (True,) + row[p + 1:] for row in self._store]
        self.last = np.full(l, -1, dtype=np.int64)  # (L,) evaluation of the last compute
        self.gap = np.ones(l, dtype=np.int64)  # (L,) evaluations spanned by the last measured change
        self.predictions = []
        self.num_evaluations = ctx.num_evaluations
        self.k = int(math.floor(self.cfg.policy_budget * l + 1e-9))

    def _model(self, device: torch.device) -> PolicyCheckpoint:
        if device not in self._on_device:
            self._on_device[device] = self.checkpoint.to(device)  # once per device
        return self._on_device[device]

    def predict(self, evaluation: int) -> torch.Tensor:
        """(L,) predicted log relative error of reusing each layer now, on the device."""
        sig = self.signals
        dev = sig.device
        zero = torch.zeros((), device=dev)
        one = torch.ones((), device=dev)
        dit = dit_only(self.names)
        feats = feature_matrix(
            entropy=latest_vector(sig.entropy_last, 1.0, dev) if dit else None,
            change=latest_vector(sig.change_last, MISSING_CHANGE, dev),
            gap=torch.as_tensor(self.gap, dtype=torch.float32).to(dev),
            snr_scheduler=sig.snr.get("scheduler", zero) if dit else None,
            snr_prediction=sig.snr.get("prediction", one) if dit else None,
            x_rms=sig.x_norm if sig.x_norm is not None else one,
            step_fraction=torch.full((), step_fraction(evaluation, self.num_evaluations), device=dev),
            ages=torch.as_tensor(self.staleness + 1, dtype=torch.float32).to(dev),
            num_layers=len(self.staleness),
            probe_error=None if self.probe is None else latest_vector([sig.change_last[self.probe]], MISSING_CHANGE, dev)[0],
            names=self.names,
        )  # (L, F)
        return self._model(dev).predict(feats)  # (L,)

    def flags(self, evaluation: int, candidate: np.ndarray) -> torch.Tensor:
        """(L,) bool on the device: candidates whose predicted error is within the threshold, within the budget."""
        pred = self.predict(evaluation)
        self.predictions.append(pred)
        allowed = torch.as_tensor(candidate).to(pred.device) & (pred <= log_threshold(self.cfg.policy_threshold))
        if self.k < len(candidate):
            allowed = keep_lowest(pred, allowed, self.k)
        return allowed

    def accept(self, evaluation: int, candidate: np.ndarray) -> np.ndarray:
        return read_flags(self.flags(evaluation, candidate))

    def decided(self, evaluation: int, reuse: np.ndarray) -> None:
        computing = ~reuse
        self.gap = np.where(computing & (self.last >= 0), evaluation - self.last, self.gap)
        self.last = np.where(computing, evaluation, self.last)
