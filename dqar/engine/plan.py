"""Layer schedules → a boolean reuse plan `[evaluation, layer]`, plain data in and out.

A plan says, for every model evaluation and every transformer layer, whether the
layer reuses its cached output (True) or computes (False). Schedules decide which
layers are *eligible*; the refresh interval and the staleness cap decide when an
eligible layer still recomputes. The engine executes the plan exactly.

A plan dqar writes records in its key what it is for (model, sampler, steps, reuse) and the model's layer layout:
`streams`, each layer's output streams (1: image; 2: image and text) as the block adapter describes them. A plan file
without one (written before it was recorded) is checked by its layer count only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dqar.engine.config import ReuseConfig
from dqar.errors import DqarError

PLAN_FORMAT = "dqar-plan/1"


@dataclass(frozen=True)
class Plan:
    """Reuse decisions: `mask[e, l]` is True where layer `l` reuses at evaluation `e`."""

    mask: np.ndarray  # (E, L) bool
    key: dict[str, Any] = field(default_factory=dict)  # what the plan is for: model, sampler, steps, streams

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask, dtype=bool)
        if mask.ndim != 2 or 0 in mask.shape:
            raise DqarError(f"a plan must be 2-D [evaluation, layer] with at least one of each, got shape {mask.shape}",
                            "regenerate the plan")
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)
        streams = self.key.get("streams")
        if streams is not None:
            ok = isinstance(streams, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in streams)
            if not ok or len(streams) != mask.shape[1]:
                raise DqarError(f"a plan's streams must be {mask.shape[1]} integers >= 1 (one per layer), got {streams!r}",
                                "regenerate the plan")

    @property
    def streams(self) -> tuple[int, ...] | None:
        """Each layer's output streams as recorded when the plan was made; None for a plan that records none."""
        streams = self.key.get("streams")
        return None if streams is None else tuple(streams)

    @property
    def num_evaluations(self) -> int:
        return self.mask.shape[0]

    @property
    def num_layers(self) -> int:
        return self.mask.shape[1]

    @property
    def reuse_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def num_patterns(self) -> int:
        """Distinct rows: the whole-model graphs the graph executor compiles for this plan."""
        return len({row.tobytes() for row in self.mask})

    def rows(self) -> list[tuple[bool, ...]]:
        """Host-side decision rows, one tuple of layer flags per evaluation."""
        return [tuple(bool(v) for v in row) for row in self.mask]

    def to_json(self) -> str:
        rows = ["".join("R" if v else "." for v in row) for row in self.mask]
        return json.dumps({"format": PLAN_FORMAT, "key": self.key, "rows": rows}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "Plan":
        try:
            data = json.loads(text)
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, expected {PLAN_FORMAT!r}")
            rows = data["rows"]
            width = {len(r) for r in rows}
            if len(width) > 1 or any(set(r) - {"R", "."} for r in rows):
                raise ValueError("rows must be equally long strings of 'R' and '.'")
            mask = np.array([[c == "R" for c in r] for r in rows], dtype=bool).reshape(len(rows), -1)
            return cls(mask=mask, key=dict(data.get("key", {})))
        except DqarError as exc:
            raise DqarError(f"{source} is not a valid dqar plan ({exc.problem})", exc.fix) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DqarError(f"{source} is not a valid dqar plan ({exc})", "regenerate it with `dqar calibrate` or dqar.engine.plan.save_plan") from None

    def __str__(self) -> str:
        header = f"plan {self.num_evaluations} evaluations x {self.num_layers} layers, reuse {100 * self.reuse_fraction:.1f}%  (R reuse, . compute)"
        lines = [f"{e:4d} " + "".join("R" if v else "." for v in row) for e, row in enumerate(self.mask)]
        return "\n".join([header, *lines])

    def check_key(self, **expected: Any) -> None:
        """Refuse to run where the plan was made for another model, sampler or step count (or stream layout: `streams`)."""
        for name, value in expected.items():
            if name == "streams":
                if value is not None:
                    self.check_streams(value, model=expected.get("model") or "this model")
                continue
            have = self.key.get(name)
            if have is not None and value is not None and have != value:
                raise DqarError(f"plan was made for {name}={have!r} but this run has {name}={value!r}", f"recalibrate for this {name} or use a matching plan")

    def check_streams(self, streams: Sequence[int], model: str = "this model") -> None:
        """Refuse a model whose layers (`streams`: each one's output streams) are not the plan's; a plan that records no
        streams is checked by its layer count only."""
        streams = tuple(int(v) for v in streams)
        have = self.streams
        if (have is None and self.num_layers != len(streams)) or (have is not None and have != streams):
            made = layout_text(have) if have is not None else f"{self.num_layers} layers"
            raise DqarError(f"plan was made for {made} but {model} has {layout_text(streams)}",
                            "calibrate a plan for this model (dqar calibrate --model ...) or use one made for it")

    def check_shape(self, num_evaluations: int, num_layers: int) -> None:
        if self.mask.shape != (num_evaluations, num_layers):
            raise DqarError(
                f"plan has shape {self.mask.shape} but this run needs ({num_evaluations} evaluations, {num_layers} layers)",
                "build or calibrate a plan for this model and step count",
            )


def stream_layout(transformer: Any) -> list[int]:
    """Each layer's output streams (1: image; 2: image and text), in execution order, from the block adapter."""
    from dqar.engine.adapter import describe

    return [spec.streams for spec in describe(transformer).specs]


def layout_text(streams: Sequence[int]) -> str:
    """'5 layers (streams 2 x1, 1 x4)': the layer count and runs of equal stream counts, in order."""
    runs: list[list[int]] = []
    for s in streams:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return f"{len(streams)} layers (streams {', '.join(f'{s} x{n}' for s, n in runs)})"


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write a plan as JSON, atomically."""
    from dqar.io import atomic_write_text

    atomic_write_text(Path(path), plan.to_json())


def load_plan(path: str | Path) -> Plan:
    """Read a plan JSON file (never executes code)."""
    path = Path(path)
    if not path.is_file():
        raise DqarError(f"plan file '{path}' does not exist", "pass the path of a plan written by `dqar calibrate`")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # a binary file (e.g. a pickle) is not a plan
        raise DqarError(f"plan file '{path}' is not a valid dqar plan (not UTF-8 text: {type(exc).__name__})",
                        "regenerate it with `dqar calibrate` or dqar.engine.plan.save_plan") from None
    return Plan.from_json(text, source=f"plan file '{path}'")


def schedule_fraction(cfg: ReuseConfig, progress: float) -> float:
    """Fraction in [0, 1] of the eligible-layer range at `progress` ∈ [0, 1] of the reuse window."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "linear":
        return p
    if cfg.schedule == "linear_reverse":
        return 1.0 - p
    if cfg.schedule == "exponential":
        return math.expm1(cfg.exp_rate * p) / math.expm1(cfg.exp_rate)
    if cfg.schedule == "step":
        return min(math.floor(p * cfg.step_stages), cfg.step_stages - 1) / max(cfg.step_stages - 1, 1)
    raise DqarError(f"schedule '{cfg.schedule}' has no fraction", "use a named schedule")


def eligible_layers(cfg: ReuseConfig, progress: float, num_layers: int) -> list[int]:
    """Layers allowed to reuse at this point: shallow layers first, more layers as the fraction grows."""
    if cfg.schedule == "custom":
        bad = [i for i in cfg.custom_layers if i >= num_layers]
        if bad:
            raise DqarError(f"custom_layers {bad} do not exist in a {num_layers}-layer model", f"use indices in [0, {num_layers - 1}]")
        return sorted(set(cfg.custom_layers))
    most = round(cfg.layer_frac * num_layers)
    if most == 0:
        return []
    count = 1 + round(schedule_fraction(cfg, progress) * (most - 1))
    return list(range(count))


def reuse_window(cfg: ReuseConfig, num_evaluations: int) -> tuple[int, int]:
    """[start, stop) of evaluations where reuse may happen; evaluation 0 always computes."""
    start = max(1, math.ceil(cfg.warmup_frac * num_evaluations))
    stop = num_evaluations - cooldown_count(cfg.cooldown_frac, num_evaluations)
    return start, max(start, stop)


def cooldown_count(cooldown_frac: float, num_evaluations: int) -> int:
    """The last evaluations that compute in full: `cooldown_frac` of them, to the nearest (half up).

    Nearest, not floor: full_dqar's 2% is one evaluation at 50 steps and must stay one at 28 (floor gave 0).
    """
    return math.floor(cooldown_frac * num_evaluations + 0.5)


def build_plan(cfg: ReuseConfig, num_evaluations: int, num_layers: int, key: dict[str, Any] | None = None) -> Plan:
    """Turn a schedule config into a plan; with `plan_file` set, load and check that plan instead.

    With `bound_patterns`, the plan is limited to `max_patterns` distinct rows (`bound_patterns`).
    """
    if num_evaluations < 1 or num_layers < 1:
        raise DqarError(f"cannot plan {num_evaluations} evaluations x {num_layers} layers", "use at least one step and one layer")
    if cfg.plan_file:
        plan = load_plan(cfg.plan_file)
        plan.check_key(**(key or {}))
        plan.check_shape(num_evaluations, num_layers)
        return Plan(mask=bound_patterns(plan.mask, cfg.max_patterns), key=plan.key) if cfg.bound_patterns else plan
    mask = np.zeros((num_evaluations, num_layers), dtype=bool)
    if cfg.enabled:
        eligible = eligibility(cfg, num_evaluations, num_layers)
        mask = refresh_mask(eligible, staleness_limits(cfg, num_evaluations))
    return Plan(mask=bound_patterns(mask, cfg.max_patterns) if cfg.bound_patterns else mask, key=dict(key or {}))


def eligibility(cfg: ReuseConfig, num_evaluations: int, num_layers: int) -> np.ndarray:
    """(E, L) bool: where the schedule, warmup and cooldown allow reuse at all (before refresh and staleness)."""
    start, stop = reuse_window(cfg, num_evaluations)
    eligible = np.zeros((num_evaluations, num_layers), dtype=bool)  # (E, L)
    span = max(stop - start - 1, 1)
    for e in range(start, stop):
        eligible[e, eligible_layers(cfg, (e - start) / span, num_layers)] = True
    return eligible


def apply_refresh(eligible: np.ndarray, refresh_interval: int, max_staleness: int) -> np.ndarray:
    """Within eligible cells, recompute once every `refresh_interval` evaluations and never exceed `max_staleness`.

    Staleness of a reused output = evaluations since it was computed. Evaluation 0 always computes.
    """
    limits = np.full(eligible.shape[0], staleness_limit(refresh_interval, max_staleness), dtype=np.int64)  # (E,)
    return refresh_mask(eligible, limits)


def refresh_mask(eligible: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """(E, L) bool: eligible cells reused while the output's staleness stays within that evaluation's limit (E,)."""
    mask = np.zeros_like(eligible, dtype=bool)
    staleness = np.zeros(eligible.shape[1], dtype=np.int64)  # (L,) evaluations since last compute, at the next one
    for e in range(eligible.shape[0]):
        reuse = eligible[e] & (staleness + 1 <= limits[e]) & (e > 0)
        mask[e] = reuse
        staleness = np.where(reuse, staleness + 1, 0)
    return mask


def staleness_limit(refresh_interval: int, max_staleness: int) -> int:
    """The most consecutive evaluations a layer may reuse one computed output."""
    return min(refresh_interval - 1, max_staleness)


def refresh_intervals(cfg: ReuseConfig, num_evaluations: int) -> np.ndarray:
    """(E,) int: the refresh interval at each evaluation (constant, or a linear ramp over the reuse window)."""
    intervals = np.full(num_evaluations, cfg.refresh_interval, dtype=np.int64)  # (E,)
    if cfg.refresh_interval_end > 0:
        start, stop = reuse_window(cfg, num_evaluations)
        span = max(stop - start - 1, 1)
        for e in range(num_evaluations):
            p = min(max((e - start) / span, 0.0), 1.0)
            intervals[e] = round(cfg.refresh_interval + p * (cfg.refresh_interval_end - cfg.refresh_interval))
    return intervals


def staleness_limits(cfg: ReuseConfig, num_evaluations: int) -> np.ndarray:
    """(E,) int: the most consecutive reuses allowed at each evaluation (refresh interval − 1, capped by max_staleness)."""
    return np.minimum(refresh_intervals(cfg, num_evaluations) - 1, cfg.max_staleness)


def max_run_staleness(mask: np.ndarray) -> int:
    """The largest staleness any reuse in `mask` would have (0 when nothing is reused)."""
    worst, run = 0, np.zeros(mask.shape[1], dtype=np.int64)
    for row in mask:
        run = np.where(row, run + 1, 0)
        worst = max(worst, int(run.max(initial=0)))
    return worst


# ----- bounded patterns -----------------------------------------------------------------------------
PAIR_LIMIT = 65536  # most row pairs whose intersections are offered as kept rows (beyond: the rows themselves)


def bound_patterns(mask: np.ndarray, max_patterns: int) -> np.ndarray:
    """(E, L) bool with at most `max_patterns` distinct rows, each cell reused only where `mask` reuses.

    A mask that already fits comes back unchanged. Otherwise a set of kept rows is chosen and every
    row is replaced by the kept row that is a subset of its reuses with the most reuses (so it only
    computes more, and no reuse run gets longer). The all-compute row is always kept (one of the
    slots: it is a subset of every row); the others are chosen greedily, each time the candidate
    that retains the most reused cells over the whole mask (facility location, within 1 - 1/e of
    the best choice). Candidates are the distinct rows and their pairwise intersections.
    """
    mask = np.asarray(mask, dtype=bool)  # (E, L)
    if isinstance(max_patterns, bool) or not isinstance(max_patterns, (int, np.integer)) or max_patterns < 1:
        raise DqarError(f"max_patterns = {max_patterns!r} is invalid", "use an integer >= 1")
    rows, inverse, counts = np.unique(mask, axis=0, return_inverse=True, return_counts=True)  # (P, L), (E,), (P,)
    if len(rows) <= max_patterns:
        return mask.copy()
    cands = _pattern_candidates(rows)  # (C, L), row 0 all-compute
    retained = _retained_reuse(cands, rows) * counts  # (C, P) reused cells row p keeps when mapped to candidate c
    kept = _greedy_keep(retained, max_patterns)  # candidate indices
    choice = np.asarray(kept)[np.argmax(retained[kept], axis=0)]  # (P,) the kept candidate each row becomes
    return cands[choice][inverse.reshape(-1)]


def _pattern_candidates(rows: np.ndarray) -> np.ndarray:
    """(C, L) bool: the all-compute row first, then the distinct rows (P, L) and, unless too many, their pairwise intersections."""
    pool = rows
    if len(rows) ** 2 <= PAIR_LIMIT:
        pool = (rows[:, None, :] & rows[None, :, :]).reshape(-1, rows.shape[1])  # (P*P, L), includes each row itself
    pool = np.unique(pool[pool.any(axis=1)], axis=0)  # distinct, without the all-compute row
    return np.concatenate([np.zeros((1, rows.shape[1]), dtype=bool), pool])


def _retained_reuse(cands: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(C, P) int: reuses of candidate c where it is a subset of row p, else 0."""
    outside = cands.astype(np.int64) @ (~rows).astype(np.int64).T  # (C, P) reuses of c where p computes
    return np.where(outside == 0, cands.sum(axis=1)[:, None], 0)


def _greedy_keep(retained: np.ndarray, max_patterns: int) -> list[int]:
    """Candidate 0 (all-compute), then the largest-gain candidates of `retained` (C, P) until `max_patterns` or no gain."""
    kept, best = [0], retained[0].copy()  # (P,) reuse each row keeps so far
    while len(kept) < max_patterns:
        gain = np.maximum(retained - best, 0).sum(axis=1)  # (C,)
        c = int(np.argmax(gain))
        if gain[c] <= 0:
            break
        kept.append(c)
        best = np.maximum(best, retained[c])
    return kept
