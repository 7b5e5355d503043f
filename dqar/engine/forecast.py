"""Forecast weights: extrapolate a layer's output from its last computed outputs, on the host.

A reused output at position `x` (an evaluation index or a timestep) is forecast from the layer's
newest computed outputs `y_0, …, y_k` at positions `x_0 > x_1 > … > x_k` as the polynomial of
degree k through them, evaluated at `x` (Newton's finite differences, written as Lagrange weights):

    ŷ(x) = Σ_i w_i · y_i,   w_i = Π_{j≠i} (x − x_j) / (x_i − x_j)

Order 0 is a copy (w = [1]); order 1 is `y_0 + (x − x_0)·(y_0 − y_1)/(x_0 − x_1)`; order 2 adds the
next finite difference. Where fewer outputs exist than the order asks, the order drops to what there
is. The weights are plain floats computed from positions the host already knows (the plan or the
decider's rows), so using them costs no device→host read; they enter compiled graphs as tensors.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from dqar.errors import DqarError

FORECAST_ORDERS = (0, 1, 2)
FORECAST_AXES = ("evaluation", "timestep")


def weights(history: Sequence[float], at: float, order: int) -> tuple[float, ...]:
    """Lagrange extrapolation weights over `history` (positions, newest first) for the value at `at`.

    Uses the newest `min(order, len(history) - 1) + 1` positions; the result has that many weights
    and they sum to 1 (a constant is reproduced exactly).
    """
    if order not in FORECAST_ORDERS:
        raise DqarError(f"forecast_order = {order!r} is not supported", f"use one of: {', '.join(map(str, FORECAST_ORDERS))}")
    if not history:
        raise DqarError("a forecast needs at least one computed output", "compute the layer before reusing it")
    xs = [float(x) for x in history[: min(order, len(history) - 1) + 1]]
    if len(set(xs)) != len(xs):
        raise DqarError(f"forecast positions {xs} repeat", "give each computed output its own evaluation or timestep")
    out = []
    for i, xi in enumerate(xs):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (at - xj) / (xi - xj)
        out.append(w)
    return tuple(out)


def positions(axis: str, num_evaluations: int, timesteps: Sequence[float] | None = None) -> np.ndarray:
    """(E,) float64: where each evaluation lies on the forecast axis.

    "evaluation": 0, 1, …, E−1. "timestep": the scheduler's timestep of each evaluation (one per
    evaluation; DDIM's are evenly spaced, DPM-Solver's are not), falling back to the index when the
    scheduler gives none.
    """
    if axis not in FORECAST_AXES:
        raise DqarError(f"unknown forecast_axis '{axis}'", f"choose one of: {', '.join(FORECAST_AXES)}")
    if axis == "evaluation" or timesteps is None:
        return np.arange(num_evaluations, dtype=np.float64)
    t = np.asarray([float(v) for v in timesteps], dtype=np.float64)
    if t.shape != (num_evaluations,):
        raise DqarError(f"{t.shape[0]} timesteps for {num_evaluations} evaluations",
                        "use forecast_axis = 'evaluation' with a sampler that makes several evaluations per timestep")
    return t


def table(mask: np.ndarray, pos: np.ndarray, order: int) -> np.ndarray:
    """(E, L, order + 1) float32 weights for every reuse cell of a plan; rows where the layer computes are 0.

    `mask[e, l]` True = layer l reuses at evaluation e. Weight k applies to the layer's k-th newest
    computed output (k = 0 the newest). A reuse before any computed output gets no weights.
    """
    mask = np.asarray(mask, dtype=bool)
    e_count, l_count = mask.shape
    out = np.zeros((e_count, l_count, order + 1), dtype=np.float32)
    for layer in range(l_count):
        computed: list[float] = []  # positions of this layer's computed outputs, newest first
        for e in range(e_count):
            if not mask[e, layer]:
                computed.insert(0, float(pos[e]))
                del computed[order + 1:]
            elif computed:
                w = weights(computed, float(pos[e]), order)
                out[e, layer, : len(w)] = w
    return out
