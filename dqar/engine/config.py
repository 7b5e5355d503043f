"""Frozen configuration dataclasses, presets and strict TOML loading.

Every field is validated on construction; unknown keys raise a `DqarError`
that names the key and the closest valid one.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dqar.engine.forecast import FORECAST_AXES, FORECAST_ORDERS
from dqar.engine.forecasters import FORECAST_KINDS, Forecaster
from dqar.errors import DqarError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGETS = ("attention", "kv")
GRANULARITIES = ("attention", "block")
CACHE_DTYPES = ("model", "int8")
QUANT_MODES = ("tensor", "channel", "head", "token")
SCHEDULES = ("constant", "linear", "linear_reverse", "exponential", "step", "custom")
SAMPLERS = ("ddim", "dpm")
SNR_SOURCES = ("scheduler", "prediction")
CFG_SHARES = ("none", "cond_to_uncond", "uncond_to_cond")
DECIDERS = ("plan", "verify")
GATE_SIGNALS = ("entropy", "probe_error")
VERIFY_PROBES = ("first", "last")


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise DqarError(f"unknown {name} '{value}'", f"{hint}choose one of: {', '.join(map(str, allowed))}")


def _in_range(name: str, value: float, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (lo <= value <= hi):
        raise DqarError(f"{name} = {value!r} is out of range", f"use a number in [{lo}, {hi}]")


def _int_at_least(name: str, value: Any, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise DqarError(f"{name} = {value!r} is invalid", f"use an integer >= {lo}")


@dataclass(frozen=True)
class ReuseConfig:
    """What is cached, how it is stored, and which (evaluation, layer) pairs may reuse it."""

    enabled: bool = True  # False: plain sampling, the baseline
    target: str = "attention"  # "attention": cache attn1's output; "kv": fresh Q against cached K, V
    granularity: str = "attention"  # "attention": skip attn1; "block": skip the whole block (attn + MLP)
    cache_dtype: str = "model"  # "model": store in the model dtype; "int8": symmetric absmax INT8
    quant_mode: str = "tensor"  # INT8 scale granularity: tensor | channel | head | token
    kv_mixed: bool = False  # target "kv" only: K kept in the model dtype, V in INT8
    schedule: str = "linear"  # which layers are eligible as sampling progresses (see dqar.engine.plan)
    warmup_frac: float = 0.2  # first fraction of evaluations: no reuse at all
    cooldown_frac: float = 0.0  # last fraction of evaluations: no reuse at all
    layer_frac: float = 1.0  # largest fraction of layers ever eligible
    refresh_interval: int = 2  # an eligible layer recomputes once every this many evaluations
    refresh_interval_end: int = 0  # > 0: the interval moves linearly from refresh_interval (reuse window start) to this (its end)
    max_staleness: int = 3  # a reused output is never older than this many evaluations
    exp_rate: float = 3.0  # schedule "exponential": growth rate
    step_stages: int = 4  # schedule "step": number of equal stages
    custom_layers: tuple[int, ...] = ()  # schedule "custom": the eligible layer indices
    plan_file: str = ""  # a saved plan (JSON) that replaces the schedule
    track_quant_error: bool = True  # measure INT8 round-trip error on every store (a few extra ops)
    nonfinite_guard: bool = False  # one host read per evaluation with reuse: layers whose cache holds NaN/Inf recompute
    gate: bool = False  # online gate: an eligible layer reuses only if its entropy < entropy_tau and SNR is in [snr_min, snr_max]
    entropy_tau: float = 0.97  # gate: normalized attention entropy threshold, in [0, 1] (lower: less reuse)
    snr_min: float = 0.0  # gate: lowest SNR at which reuse is allowed (>= 0)
    snr_max: float = 1.0e4  # gate: highest SNR at which reuse is allowed (>= snr_min)
    snr_source: str = "scheduler"  # gate: "scheduler" (ᾱ/(1-ᾱ) of the timestep) | "prediction" (‖x̂0‖²/‖x_t-x̂0‖², last evaluation)
    gate_signal: str = "entropy"  # gate: "entropy" (entropy < entropy_tau, SNR in the window) | "probe_error" (the verify_probe block's forecast error <= verify_tau × verify_scale; dqar.engine.gate)
    entropy_rows: int = 16  # gate: query rows subsampled for the entropy (all heads); >= the token count means all rows
    cfg_share: str = "none"  # CFG-branch sharing of attn1 outputs: none | cond_to_uncond | uncond_to_cond
    cfg_share_from: float = 0.5  # sharing applies from this fraction of the evaluations on, in [0, 1]
    policy: str = ""  # a learned reuse policy (safetensors, `dqar policy train`): an eligible layer reuses where it predicts a small error
    policy_threshold: float = 0.007  # policy: largest predicted relative perturbation a reuse injects into the block's residual stream, in [0, 1] (higher: more reuse)
    policy_budget: float = 1.0  # policy: at most this fraction of the layers reuse in one evaluation (lowest predicted error first), in [0, 1]
    forecast_order: int = 0  # a reuse returns: 0 a copy of the last computed output; 1 / 2 its linear / quadratic extrapolation
    forecast_axis: str = "evaluation"  # extrapolate over the evaluation index or over the scheduler's timesteps ("timestep")
    forecast_kind: str = "taylor"  # taylor (Lagrange, orders 0-2) | hermite (least squares, degree forecast_order) | bdf2_heun (order 2); dqar.engine.forecasters
    forecast_points: int = 0  # forecast_kind hermite: newest outputs fitted (0: forecast_order + 2)
    decider: str = "plan"  # "plan": the schedule, plan_file, gate or policy decide; "verify": a probe block's forecast error decides (dqar.engine.verify)
    verify_probe: Any = "first"  # verify: the block computed at every evaluation: "first", "last" or a layer index
    verify_tau: tuple = ((0.0, 0.03), (1.0, 0.03))  # verify: (progress, τ) knots, τ linear between them; an error above τ refreshes
    verify_scale: float = 1.0  # verify: every τ times this (what dqar.tuning.verify_tau calibrates)
    verify_min_interval: int = 0  # verify: fewest consecutive reuses before a refresh
    verify_max_interval: int = 3  # verify: most consecutive reuses (>= 1)
    verify_per_sample: bool = False  # verify: each sample (its CFG rows together) refreshes on its own error; probe 'first', block granularity, executor 'patch'
    max_patterns: int = 16  # executor 'graph': most distinct plan rows compiled as whole-model graphs; others run per block
    bound_patterns: bool = False  # True: a schedule's (or plan file's) plan keeps at most max_patterns distinct rows, the others computing more (dqar.engine.plan.bound_patterns): executor 'graph' never falls back

    def __post_init__(self) -> None:
        _choice("target", self.target, TARGETS)
        _int_at_least("max_patterns", self.max_patterns, 1)
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("cache_dtype", self.cache_dtype, CACHE_DTYPES)
        _choice("quant_mode", self.quant_mode, QUANT_MODES)
        _choice("schedule", self.schedule, SCHEDULES)
        _in_range("warmup_frac", self.warmup_frac, 0.0, 1.0)
        _in_range("cooldown_frac", self.cooldown_frac, 0.0, 1.0)
        _in_range("layer_frac", self.layer_frac, 0.0, 1.0)
        _in_range("exp_rate", self.exp_rate, 1e-3, 50.0)
        _int_at_least("refresh_interval", self.refresh_interval, 1)
        _int_at_least("refresh_interval_end", self.refresh_interval_end, 0)
        _int_at_least("max_staleness", self.max_staleness, 0)
        _int_at_least("step_stages", self.step_stages, 1)
        _choice("snr_source", self.snr_source, SNR_SOURCES)
        _choice("cfg_share", self.cfg_share, CFG_SHARES)
        _in_range("entropy_tau", self.entropy_tau, 0.0, 1.0)
        _in_range("snr_min", self.snr_min, 0.0, float("inf"))
        _in_range("snr_max", self.snr_max, 0.0, float("inf"))
        _in_range("cfg_share_from", self.cfg_share_from, 0.0, 1.0)
        _int_at_least("entropy_rows", self.entropy_rows, 1)
        if self.snr_min > self.snr_max:
            raise DqarError(f"snr_min = {self.snr_min} is above snr_max = {self.snr_max}", "use snr_min <= snr_max")
        _choice("gate_signal", self.gate_signal, GATE_SIGNALS)
        if self.gate_signal != "entropy" and not self.gate:
            raise DqarError(f"gate_signal = '{self.gate_signal}' chooses what the gate reads, but gate = false",
                            "set gate = true, or leave gate_signal = 'entropy'")
        if self.gate_signal == "probe_error" and self.target == "kv":
            raise DqarError("gate_signal = 'probe_error' compares cached attention or block outputs, not K/V", "use target = 'attention'")
        if self.gate and self.plan_file:
            raise DqarError("gate = true and plan_file are exclusive", "use the online gate or a saved plan, not both")
        _in_range("policy_threshold", self.policy_threshold, 0.0, 1.0)
        _in_range("policy_budget", self.policy_budget, 0.0, 1.0)
        if self.policy and (self.gate or self.plan_file):
            raise DqarError("policy, gate = true and plan_file are exclusive", "choose one source of reuse decisions")
        if self.bound_patterns and (self.gate or self.policy):
            raise DqarError("bound_patterns bounds a plan's rows, but the gate and a policy decide each evaluation online",
                            "use bound_patterns with a schedule or plan_file, or set bound_patterns = false")
        if self.policy and self.target != "attention":
            raise DqarError("a learned policy predicts the error of a reused attention or block output, not K/V",
                            "use target = 'attention' with policy")
        if not isinstance(self.forecast_order, int) or isinstance(self.forecast_order, bool) or self.forecast_order not in FORECAST_ORDERS:
            raise DqarError(f"forecast_order = {self.forecast_order!r} is not supported",
                            "use 0 (copy the last computed output), 1 (linear) or 2 (quadratic extrapolation)")
        _choice("forecast_axis", self.forecast_axis, FORECAST_AXES)
        _choice("forecast_kind", self.forecast_kind, FORECAST_KINDS)
        Forecaster(self.forecast_kind, self.forecast_order, self.forecast_points)  # validates the kind's order and points
        if self.forecast_order and self.target == "kv":
            raise DqarError("forecast_order extrapolates cached attention or block outputs, not K/V",
                            "use target = 'attention' or forecast_order = 0")
        if self.cfg_share != "none" and self.target == "kv":
            raise DqarError("cfg_share needs target = 'attention'", "set target = 'attention' or cfg_share = 'none'")
        if self.kv_mixed and self.target != "kv":
            raise DqarError("kv_mixed = true needs target = 'kv'", "set target = 'kv' or kv_mixed = false")
        if self.target == "kv" and self.granularity == "block":
            raise DqarError("target 'kv' cannot be used with granularity 'block'", "use granularity = 'attention'")
        if self.schedule == "custom" and not self.custom_layers:
            raise DqarError("schedule 'custom' needs custom_layers", "list the eligible layer indices, e.g. custom_layers = [0, 1, 2]")
        self._check_verify()
        object.__setattr__(self, "custom_layers", tuple(int(i) for i in self.custom_layers))
        if any(i < 0 for i in self.custom_layers):
            raise DqarError("custom_layers has a negative index", "use layer indices >= 0")

    def _check_verify(self) -> None:
        """The verifying decider's fields: one line for each bad value or combination."""
        _choice("decider", self.decider, DECIDERS)
        probe = self.verify_probe
        if not (probe in VERIFY_PROBES or isinstance(probe, int) and not isinstance(probe, bool) and probe >= 0):
            raise DqarError(f"verify_probe = {probe!r} is invalid", "use 'first', 'last' or a layer index >= 0")
        try:
            knots = tuple((float(p), float(t)) for p, t in self.verify_tau)
        except (TypeError, ValueError):
            raise DqarError(f"verify_tau = {self.verify_tau!r} is not a list of (progress, tau) pairs",
                            "use e.g. verify_tau = [[0.0, 0.1], [1.0, 0.2]]") from None
        progress = [p for p, _ in knots]
        if not knots or any(not 0.0 <= p <= 1.0 for p in progress) or progress != sorted(set(progress)):
            raise DqarError(f"verify_tau progress points {progress} are invalid", "use increasing progress points in [0, 1]")
        if any(not 0.0 <= t < float("inf") for _, t in knots):
            raise DqarError(f"verify_tau thresholds {[t for _, t in knots]} are invalid", "use finite thresholds >= 0")
        object.__setattr__(self, "verify_tau", knots)
        _in_range("verify_scale", self.verify_scale, 0.0, 1e6)
        _int_at_least("verify_min_interval", self.verify_min_interval, 0)
        _int_at_least("verify_max_interval", self.verify_max_interval, 1)
        if self.verify_min_interval > self.verify_max_interval:
            raise DqarError(f"verify_min_interval = {self.verify_min_interval} is above verify_max_interval = "
                            f"{self.verify_max_interval}", "use verify_min_interval <= verify_max_interval")
        if self.decider == "verify" and (self.gate or self.policy or self.plan_file or self.bound_patterns):
            raise DqarError("decider = 'verify' decides online: gate, policy, plan_file and bound_patterns do not apply",
                            "unset them, or use decider = 'plan'")
        if self.decider == "verify" and self.target == "kv":
            raise DqarError("the verifying decider compares cached attention or block outputs, not K/V", "use target = 'attention'")
        if self.verify_per_sample and (self.decider != "verify" or self.verify_probe not in ("first", 0) or self.granularity != "block"):
            raise DqarError("verify_per_sample = true splits a batch after the first block: it needs decider = 'verify', "
                            "verify_probe = 'first' and granularity = 'block'", "set those, or verify_per_sample = false")


@dataclass(frozen=True)
class SampleConfig:
    """How samples are drawn."""

    steps: int = 50  # scheduler steps (DDIM and DPM-Solver++(2M) make one model evaluation per step)
    cfg: float = 4.0  # classifier-free guidance scale; <= 1 disables guidance
    sampler: str = "ddim"  # "ddim" | "dpm" (DPM-Solver++ 2M)
    eta: float = 0.0  # DDIM eta
    seed: int = 42  # base seed; sample i uses seed + i

    def __post_init__(self) -> None:
        _int_at_least("steps", self.steps, 1)
        _in_range("cfg", self.cfg, 0.0, 100.0)
        _choice("sampler", self.sampler, SAMPLERS)
        _in_range("eta", self.eta, 0.0, 1.0)
        _int_at_least("seed", self.seed, 0)


@dataclass(frozen=True)
class RunConfig:
    """A reuse configuration and a sampling configuration together."""

    reuse: ReuseConfig = field(default_factory=ReuseConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # No reuse at all: the reference every other configuration is measured against.
    "baseline": {"enabled": False},
    # Layer scheduling only: linear schedule, cache kept in the model dtype.
    "scheduling_only": {"schedule": "linear", "cache_dtype": "model"},
    # INT8 cache with every layer eligible after warmup.
    "quant_cache_only": {"schedule": "constant", "cache_dtype": "int8", "quant_mode": "token"},
    # The best dqar has, chosen by the forecast study (docs/FIDELITY.md "Forecast"): whole-block reuse with a
    # second-order forecast from an INT8 history, every layer recomputed once every 3 evaluations after a short
    # warm-up, the last evaluation computed. A static plan: no calibration, nothing learned from the model. The
    # forecaster is the one that holds on both embedded models (probe seeds, docs/FIDELITY.md "Forecaster of
    # full_dqar"): bdf2_heun; the quadratic (taylor) leads on the DiT by about 1 dB and trails on the Flux by 6.
    "full_dqar": {"schedule": "constant", "granularity": "block", "forecast_order": 2, "forecast_kind": "bdf2_heun",
                  "refresh_interval": 3, "max_staleness": 2, "warmup_frac": 0.04, "cooldown_frac": 0.02, "cache_dtype": "int8",
                  "quant_mode": "channel"},
    # full_dqar's history and forecast under the verifying decider: the first block computes at every evaluation and the
    # rest refresh where its relative L1 forecast error exceeds 3% (a scale-free threshold: no calibration file, nothing
    # tuned per model), at most 3 reuses in a row. dqar.tuning.verify_tau scales τ to a target work.
    "adaptive": {"granularity": "block", "forecast_order": 2, "forecast_kind": "bdf2_heun", "warmup_frac": 0.04,
                 "cooldown_frac": 0.02, "cache_dtype": "int8",
                 "quant_mode": "channel", "decider": "verify", "verify_probe": "first", "verify_tau": ((0.0, 0.03), (1.0, 0.03)),
                 "verify_min_interval": 0, "verify_max_interval": 3},
    # Linear layer schedule + INT8 cache + the online entropy/SNR gate (copy reuse of attn1 outputs).
    "gate": {"schedule": "linear", "cache_dtype": "int8", "quant_mode": "token", "gate": True, "entropy_tau": 0.97},
    # Whole-block reuse (attention + MLP residual), every layer eligible after warmup, INT8 cache.
    "block_reuse": {"schedule": "constant", "granularity": "block", "cache_dtype": "int8", "quant_mode": "token"},
}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def build(cls, values: dict[str, Any], section: str):
    """Construct dataclass `cls` from `values`, rejecting unknown keys."""
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in valid:
            raise DqarError(f"unknown config key '{key}' in [{section}]", f"{_suggest(key, valid)}valid keys: {', '.join(valid)}")
    if "custom_layers" in values:
        values = {**values, "custom_layers": tuple(values["custom_layers"])}
    return cls(**values)


def preset(name: str) -> ReuseConfig:
    """The `ReuseConfig` of a named preset."""
    if name not in PRESETS:
        _choice("preset", name, tuple(PRESETS))
    return build(ReuseConfig, PRESETS[name], f"preset {name}")


def from_dict(data: dict[str, Any]) -> RunConfig:
    """A `RunConfig` from a dict shaped like the TOML file: optional `preset`, `[reuse]`, `[sample]`."""
    allowed = {"preset", "reuse", "sample"}
    for key in data:
        if key not in allowed:
            raise DqarError(f"unknown config key '{key}' at top level", f"{_suggest(key, sorted(allowed))}valid keys: preset, [reuse], [sample]")
    base = preset(data["preset"]) if "preset" in data else ReuseConfig()
    reuse_values = {**{f.name: getattr(base, f.name) for f in fields(ReuseConfig)}, **data.get("reuse", {})}
    reuse = build(ReuseConfig, reuse_values, "reuse")
    sample = build(SampleConfig, data.get("sample", {}), "sample")
    return RunConfig(reuse=reuse, sample=sample)


def load_toml(path: str | Path) -> RunConfig:
    """Read a TOML config file strictly."""
    path = Path(path)
    if not path.is_file():
        raise DqarError(f"config file '{path}' does not exist", "pass the path of an existing TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DqarError(f"config file '{path}' is not valid TOML ({exc})", "fix the syntax") from None
    return from_dict(data)


def with_overrides(cfg: ReuseConfig, **overrides: Any) -> ReuseConfig:
    """A copy of `cfg` with validated overrides."""
    valid = [f.name for f in fields(ReuseConfig)]
    for key in overrides:
        if key not in valid:
            raise DqarError(f"unknown config key '{key}' in [reuse]", f"{_suggest(key, valid)}valid keys: {', '.join(valid)}")
    return replace(cfg, **overrides)
