"""Ablation grids: a strict TOML format → the ordered list of configurations a study runs.

A grid file has three parts (see dqar/grids/default.toml):

    [study]                      # how the study measures
    repeats = 3                  # timed repeats per configuration (>= 3; the median is reported)
    samples_per_label = 1        # each default label is sampled this many times
    main = ["baseline", "scheduling_only", "quant_cache_only", "full_dqar"]
    fidelity_samples_per_label = 20  # images per label of the untimed fidelity runs
    fidelity_runs = 1            # optional cap: at most this many configurations with reuse get a fidelity run

    [sample]                     # SampleConfig fields shared by every configuration
    steps = 20

    [[sweep]]                    # one sweep = a base and the values it varies
    name = "schedule"
    base = "full_dqar"           # a preset name, or a table {preset = "...", <field> = value, ...}
    vary = { schedule = ["linear", "step"] }       # cartesian product of the listed values
    points = [{ schedule = "custom", custom_layers = [0, 1] }]   # extra explicit points (optional)

    [[peer]]                     # one peer method run through its own package (dqar/peers.py)
    method = "taylorseer"        # pab | first_block_cache | taylorseer | magcache | cache_dit
    cache_interval = 3           # any setting of that peer's config dataclass; unknown keys raise

Field names are those of `ReuseConfig` and `SampleConfig` (bare, or prefixed `reuse.` / `sample.`),
so a field added to either dataclass can be swept without code changes. Keys prefixed `calibrate.`
(the keyword arguments of `dqar.tuning.calibrate.calibrate`, e.g. `calibrate.target_fraction`) make the
configuration use a plan calibrated for it before it is measured. Every configuration whose
sampling settings differ from the study's gets its own baseline with those settings.

A model with grids of its own (`MODEL_GRIDS`: embedded-flux → `flux_`) reads `flux_NAME.toml` for `--grid NAME`
where one is shipped (flux_quick, flux_default: Flux's 28 steps and true CFG 4, no sampler key: flow models
always sample with flow matching); any other shipped grid takes the model's sampling defaults
(`models.SAMPLE_DEFAULTS`) over its [sample] steps and cfg. A grid given with --config is read as written.

Peers run after the sweeps at the study's sampling settings, each named `peer/<method>` (plus the
settings the table gives, e.g. `peer/taylorseer,cache_interval=3`), against the same baseline.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import inspect
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from dqar.engine.config import PRESETS, ReuseConfig, RunConfig, SampleConfig, _suggest, build, preset
from dqar.errors import DqarError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BASELINE = "baseline"
MIN_REPEATS = 3
STUDY_KEYS = {"repeats", "samples_per_label", "main", "fidelity_samples_per_label", "fidelity_runs"}
GRIDS = ("quick", "default", "full", "flux_quick", "flux_default")  # the grids shipped in dqar/grids/ (`dqar ablate --grid NAME`)
MODEL_GRIDS = {"embedded-flux": "flux"}  # a model with grids of its own: --grid NAME reads <prefix>_NAME.toml where shipped
FIDELITY_SAMPLES_PER_LABEL = 20  # images per label of the untimed fidelity runs (dqar.studies.ablation.fidelity)
SWEEP_KEYS = {"name", "base", "vary", "points"}
TOP_KEYS = {"study", "sample", "sweep", "peer"}
SLUG_MAX = 120  # characters of a configuration folder name before a hash suffix


@dataclass(frozen=True)
class Study:
    """A parsed grid: measurement settings, shared sampling settings, main presets and sweeps."""

    repeats: int
    samples_per_label: int
    main: tuple[str, ...]
    sample: SampleConfig
    sweeps: tuple[dict, ...]  # raw sweep tables, validated
    source: str  # where the grid came from
    text_hash: str  # sha256 of the grid text (first 16 hex digits)
    peers: tuple[tuple[dict, Any], ...] = ()  # (the grid's table, its peer config from dqar.studies.peers.methods)
    fidelity_samples_per_label: int = FIDELITY_SAMPLES_PER_LABEL  # images per label of the fidelity runs
    fidelity_runs: int | None = None  # cap on fidelity runs of reuse configurations; None: every main one and the finalists


@dataclass(frozen=True)
class Entry:
    """One configuration of the study."""

    name: str  # unique: "full_dqar", "schedule/schedule=step", "baseline/steps=50", "peer/pab"
    role: str  # "main" | "sweep" | "baseline" | "peer"
    sweep: str | None  # the sweep it belongs to (None for main and baselines)
    varied: dict  # the swept fields and their values (empty for main)
    run: RunConfig
    calibration: dict = field(default_factory=dict)  # keyword arguments of dqar.tuning.calibrate.calibrate; {} = none
    config_hash: str = ""  # of the definition (run + calibration + peer); kept when a calibrated plan is filled in
    peer: Any = None  # a peer config (dqar.studies.peers.methods) run instead of dqar's reuse; None for dqar configurations

    def __post_init__(self) -> None:
        if not self.config_hash:
            object.__setattr__(self, "config_hash", config_hash(self.run, self.calibration, self.peer))

    @property
    def slug(self) -> str:
        return slug(self.name)

    @property
    def is_baseline(self) -> bool:
        return not self.run.reuse.enabled and self.peer is None


def config_hash(run: RunConfig, calibration: dict | None = None, peer: Any = None) -> str:
    """A stable 16-hex-digit hash of a resolved run configuration (and its calibration settings or peer, if any)."""
    from dqar.studies.peers.methods import to_dict

    data = run.to_dict() if not calibration else {**run.to_dict(), "calibration": calibration}
    if peer is not None:
        data = {**data, "peer": to_dict(peer)}
    text = json.dumps(data, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def slug(name: str) -> str:
    """A folder name for a configuration name: one path component, never empty, '.', '..' or hidden.

    '/' becomes '__'; letters, digits and `._=,-` are kept. Where that loses information (other
    characters, leading dots, '_' next to '/', more than SLUG_MAX characters) the first 8 hex digits
    of the name's sha256 are appended, so distinct names always get distinct folders.
    """
    plain = name.replace("/", "__")
    s = re.sub(r"[^A-Za-z0-9._=,-]+", "-", plain).strip("-.")[:SLUG_MAX]
    if s and s == plain and plain.replace("__", "/") == name:
        return s
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{s}-{digest}" if s else digest


def builtin_grid(name: bool | str = False) -> Path:
    """The path of a grid shipped with the package: a name of GRIDS (True: "quick", False: "default")."""
    name = "quick" if name is True else "default" if name is False else name
    if name not in GRIDS:
        raise DqarError(f"unknown grid '{name}'", f"{_suggest(name, list(GRIDS))}use one of: {', '.join(GRIDS)}, or --config FILE")
    return Path(str(resources.files("dqar") / "grids" / f"{name}.toml"))


def grid_for(name: str, model: str | None) -> str:
    """The shipped grid `--grid name` means on `model`: its own (flux_quick for quick on embedded-flux) where shipped."""
    prefix = MODEL_GRIDS.get(str(model))
    own = f"{prefix}_{name}" if prefix else None
    return own if own in GRIDS else name


def with_model_defaults(study: Study, model: str | None) -> Study:
    """A shipped grid read for a model with sampling defaults of its own (`models.SAMPLE_DEFAULTS`: Flux's 28 steps,
    CFG 4) takes them over its [sample] table; a grid written for the model already has them."""
    from dqar.models import SAMPLE_DEFAULTS

    defaults = SAMPLE_DEFAULTS.get(str(model), {})
    changes = {k: v for k, v in defaults.items() if getattr(study.sample, k) != v}
    return with_sample(study, **changes) if changes else study


def load_grid(path: str | Path, repeats: int | None = None) -> Study:
    """Parse a grid file strictly; `repeats` overrides the file's (tests may use fewer than 3)."""
    path = Path(path)
    if not path.is_file():
        raise DqarError(f"grid file '{path}' does not exist", "pass the path of an existing TOML grid, or omit --config")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DqarError(f"grid file '{path}' is not valid TOML ({exc})", "fix the syntax") from None
    return parse_grid(data, source=str(path), text=text, repeats=repeats)


def parse_grid(data: dict, source: str = "grid", text: str = "", repeats: int | None = None) -> Study:
    """A `Study` from a grid dict; unknown keys, fields and presets raise `DqarError`."""
    _known(data, TOP_KEYS, f"{source}: top level")
    study = data.get("study", {})
    _known(study, STUDY_KEYS, f"{source}: [study]")
    n_rep = study.get("repeats", MIN_REPEATS) if repeats is None else repeats
    if not isinstance(n_rep, int) or isinstance(n_rep, bool) or n_rep < (MIN_REPEATS if repeats is None else 1):
        raise DqarError(f"{source}: repeats = {n_rep!r}", f"use an integer >= {MIN_REPEATS} (the median of the repeats is reported)")
    per_label = study.get("samples_per_label", 1)
    if not isinstance(per_label, int) or isinstance(per_label, bool) or per_label < 1:
        raise DqarError(f"{source}: samples_per_label = {per_label!r}", "use an integer >= 1")
    fidelity = study.get("fidelity_samples_per_label", FIDELITY_SAMPLES_PER_LABEL)
    if not isinstance(fidelity, int) or isinstance(fidelity, bool) or fidelity < per_label:
        raise DqarError(f"{source}: fidelity_samples_per_label = {fidelity!r}", f"use an integer >= samples_per_label ({per_label})")
    runs = study.get("fidelity_runs")
    if runs is not None and (not isinstance(runs, int) or isinstance(runs, bool) or runs < 0):
        raise DqarError(f"{source}: fidelity_runs = {runs!r}", "use an integer >= 0, or leave it out (every main configuration and the finalists)")
    main = tuple(study.get("main", tuple(PRESETS)))
    for name in main:
        preset(name)
    if BASELINE not in main:
        raise DqarError(f"{source}: [study] main must include 'baseline'", "add \"baseline\" to main: every ratio is taken against it")
    sample = build(SampleConfig, dict(data.get("sample", {})), f"{source}: sample")
    sweeps = data.get("sweep", [])
    if not isinstance(sweeps, list):
        raise DqarError(f"{source}: 'sweep' must be an array of tables", "write each sweep as [[sweep]]")
    digest = hashlib.sha256((text or json.dumps(data, sort_keys=True, default=str)).encode()).hexdigest()[:16]
    out = Study(n_rep, per_label, main, sample, tuple(sweeps), source, digest, _peers(data.get("peer", []), source), fidelity, runs)
    expand(out)  # validate every sweep point now, not hours into a run
    return out


def _known(table: Any, allowed: set, where: str) -> None:
    if not isinstance(table, dict):
        raise DqarError(f"{where} must be a table", "see dqar/grids/default.toml for the format")
    for key in table:
        if key not in allowed:
            raise DqarError(f"unknown key '{key}' in {where}", f"{_suggest(key, sorted(allowed))}valid keys: {', '.join(sorted(allowed))}")


def _peers(tables: Any, source: str) -> tuple[tuple[dict, Any], ...]:
    """(table, peer config) of every [[peer]] table; unknown methods and settings raise."""
    from dqar.studies.peers.methods import from_table

    if not isinstance(tables, list):
        raise DqarError(f"{source}: 'peer' must be an array of tables", 'write each peer as [[peer]] with method = "..."')
    return tuple((dict(t) if isinstance(t, dict) else t, from_table(t, f"{source}: peer #{i + 1}")) for i, t in enumerate(tables))


def calibration_keys() -> list[str]:
    """The keyword arguments of `dqar.tuning.calibrate.calibrate` a grid may set (as `calibrate.<name>`)."""
    try:
        from dqar.tuning.calibrate import calibrate
    except ImportError as exc:  # pragma: no cover
        raise DqarError(f"calibrated plans are unavailable ({exc})", "remove calibrate.* keys from the grid") from None
    params = inspect.signature(calibrate).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "progress"]


def _field(key: str, where: str) -> tuple[str, str]:
    """('reuse' | 'sample' | 'calibrate', name) for a grid key."""
    reuse_f = [f.name for f in fields(ReuseConfig)]
    sample_f = [f.name for f in fields(SampleConfig)]
    section, _, name = key.rpartition(".")
    if section == "calibrate":
        valid = calibration_keys()
        if name not in valid:
            raise DqarError(f"unknown field '{key}' in {where}", f"{_suggest(name, valid)}calibrate.* keys: {', '.join(valid)}")
        return "calibrate", name
    if section in ("", "reuse") and name in reuse_f:
        return "reuse", name
    if section in ("", "sample") and name in sample_f:
        return "sample", name
    raise DqarError(f"unknown field '{key}' in {where}", f"{_suggest(name, reuse_f + sample_f)}use a ReuseConfig or SampleConfig field name")


def _apply(run: RunConfig, overrides: dict, where: str, calibration: dict | None = None) -> tuple[RunConfig, dict]:
    """`run` with validated field overrides (custom_layers lists become tuples), and the calibration settings."""
    reuse = {f.name: getattr(run.reuse, f.name) for f in fields(ReuseConfig)}
    sample = {f.name: getattr(run.sample, f.name) for f in fields(SampleConfig)}
    calib = dict(calibration or {})
    for key, value in overrides.items():
        section, name = _field(key, where)
        {"reuse": reuse, "sample": sample, "calibrate": calib}[section][name] = value
    out = RunConfig(reuse=build(ReuseConfig, reuse, where), sample=build(SampleConfig, sample, where))
    if calib and (out.reuse.plan_file or getattr(out.reuse, "gate", False) or not out.reuse.enabled):
        raise DqarError(f"{where}: a calibrated configuration cannot also set plan_file, gate or enabled = false",
                        "base it on a preset without the gate, e.g. base = { preset = \"quant_cache_only\" }")
    return out, calib


def _base(spec: Any, sample: SampleConfig, where: str) -> tuple[RunConfig, dict]:
    """A sweep's base: a preset name or a table {preset = ..., fields...}; and its calibration settings."""
    if isinstance(spec, str):
        return RunConfig(reuse=preset(spec), sample=sample), {}
    if not isinstance(spec, dict):
        raise DqarError(f"{where}: base must be a preset name or a table", "e.g. base = \"full_dqar\" or base = { preset = \"full_dqar\", warmup_frac = 0.3 }")
    overrides = dict(spec)
    reuse = preset(overrides.pop("preset")) if "preset" in overrides else ReuseConfig()
    return _apply(RunConfig(reuse=reuse, sample=sample), overrides, f"{where} base")


def _label(values: dict) -> str:
    def fmt(v: Any) -> str:
        return "-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v).lower() if isinstance(v, bool) else str(v)

    return ",".join(f"{k.rpartition('.')[2]}={fmt(v)}" for k, v in values.items())


def _points(sweep: dict, where: str) -> list[dict]:
    vary = sweep.get("vary", {})
    if not isinstance(vary, dict):
        raise DqarError(f"{where}: vary must be a table of lists", "e.g. vary = { warmup_frac = [0.1, 0.2] }")
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise DqarError(f"{where}: vary.{key} must be a non-empty list", f"e.g. vary = {{ {key} = [value1, value2] }}")
    combos = [dict(zip(vary, combo)) for combo in itertools.product(*vary.values())] if vary else []
    extra = sweep.get("points", [])
    if not isinstance(extra, list) or not all(isinstance(p, dict) and p for p in extra):
        raise DqarError(f"{where}: points must be a list of non-empty tables", "e.g. points = [{ schedule = \"custom\", custom_layers = [0, 1] }]")
    if not combos and not extra:
        raise DqarError(f"{where}: nothing to vary", "add vary = { field = [values] } or points = [{ ... }]")
    return combos + [dict(p) for p in extra]


def expand(study: Study) -> list[Entry]:
    """Every configuration of the study, in run order: main presets, then sweeps, each with its own baseline."""
    entries = [Entry(name, "main", None, {}, RunConfig(reuse=preset(name), sample=study.sample)) for name in study.main]
    names = {e.name for e in entries}
    for i, sweep in enumerate(study.sweeps):
        where = f"{study.source}: sweep #{i + 1}"
        _known(sweep, SWEEP_KEYS, where)
        name = sweep.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise DqarError(f"{where}: name = {name!r}", "give every sweep a name of letters, digits, '_', '.', '-'")
        where = f"{study.source}: sweep '{name}'"
        base, base_calib = _base(sweep.get("base", "full_dqar"), study.sample, where)
        for point in _points(sweep, where):
            run, calib = _apply(base, point, where, base_calib)
            entry = Entry(f"{name}/{_label(point)}", "sweep", name, point, run, calib)
            if entry.name in names:
                raise DqarError(f"{where}: configuration '{entry.name}' appears twice", "give sweeps distinct names and values")
            names.add(entry.name)
            entries.append(entry)
    for table, peer in study.peers:
        settings = {k: v for k, v in table.items() if k != "method"}
        entry = Entry(f"peer/{peer.method}" + (f",{_label(settings)}" if settings else ""), "peer", None, settings,
                      RunConfig(reuse=preset(BASELINE), sample=study.sample), peer=peer)
        if entry.name in names:
            raise DqarError(f"{study.source}: configuration '{entry.name}' appears twice", "give each [[peer]] distinct settings")
        names.add(entry.name)
        entries.append(entry)
    return _with_baselines(entries, study.sample)


def _with_baselines(entries: list[Entry], sample: SampleConfig) -> list[Entry]:
    """Insert a baseline before the first configuration of every other sampling setting."""
    out, seen = [], {sample}
    for entry in entries:
        s = entry.run.sample
        if s not in seen:
            seen.add(s)
            diff = {k: v for k, v in s.__dict__.items() if getattr(sample, k) != v}
            run = RunConfig(reuse=preset(BASELINE), sample=s)
            out.append(Entry(f"{BASELINE}/{_label(diff)}", "baseline", None, diff, run))
        out.append(entry)
    return out


def baseline_of(entries: list[Entry], entry: Entry) -> Entry:
    """The baseline entry with the same sampling settings as `entry`."""
    for e in entries:
        if e.role in ("main", "baseline") and e.is_baseline and e.run.sample == entry.run.sample:
            return e
    raise DqarError(f"no baseline for '{entry.name}'", "internal: every sampling setting gets a baseline")  # pragma: no cover


def with_sample(study: Study, **changes: Any) -> Study:
    """The study with shared sampling settings changed (e.g. fewer steps for a smoke test)."""
    return replace(study, sample=replace(study.sample, **changes))
