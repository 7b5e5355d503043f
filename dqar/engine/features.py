"""The learned policy's input: one feature vector per (evaluation, layer), built on the device.

The same function builds the features for training rows (from a full-compute trace) and for
decisions while sampling (from the engine's `SignalRecorder`), so both see identical numbers:

- `entropy`: normalized attention entropy of the layer's last computed attention, in [0, 1];
- `log_snr_scheduler`: log ᾱ_t/(1-ᾱ_t) of this evaluation's timestep (a monotone function of t);
- `log_snr_prediction`: log ‖x̂0‖²/‖x_t-x̂0‖² of the previous evaluation's output (0 before the first);
- `log_x_rms`: log of ‖x_t‖₂/√n, the RMS of this evaluation's input;
- `step_fraction`: evaluation / (evaluations - 1);
- `layer_fraction`: layer / (layers - 1);
- `age`: evaluations since the output a reuse would return was computed (its staleness, >= 1);
- `log_change_rate`: log of the layer's last measured relative change divided by the evaluations it
  spanned (1.0 — "changes completely" — where none was measured yet).

Feature sets are versioned by their names, which a checkpoint stores: `FEATURES` (the 8 above, every policy
trained before the probe feature) and `PROBE_FEATURES`, which adds

- `log_probe_error`: log of the probe layer's (`PROBE_LAYER`, the first: the verifying decider's default probe)
  last measured relative change, the same for every layer of the evaluation. A policy with this feature never
  reuses the probe layer, which computes and stores at every evaluation, so the value read at evaluation e is the
  probe's change from e−2 to e−1: the verify signal at age 1 (the copy's error), one evaluation late, because the
  policy decides before any layer of e runs (1.0 where none was measured yet).

A policy builds the features its checkpoint names, so a policy trained without the probe feature acts as before.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

FEATURES = ("entropy", "log_snr_scheduler", "log_snr_prediction", "log_x_rms", "step_fraction", "layer_fraction", "age",
            "log_change_rate")
PROBE_FEATURE = "log_probe_error"
PROBE_FEATURES = (*FEATURES, PROBE_FEATURE)
FEATURE_SETS = (FEATURES, PROBE_FEATURES)  # the feature sets a checkpoint may name
PROBE_LAYER = 0  # the layer whose change is `log_probe_error`
LOG_FLOOR = 1e-6  # values are clamped here before a log
MISSING_CHANGE = 1.0  # relative change assumed where none was measured yet


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.float().clamp_min(LOG_FLOOR))


def latest_vector(values: Sequence[torch.Tensor | None], fill: float, device: torch.device) -> torch.Tensor:
    """(L,) float32 on `device` from per-layer 0-dim tensors, `fill` where a layer has none."""
    const = torch.full((), fill, device=device)
    return torch.stack([const if v is None else v.to(device).float().reshape(()) for v in values])


def feature_matrix(entropy: torch.Tensor, change: torch.Tensor, gap: torch.Tensor, snr_scheduler: torch.Tensor,
                   snr_prediction: torch.Tensor, x_rms: torch.Tensor, step_fraction: torch.Tensor, ages: torch.Tensor,
                   num_layers: int, probe_error: torch.Tensor | None = None) -> torch.Tensor:
    """Features (..., L, F) from per-layer (..., L) and per-evaluation (...,) tensors, all on one device.

    `change` is the last measured relative change of each layer, spanning `gap` evaluations;
    `ages` the staleness a reuse would have; `probe_error` (...,): given, the `PROBE_FEATURES` set (F = 9), else
    `FEATURES` (F = 8). Nothing here reads a value back to the host.
    """
    layers = entropy.shape[-1]
    frac_layer = torch.arange(layers, device=entropy.device, dtype=torch.float32) / max(num_layers - 1, 1)  # (L,)
    per_eval = lambda v: v.float()[..., None].expand(entropy.shape)  # noqa: E731  (...,) -> (..., L)
    cols = [
        entropy.float(),
        per_eval(_log(snr_scheduler)),
        per_eval(_log(snr_prediction)),
        per_eval(_log(x_rms)),
        per_eval(step_fraction),
        frac_layer.expand(entropy.shape),
        ages.float().expand(entropy.shape),
        _log(change.float() / gap.float().clamp_min(1.0)),
    ]
    if probe_error is not None:
        cols.append(per_eval(_log(probe_error)))
    return torch.stack(cols, dim=-1)  # (..., L, F)


def step_fraction(evaluation: int, num_evaluations: int) -> float:
    return evaluation / max(num_evaluations - 1, 1)


def log_threshold(threshold: float) -> float:
    """The policy's decision boundary in log-error space (-inf for a zero threshold: never reuse)."""
    return math.log(threshold) if threshold > 0 else -math.inf
