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

`BLOCK_FEATURES` is the model-agnostic set, for whole-block policies on any family the block adapter describes (Flux,
SD3, the DiT): the five features that need neither DiT attention (`entropy`) nor a DDPM noise schedule (the two
SNRs); `log_change_rate` is the relative change of the layer's image-stream block residual. `BLOCK_PROBE_FEATURES`
adds `log_probe_error`, the probe block's (the first layer's) change, which keeps that layer computing.

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
BLOCK_FEATURES = ("log_x_rms", "step_fraction", "layer_fraction", "age", "log_change_rate")
BLOCK_PROBE_FEATURES = (*BLOCK_FEATURES, PROBE_FEATURE)
FEATURE_SETS = (FEATURES, PROBE_FEATURES, BLOCK_FEATURES, BLOCK_PROBE_FEATURES)  # the feature sets a checkpoint may name
DIT_SIGNALS = ("entropy", "log_snr_scheduler", "log_snr_prediction")  # measured on DiT attention and DDPM schedules only
PROBE_LAYER = 0  # the layer whose change is `log_probe_error`
LOG_FLOOR = 1e-6  # values are clamped here before a log
MISSING_CHANGE = 1.0  # relative change assumed where none was measured yet


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x.float().clamp_min(LOG_FLOOR))


def latest_vector(values: Sequence[torch.Tensor | None], fill: float, device: torch.device) -> torch.Tensor:
    """(L,) float32 on `device` from per-layer 0-dim tensors, `fill` where a layer has none."""
    const = torch.full((), fill, device=device)
    return torch.stack([const if v is None else v.to(device).float().reshape(()) for v in values])


def dit_only(names) -> bool:
    """Whether a feature set reads a signal measured on DiT blocks only (`DIT_SIGNALS`)."""
    return any(n in DIT_SIGNALS for n in names)


def feature_matrix(change: torch.Tensor, gap: torch.Tensor, x_rms: torch.Tensor, step_fraction: torch.Tensor,
                   ages: torch.Tensor, num_layers: int, entropy: torch.Tensor | None = None,
                   snr_scheduler: torch.Tensor | None = None, snr_prediction: torch.Tensor | None = None,
                   probe_error: torch.Tensor | None = None, names: Sequence[str] | None = None) -> torch.Tensor:
    """Features (..., L, F) from per-layer (..., L) and per-evaluation (...,) tensors, all on one device.

    `change` is the last measured relative change of each layer, spanning `gap` evaluations; `ages` the staleness a
    reuse would have. `names`: the columns, in order (one of `FEATURE_SETS`); None: `PROBE_FEATURES` where
    `probe_error` is given, else `FEATURES`. A set reads only the inputs it names. Nothing here reads a value back.
    """
    names = tuple(names) if names is not None else (PROBE_FEATURES if probe_error is not None else FEATURES)
    shape = change.shape
    per_eval = lambda v: v.float()[..., None].expand(shape)  # noqa: E731  (...,) -> (..., L)
    columns = {
        "entropy": lambda: entropy.float(),
        "log_snr_scheduler": lambda: per_eval(_log(snr_scheduler)),
        "log_snr_prediction": lambda: per_eval(_log(snr_prediction)),
        "log_x_rms": lambda: per_eval(_log(x_rms)),
        "step_fraction": lambda: per_eval(step_fraction),
        "layer_fraction": lambda: (torch.arange(shape[-1], device=change.device, dtype=torch.float32)
                                   / max(num_layers - 1, 1)).expand(shape),
        "age": lambda: ages.float().expand(shape),
        "log_change_rate": lambda: _log(change.float() / gap.float().clamp_min(1.0)),
        PROBE_FEATURE: lambda: per_eval(_log(probe_error)),
    }
    return torch.stack([columns[n]() for n in names], dim=-1)  # (..., L, F)


def step_fraction(evaluation: int, num_evaluations: int) -> float:
    return evaluation / max(num_evaluations - 1, 1)


def log_threshold(threshold: float) -> float:
    """The policy's decision boundary in log-error space (-inf for a zero threshold: never reuse)."""
    return math.log(threshold) if threshold > 0 else -math.inf
