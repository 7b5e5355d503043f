"""`dqar fidelity --section dynamic|engine|forecast|adaptive [--model embedded-flux]`: the fidelity studies on an embedded model,
each written to its own docs/FIDELITY.md section (the DiT's "Engine", the Flux's "Engine (embedded-flux)", ...)."""
from __future__ import annotations

from pathlib import Path

from dqar.cli.common import at_least, quiet_arg, set_threads, threads_arg, writable_folder
from dqar.errors import DqarError

SECTIONS = ("dynamic", "engine", "forecast", "adaptive", "forecaster")
MODELS = ("embedded", "embedded-flux")  # the models the embedded classifier scores


def fidelity_parser(sub) -> None:
    from dqar.studies.fidelity.evidence import DynamicSettings
    from dqar.studies.fidelity.forecast import ForecastSettings

    d, f = DynamicSettings(), ForecastSettings()
    p = sub.add_parser("fidelity", help="fidelity evidence on an embedded model, written to docs/FIDELITY.md")
    p.add_argument("--section", required=True, choices=SECTIONS,
                   help="dynamic: static schedules vs gate vs calibrated plans vs CFG sharing; engine: presets, refresh intervals, "
                        "cache formats and granularity (--samples is the total, spread over the 10 classes); forecast: "
                        "forecast order x granularity x refresh, INT8 history, peers at matched shares, DPM-Solver++ axes; "
                        "adaptive: the verifying decider (tau calibrated on probe seeds) against the best static plan per "
                        "forecaster at 50-80%% of FLOPs skipped and at full_dqar's share; forecaster: full_dqar's plan under "
                        "each forecast_kind on both embedded models, the kind chosen on probe seeds (ignores --model)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"evaluated images (default {d.samples}; adaptive 100; the forecast targets use 100)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help=f"dynamic, adaptive: calibration images (default {d.calib_samples})")
    p.add_argument("--probe-samples", type=int, default=f.probe_samples, help=f"forecast, adaptive: probe images on other seeds (default {f.probe_samples})")
    p.add_argument("--dpm-steps", type=int, default=f.dpm_steps, help=f"forecast: DPM-Solver++ part, 0 to skip (default {f.dpm_steps})")
    p.add_argument("--no-peers", action="store_true", help="forecast: skip the peers (and the TaylorSeer tuning)")
    p.add_argument("--rows", nargs="+", metavar="NAME", default=None,
                   help="engine: re-measure only these rows (e.g. full_dqar adaptive) into the saved section, which must exist "
                        "with the same settings; the baseline is regenerated and must score as before")
    p.add_argument("--extend", choices=("per-sample", "policy"), default=None,
                   help="adaptive: add rows to the saved section instead of running it again; per-sample: the verifying "
                        "decider with verify_per_sample (each sample refreshes on its own probe error) at each saved target, "
                        "paired with the batch decider and the best static plan, both re-measured; policy: block-feature "
                        "policies (--policy) at each saved target, paired with the best static plan re-measured")
    p.add_argument("--policy", nargs="+", default=None, metavar="PATH",
                   help="--extend policy: block-feature policy checkpoints, named by file stem (default: the model's shipped ones)")
    p.add_argument("--model", default="embedded", choices=MODELS,
                   help="embedded (the DiT, default) | embedded-flux (the Flux: its own sections, Flux's sampling defaults)")
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps (default {d.steps}; embedded-flux 28)")
    p.add_argument("--cfg", type=float, default=None, help=f"guidance scale (default {d.cfg}; embedded-flux: true CFG 4)")
    p.add_argument("--machine", default="", help="where it runs, in words, for the section (default: the device name or CPU cores)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"base seed (default {d.seed})")
    p.add_argument("--out", default=d.out_dir, help=f"folder of FIDELITY.md and the plots (default {d.out_dir})")
    threads_arg(p)
    quiet_arg(p)
    p.set_defaults(func=cmd_fidelity)


def cmd_fidelity(args) -> int:
    """Check every setting, then run the section's study and write it."""
    from dqar.engine.config import SampleConfig

    from dqar.models import SAMPLE_DEFAULTS
    from dqar.studies.fidelity.evidence import DynamicSettings

    if args.extend and args.section != "adaptive":
        raise DqarError(f"--extend adds rows to the adaptive section, not to '{args.section}'", "use --section adaptive, or drop --extend")
    if args.policy and args.extend != "policy":
        raise DqarError("--policy names the policies of --extend policy", "add --section adaptive --extend policy, or drop --policy")
    if args.rows and args.section != "engine":
        raise DqarError(f"--rows re-measures rows of the engine section, not of '{args.section}'", "use --section engine, or drop --rows")
    set_threads(args.threads)
    writable_folder(args.out)
    defaults = {"steps": 50, "cfg": 4.0, **SAMPLE_DEFAULTS.get(args.model, {})}
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.cfg = defaults["cfg"] if args.cfg is None else args.cfg
    SampleConfig(steps=args.steps, cfg=args.cfg, seed=args.seed)  # validated before any work
    if args.samples is None:
        args.samples = 100 if args.section in ("adaptive", "forecaster") else DynamicSettings().samples
    run = {"dynamic": _dynamic, "engine": _engine, "forecast": _forecast, "adaptive": _adaptive, "forecaster": _forecaster}[args.section]
    return run(args)


def _dynamic(args) -> int:
    from dqar.studies.fidelity.sections import file_stem, section_name
    from dqar.studies.fidelity.evidence import SECTION, DynamicSettings, run_dynamic, summary_lines, write_dynamic

    if args.samples < 2 or args.calib_samples < 1:
        raise DqarError("the study needs at least 2 samples and 1 calibration sample", "use --samples >= 2 --calib-samples >= 1")
    s = DynamicSettings(samples=args.samples, steps=args.steps, cfg=args.cfg, seed=args.seed, calib_samples=args.calib_samples,
                        out_dir=args.out, model=args.model, machine=args.machine)
    result = run_dynamic(s, progress=not args.quiet)
    doc = write_dynamic(result, s.out_dir)
    return _written(section_name(SECTION, args.model), doc, Path(s.out_dir) / f"{file_stem('fidelity_dynamic', args.model)}.png",
                    summary_lines(result))


def _engine(args) -> int:
    from dqar.studies.fidelity.engine import SECTION, EngineSettings, rerun_engine, run_engine, write_engine
    from dqar.studies.fidelity.sections import file_stem, section_name

    at_least("--samples", args.samples, 1)
    settings = EngineSettings(samples_per_class=max(1, args.samples // 10), steps=args.steps, cfg=args.cfg, seed=args.seed, out_dir=args.out,
                              model=args.model, machine=args.machine)
    if args.rows:
        saved = Path(args.out) / f"{file_stem('fidelity_engine', args.model)}.json"
        result = rerun_engine(settings, args.rows, _saved(saved), progress=not args.quiet)
    else:
        result = run_engine(settings, progress=not args.quiet)
    doc = write_engine(result, settings.out_dir)
    print(f"wrote section '{section_name(SECTION, args.model)}' of {doc}")
    for r in result["rows"]:
        if "refused" in r:
            print(f"  refused on {result['model']}: {r['name']}: {r['refused']}")
    return 0


def _forecaster(args) -> int:
    from dqar.studies.fidelity.forecaster import SECTION, ForecasterSettings, run_forecaster, verdicts, write_forecaster

    s = ForecasterSettings(samples_per_class=max(1, args.samples // 10), probe_per_class=max(1, args.probe_samples // 10),
                           out_dir=args.out, machine=args.machine)
    result = run_forecaster(s, progress=not args.quiet)
    print(f"wrote section '{SECTION}' of {write_forecaster(result, s.out_dir)}")
    for line in verdicts(result):
        print("  " + line)
    return 0


def _saved(path: Path) -> dict:
    """An earlier section's JSON, or one line saying what to run first."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DqarError(f"cannot read the saved result {path} ({type(e).__name__})", "run the whole section first, without --rows or --extend") from None


def _forecast(args) -> int:
    from dqar.studies.fidelity.forecast import ForecastSettings, run_forecast
    from dqar.studies.fidelity.forecast_section import files, section_name, summary_lines, write_forecast

    if args.samples < 2 or args.probe_samples < 1 or args.dpm_steps < 0:
        raise DqarError("the forecast study needs >= 2 samples, >= 1 probe sample and --dpm-steps >= 0",
                        "use --samples 100 --probe-samples 20 --dpm-steps 20")
    s = ForecastSettings(samples=args.samples, probe_samples=args.probe_samples, steps=args.steps, cfg=args.cfg, seed=args.seed,
                         dpm_steps=args.dpm_steps, peers=not args.no_peers, out_dir=args.out,
                         model=None if args.model == "embedded" else args.model)
    result = run_forecast(s, progress=not args.quiet)
    doc = write_forecast(result, s.out_dir)
    return _written(section_name(result), doc, Path(s.out_dir) / files(result)[0], summary_lines(result))


def _adaptive(args) -> int:
    from dqar.studies.fidelity.adaptive import SECTION, AdaptiveSettings, run_adaptive
    from dqar.studies.fidelity.adaptive_section import verdicts, write_adaptive
    from dqar.studies.fidelity.sections import section_name

    at_least("--samples", args.samples, 2)
    at_least("--probe-samples", args.probe_samples, 2)
    at_least("--calib-samples", args.calib_samples, 1)
    s = AdaptiveSettings(model=None if args.model == "embedded" else args.model, samples=args.samples,
                         probe_samples=args.probe_samples, calib_samples=args.calib_samples, steps=args.steps, cfg=args.cfg,
                         seed=args.seed, out_dir=args.out)
    command = "dqar " + " ".join(getattr(args, "argv", []))
    if args.extend:
        return _adaptive_extend(args, s, command)
    result = run_adaptive(s, progress=not args.quiet)
    doc = write_adaptive(result, s.out_dir, command, args.machine)
    print(f"wrote section '{section_name(SECTION, args.model)}' of {doc}")
    for line in verdicts(result):
        print("  " + line)
    return 0


def _block_policies(args) -> dict[str, str]:
    """name → checkpoint of `--extend policy`: the --policy files (checked to exist) or the model's shipped block policies."""
    from dqar.studies.fidelity.policy_eval import shipped_block_policies

    if not args.policy:
        found = shipped_block_policies(args.model)
        if not found:
            raise DqarError(f"no block-feature policy ships for {args.model}", "train one (dqar policy collect --granularity "
                            "block, dqar policy train) and pass it with --policy PATH")
        return found
    for path in args.policy:
        if not Path(path).is_file():
            raise DqarError(f"policy file '{path}' does not exist", "pass a checkpoint written by dqar policy train")
    return {Path(p).stem: str(p) for p in args.policy}


def _adaptive_extend(args, s, command: str) -> int:
    """`--extend per-sample | policy`: the saved adaptive result with those rows added, its section written again."""
    import time

    from dqar.studies.fidelity.adaptive import SECTION
    from dqar.studies.fidelity.adaptive_section import block_policy_lines, per_sample_lines, write_adaptive
    from dqar.studies.fidelity.sections import file_stem, machine_description, section_name, today

    model = None if args.model == "embedded" else args.model
    policies = _block_policies(args) if args.extend == "policy" else {}
    saved = _saved(Path(s.out_dir) / f"{file_stem('fidelity_adaptive', model)}.json")
    start = time.perf_counter()
    if args.extend == "policy":
        from dqar.studies.fidelity.adaptive_policy import extend_with_policy

        result, key, lines = extend_with_policy(saved, s, policies, progress=not args.quiet), "policy_run", block_policy_lines
    else:
        from dqar.studies.fidelity.adaptive_split import extend_with_per_sample

        result, key, lines = extend_with_per_sample(saved, s, progress=not args.quiet), "per_sample_run", per_sample_lines
    result[key] = {"command": command, "when": today(), "machine": args.machine or machine_description(),
                   "seconds": round(time.perf_counter() - start)}
    doc = write_adaptive(result, s.out_dir, command, args.machine)
    print(f"wrote section '{section_name(SECTION, args.model)}' of {doc}")
    for line in lines(result):
        if line.startswith("- "):
            print("  " + line)
    return 0


def _written(section: str, doc: Path, plot: Path, lines: list[str]) -> int:
    """Say what was written and the section's verdicts."""
    print(f"wrote section '{section}' of {doc}, {plot}")
    for line in lines:
        print("  " + line)
    return 0
