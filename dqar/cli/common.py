"""What the `dqar` commands share: one-line argparse errors, common flags, and the checks that run before any work.

Every command checks its arguments (numbers, choices, the files it reads, the places it writes) first, and
only then loads a model or samples: bad input costs nothing and fails with one line, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from dqar.errors import DqarError

EXIT_USAGE = 2
THREADS_HELP = "torch CPU threads (default: torch's choice; 1 on a busy machine)"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> None:  # noqa: D401
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


# ----- flags --------------------------------------------------------------------------------------
def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id (facebook/DiT-XL-2-256), local folder, 'embedded' (default: the "
                   "shipped DiT) or 'embedded-flux' (the shipped Flux: 28 flow-matching steps, true CFG 4 by default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")


def sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags read by `run_config`."""
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 50; embedded-flux 28)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 4.0)")
    p.add_argument("--sampler", default=None, help="ddim | dpm (default ddim; flow models always sample with flow matching)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=None, help="base seed; sample i uses seed + i (default 42)")
    p.add_argument("--preset", default=None, help="baseline | scheduling_only | quant_cache_only | full_dqar | gate | block_reuse")
    p.add_argument("--config", default=None, help="TOML file with [reuse] and [sample] tables")


def threads_arg(p: argparse.ArgumentParser, help: str = THREADS_HELP) -> None:
    p.add_argument("--threads", type=int, default=None, help=help)


def quiet_arg(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    p.add_argument("--quiet", action="store_true", help=help)


# ----- checks (no work) ---------------------------------------------------------------------------
def at_least(flag: str, value, lo: int) -> None:
    """An integer flag must be >= lo."""
    if value is not None and value < lo:
        raise DqarError(f"{flag} {value} is invalid", f"use {flag} {lo} or more")


def in_range(flag: str, value, lo: float, hi: float) -> None:
    """A number flag must be finite and within [lo, hi]."""
    if value is not None and not lo <= value <= hi:  # NaN fails both comparisons
        raise DqarError(f"{flag} {value} is invalid", f"use {flag} between {lo:g} and {hi:g}")


def _check_writable(folder: Path, target: Path) -> None:
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent  # the nearest part of the path that exists
    if not probe.is_dir():
        raise DqarError(f"cannot write '{target}' ('{probe}' is not a folder)", "choose a writable output folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DqarError(f"cannot write '{target}' (permission denied)", "choose a writable output folder")


def writable_folder(path: str | Path) -> Path:
    """Refuse an output folder that could not be created or written; creates nothing."""
    path = Path(path)
    _check_writable(path, path)
    return path


def writable_file(path: str | Path) -> Path:
    """Refuse an output file whose folder could not be created or written, or that is a folder; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise DqarError(f"cannot write '{path}' (it is a folder)", "pass a file path")
    _check_writable(path.parent, path)
    return path


FLOW_MODELS = ("embedded-flux",)  # built-in flow models by name (besides the random-weight flow shapes)


def run_model(model: str | None) -> tuple[str | None, bool | None]:
    """(the model's name as its plans record it, whether it samples with flow matching), from `--model` before loading;
    None where only the loaded model can tell (a folder's name is its resolved path)."""
    from dqar.models import HUB_ID, RANDOM_FLOW, RANDOM_NAMES

    name = "embedded" if model in (None, "embedded") else str(model)
    if name in FLOW_MODELS:
        return name, True
    if name.partition("@")[0] in RANDOM_FLOW:
        return name.partition("@")[0], True  # loaded under its shape's name, whatever the resolution
    if name == "embedded" or name in RANDOM_NAMES:
        return name, False
    if Path(name).expanduser().exists():
        return None, False  # a folder: a DiT (dqar loads DiT folders), named by its resolved path
    return (name, False) if HUB_ID.match(name) else (None, None)


def run_sampler(run, flow: bool | None) -> str | None:
    """The sampler a run really uses: "flow" on a flow model whatever `run.sample.sampler` says (as `generate` keys it)."""
    return None if flow is None else "flow" if flow else run.sample.sampler


def check_reuse_files(run, model: str | None = "") -> None:
    """The plan and policy files a run config names: readable, and a plan made for this model (where `--model` names it
    before loading; "" skips it), the sampler it really runs, this step count and reuse."""
    from dqar.engine.plan import load_plan
    from dqar.engine.policy_net import load_policy
    from dqar.generate import plan_key

    if run.reuse.plan_file:
        name, flow = run_model(model) if model != "" else (None, None)
        key = {**plan_key(name, run), "sampler": run_sampler(run, flow)}  # None: checked once the model is loaded
        load_plan(run.reuse.plan_file).check_key(**key)
    if run.reuse.policy:
        load_policy(run.reuse.policy)


def set_threads(threads: int | None) -> None:
    """`--threads N`: torch CPU threads (1 avoids oversubscription on a busy machine)."""
    if threads is not None:
        at_least("--threads", threads, 1)
        import torch

        torch.set_num_threads(threads)


def _sample_keys(path: str) -> set[str]:
    """The keys a config file's [sample] table sets (the file was read and checked by `load_toml` already)."""
    import tomllib

    with open(path, "rb") as f:
        return set((tomllib.load(f).get("sample") or {}).keys())


def run_config(args, check_files: bool = True):
    """Config file (else the model's sampling defaults, `models.SAMPLE_DEFAULTS`), then --preset, then explicit sampling
    flags; the plan and policy files it names are checked too."""
    from dqar.engine.config import RunConfig, SampleConfig, build, load_toml, preset
    from dqar.models import SAMPLE_DEFAULTS

    defaults = SAMPLE_DEFAULTS.get(str(getattr(args, "model", None)), {})
    run = load_toml(args.config) if args.config else RunConfig(sample=SampleConfig(**defaults))
    unset = {k: v for k, v in defaults.items() if k not in _sample_keys(args.config)} if args.config else {}
    if unset:  # a config file that leaves a key out gets the model's default, as no config file does
        run = replace(run, sample=build(SampleConfig, {**run.sample.__dict__, **unset}, "sample"))
    if args.preset:
        run = replace(run, reuse=preset(args.preset))
    flags = {k: getattr(args, k) for k in ("steps", "cfg", "sampler", "seed", "eta") if getattr(args, k, None) is not None}
    if flags:
        run = replace(run, sample=build(SampleConfig, {**run.sample.__dict__, **flags}, "sample"))
    if check_files:
        check_reuse_files(run, getattr(args, "model", None))
    return run


# ----- work ---------------------------------------------------------------------------------------
def device_dtype(args):
    """(torch device, torch dtype) of `--device` and `--dtype`."""
    from dqar.device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return device, resolve_dtype(args.dtype, device)


def load(args):
    """The model of `--model` on `--device` in `--dtype` (device and dtype are checked before loading). A command that
    reads a run config (sampling flags) has the plan file it names checked against the loaded model before any work:
    its name, the sampler it really runs and its layer layout (`dqar.tuning.calibrate.check_plan_file`)."""
    from dqar import models

    device, dtype = device_dtype(args)
    loaded = models.load_model(args.model, device=device, dtype=dtype)
    if hasattr(args, "preset") and getattr(args, "config", None):
        from dqar.tuning.calibrate import check_plan_file

        check_plan_file(loaded, run_config(args, check_files=False))
    return loaded


def class_labels(classes: Sequence[str] | None, loaded) -> list[int]:
    """`--classes` as ids of `loaded`'s classes; without it the model's default classes."""
    from dqar.labels import default_labels, parse_labels

    return parse_labels(classes, loaded.num_classes, loaded.class_names) if classes else default_labels(loaded.num_classes)
