"""Forecasters (`forecast_kind`): the host-side weights that turn a layer's stored history into what a reuse returns.

Every kind gives weights `w` with `ŷ(x) = Σ_i w_i · y_i` over the layer's newest stored outputs `y_0, y_1, …`
(newest first) at positions `x_0, x_1, …`: computed from positions only, linear in the stored values, summing to 1
(a constant is reproduced). So every kind runs on an INT8 history and on every executor that takes forecasts
(patch, fused, compiled, graph), with no device→host read.

- "taylor": the polynomial of degree `forecast_order` through the newest order + 1 outputs (`dqar.engine.forecast`).
- "hermite": a least-squares fit of a degree-`forecast_order` polynomial over the newest `forecast_points` outputs,
  in the probabilists' Hermite basis He_0 … He_d of the normalised position u = (x − mean) / half-range, evaluated
  at the target. With points = order + 1 it interpolates (= "taylor"); with more points it smooths: a noisy or
  INT8-rounded history is averaged, not amplified. (The basis keeps the normal equations well conditioned; the
  fitted values are those of any basis of the same polynomials.)
- "bdf2_heun": a predictor-corrector over the newest three outputs. Predictor: the variable-step BDF2 step
  `y* = a·y_0 + b·y_1 + β·h·f`, the slope f frozen at the newest point (the derivative there of the quadratic
  through the three outputs). Corrector (Heun): `y = y_0 + h/2 · (f_0 + f*)`, f* the slope at the target of the
  quadratic through (x, y*), (x_0, y_0), (x_1, y_1). Exact on linear trajectories, second order on curved ones
  with weights smaller than the quadratic's (uniform steps: 5/2, −2, 1/2 against 3, −3, 1).
  What the corrector does not do: it never evaluates the layer at the target. A probe block's fresh output
  (the verifying decider, `dqar.engine.verify`) corrects the probe layer only — it is computed and stored — and
  drives the refresh decision; it does not enter the other layers' weights, which would make them data-dependent
  device values instead of host floats from positions.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from dqar.engine import forecast
from dqar.errors import DqarError

FORECAST_KINDS = ("taylor", "hermite", "bdf2_heun")
MAX_POINTS = 8  # most history entries a "hermite" fit may keep per layer


@dataclass(frozen=True)
class Forecaster:
    """One forecast kind with its order (degree) and, for "hermite", the history points it fits."""

    kind: str = "taylor"
    order: int = 0  # taylor: 0 copy, 1 linear, 2 quadratic; hermite: the fitted degree (1, 2); bdf2_heun: 2
    points: int = 0  # hermite: newest outputs fitted (0: order + 2); the other kinds: 0

    def __post_init__(self) -> None:
        if self.kind not in FORECAST_KINDS:
            raise DqarError(f"unknown forecast_kind '{self.kind}'", f"choose one of: {', '.join(FORECAST_KINDS)}")
        if self.kind == "hermite" and self.order not in (1, 2):
            raise DqarError(f"forecast_kind 'hermite' fits a polynomial of degree forecast_order, got {self.order!r}",
                            "use forecast_order = 1 or 2 with hermite")
        if self.kind == "bdf2_heun" and self.order != 2:
            raise DqarError(f"forecast_kind 'bdf2_heun' steps over three outputs, got forecast_order = {self.order!r}",
                            "use forecast_order = 2 with bdf2_heun, or forecast_kind = 'taylor' for orders 0-1")
        points = self.points
        if not isinstance(points, int) or isinstance(points, bool) or points < 0:
            raise DqarError(f"forecast_points = {points!r} is invalid", "use an integer >= 0 (0: the kind's default)")
        if points and self.kind != "hermite":
            raise DqarError(f"forecast_points = {points} applies to forecast_kind 'hermite' only", "set forecast_points = 0")
        if points and not self.order + 1 <= points <= MAX_POINTS:
            raise DqarError(f"forecast_points = {points} cannot fit degree {self.order}",
                            f"use forecast_points in [{self.order + 1}, {MAX_POINTS}] (or 0: {self.order + 2})")

    @property
    def depth(self) -> int:
        """History entries each layer keeps for this kind (what the cache and the graph buffers hold)."""
        if self.kind == "hermite":
            return self.points or self.order + 2
        return 3 if self.kind == "bdf2_heun" else self.order + 1

    @property
    def extrapolates(self) -> bool:
        """Whether a reuse reads more than a copy of the newest output."""
        return self.depth > 1

    def weights(self, history: Sequence[float], at: float) -> tuple[float, ...]:
        """Weights over `history` (positions, newest first) for the value at `at`; as many as entries used.
        Memoized on (kind, positions, target): the graph executor asks for them per layer and evaluation on the host,
        and the layers of a plan share their histories (28 identical requests per DiT-XL/2 evaluation)."""
        return _weights(self, tuple(float(x) for x in history[: self.depth]), float(at))


@functools.lru_cache(maxsize=1 << 16)
def _weights(f: Forecaster, xs: tuple[float, ...], at: float) -> tuple[float, ...]:
    """`Forecaster.weights` over the newest `f.depth` positions `xs`."""
    if f.kind == "taylor" or len(xs) < 2:
        return forecast.weights(xs, at, f.order if f.kind == "taylor" else 0)
    if len(set(xs)) != len(xs):
        raise DqarError(f"forecast positions {list(xs)} repeat", "give each computed output its own evaluation or timestep")
    if f.kind == "hermite":
        return hermite_weights(list(xs), at, f.order)
    return bdf2_heun_weights(list(xs), at)


def as_forecaster(order: "int | Forecaster") -> Forecaster:
    """A `Forecaster` from itself or from a plain order (the "taylor" kind, as before forecast_kind)."""
    return order if isinstance(order, Forecaster) else Forecaster("taylor", int(order))


def forecaster_of(cfg) -> Forecaster:
    """The forecaster a `ReuseConfig` asks for."""
    return Forecaster(cfg.forecast_kind, cfg.forecast_order, cfg.forecast_points)


def hermite_basis(u: np.ndarray, degree: int) -> np.ndarray:
    """(n, degree + 1): He_0 … He_degree at u, by He_{k+1} = u·He_k − k·He_{k−1}."""
    cols = [np.ones_like(u), u]
    for k in range(1, degree):
        cols.append(u * cols[k] - k * cols[k - 1])
    return np.stack(cols[: degree + 1], axis=1)


def hermite_weights(xs: list[float], at: float, degree: int) -> tuple[float, ...]:
    """Least-squares weights: ŷ(at) = b(u_at) · (AᵀA)⁻¹Aᵀ y, so w = A (AᵀA)⁻¹ b(u_at), A the basis at the history."""
    x = np.asarray(xs, dtype=np.float64)  # (n,)
    degree = min(degree, len(xs) - 1)  # too few entries: the interpolating polynomial
    center, half = x.mean(), (x.max() - x.min()) / 2
    a = hermite_basis((x - center) / half, degree)  # (n, d + 1)
    b = hermite_basis(np.asarray([(at - center) / half]), degree)[0]  # (d + 1,)
    w = np.linalg.pinv(a).T @ b  # (n,)
    return tuple(float(v) for v in w)


def slope_weights(nodes: Sequence[float], t: float) -> np.ndarray:
    """(n,) weights d with p'(t) = Σ d_i · y_i for the polynomial p through (nodes[i], y_i)."""
    n = len(nodes)
    out = np.zeros(n)
    for i in range(n):
        denom = np.prod([nodes[i] - nodes[j] for j in range(n) if j != i])
        out[i] = sum(np.prod([t - nodes[j] for j in range(n) if j not in (i, k)]) for k in range(n) if k != i) / denom
    return out


def bdf2_heun_weights(xs: list[float], at: float) -> tuple[float, ...]:
    """Weights of the BDF2 predictor with a Heun corrector (module docstring) over 3 positions; 2: the linear step."""
    if len(xs) == 2:
        return forecast.weights(xs, at, 1)
    x0, x1, _ = xs
    h, omega = at - x0, (at - x0) / (x0 - x1)
    if omega <= 0:  # not a step forward from the history: the quadratic through it
        return forecast.weights(xs, at, 2)
    e0, e1 = np.eye(3)[0], np.eye(3)[1]  # y_0, y_1 as weight vectors over (y_0, y_1, y_2)
    f0 = slope_weights(xs, x0)  # (3,) slope at the newest output
    c = 1 + 2 * omega
    pred = (1 + omega) ** 2 / c * e0 - omega ** 2 / c * e1 + (1 + omega) / c * h * f0  # (3,) y*
    d = slope_weights([at, x0, x1], at)  # slope at the target over (y*, y_0, y_1)
    f_star = d[0] * pred + d[1] * e0 + d[2] * e1  # (3,)
    w = e0 + h / 2 * (f0 + f_star)
    return tuple(float(v) for v in w)
