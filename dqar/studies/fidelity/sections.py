"""What the fidelity sections share: a model's own section and files, when and where a study ran, and refused rows.

The DiT's sections and files keep their plain names ("Engine", `fidelity_engine.json`); another model's are named
after it ("Engine (embedded-flux)", `fidelity_engine_embedded-flux.json`), so writing one never touches the other.
A configuration a model's family cannot run is checked as `dqar.enable` checks it, and becomes a row with that reason.
"""
from __future__ import annotations

import datetime
import os

import torch

from dqar.engine.config import ReuseConfig
from dqar.errors import DqarError

DEFAULT_MODEL = "embedded"  # the DiT: its section and files keep their plain names


def section_name(base: str, model: str | None) -> str:
    """`base` for the DiT, "`base` (model)" for another model."""
    return base if model in (None, DEFAULT_MODEL) else f"{base} ({model})"


def file_stem(base: str, model: str | None) -> str:
    """`base` for the DiT, "`base`_model" for another model (its JSON and plots)."""
    return base if model in (None, DEFAULT_MODEL) else f"{base}_{model}"


def machine_description() -> str:
    """The machine a study ran on, in words (CUDA device name, else the CPU core count)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{os.cpu_count()}-core CPU"


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def refusal(loaded, cfg: ReuseConfig) -> str | None:
    """The engine's one-line reason when `loaded`'s family cannot run `cfg` (checked as `dqar.enable` checks it), else None."""
    from dqar.engine.adapter import check_family, describe
    from dqar.engine.api import make_decider

    if not cfg.enabled:
        return None
    try:
        check_family(describe(loaded.transformer), cfg, make_decider(cfg).needs, "patch")
    except DqarError as exc:
        return str(exc)
    return None


def sampling_words(loaded, steps: int, cfg: float) -> str:
    """How the model samples, in words: DDIM or flow matching, and its CFG."""
    if getattr(loaded, "family", "dit") == "dit":
        return f"DDIM {steps}, CFG {cfg}"
    guidance = f"true CFG {cfg} (cond and uncond as separate forwards, one history each)" if cfg > 1 else f"CFG {cfg}"
    return f"flow matching (Euler, dynamic shift) {steps} steps, {guidance}"


def command(section: str, result: dict, extra: str = "") -> str:
    """The command that regenerates a section (model, steps and CFG spelled out for a model other than the DiT)."""
    s = result["settings"]
    model = s.get("model")
    if model in (None, DEFAULT_MODEL):
        return f"dqar fidelity --section {section}{extra}"
    return f"dqar fidelity --section {section} --model {model} --steps {s['steps']} --cfg {s['cfg']}{extra}"


def run_line(result: dict) -> str:
    """When, where and how long (for sections that record it)."""
    if "date" not in result:
        return ""
    return (f" Run {result['date']} on a {result['machine']} (torch threads: {result.get('threads', '?')}), "
            f"{result['seconds'] / 60:.1f} min.")
