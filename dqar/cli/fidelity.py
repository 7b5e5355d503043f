"""`dqar fidelity --section dynamic|engine|forecast`: the fidelity studies on the embedded model, each written to docs/FIDELITY.md."""
from __future__ import annotations

from pathlib import Path

from dqar.cli.common import at_least, quiet_arg, set_threads, threads_arg, writable_folder
from dqar.errors import DqarError

SECTIONS = ("dynamic", "engine", "forecast")


def fidelity_parser(sub) -> None:
    from dqar.studies.fidelity.evidence import DynamicSettings
    from dqar.studies.fidelity.forecast import ForecastSettings

    d, f = DynamicSettings(), ForecastSettings()
    p = sub.add_parser("fidelity", help="fidelity evidence on the embedded model, written to docs/FIDELITY.md")
    p.add_argument("--section", required=True, choices=SECTIONS,
                   help="dynamic: static schedules vs gate vs calibrated plans vs CFG sharing; engine: presets, refresh intervals, "
                        "cache formats and granularity (--samples is the total, spread over the 10 classes); forecast: "
                        "forecast order x granularity x refresh, INT8 history, peers at matched shares, DPM-Solver++ axes")
    p.add_argument("--samples", type=int, default=d.samples, help=f"evaluated images (default {d.samples}; the forecast targets use 100)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help=f"dynamic: calibration images (default {d.calib_samples})")
    p.add_argument("--probe-samples", type=int, default=f.probe_samples, help=f"forecast: probe images on other seeds (default {f.probe_samples})")
    p.add_argument("--dpm-steps", type=int, default=f.dpm_steps, help=f"forecast: DPM-Solver++ part, 0 to skip (default {f.dpm_steps})")
    p.add_argument("--no-peers", action="store_true", help="forecast: skip the peers (and the TaylorSeer tuning)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"sampler steps (default {d.steps})")
    p.add_argument("--cfg", type=float, default=d.cfg, help=f"guidance scale (default {d.cfg})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"base seed (default {d.seed})")
    p.add_argument("--out", default=d.out_dir, help=f"folder of FIDELITY.md and the plots (default {d.out_dir})")
    threads_arg(p)
    quiet_arg(p)
    p.set_defaults(func=cmd_fidelity)


def cmd_fidelity(args) -> int:
    """Check every setting, then run the section's study and write it."""
    from dqar.engine.config import SampleConfig

    set_threads(args.threads)
    writable_folder(args.out)
    SampleConfig(steps=args.steps, cfg=args.cfg, seed=args.seed)  # validated before any work
    run = {"dynamic": _dynamic, "engine": _engine, "forecast": _forecast}[args.section]
    return run(args)


def _dynamic(args) -> int:
    from dqar.studies.fidelity.evidence import SECTION, DynamicSettings, run_dynamic, summary_lines, write_dynamic

    if args.samples < 2 or args.calib_samples < 1:
        raise DqarError("the study needs at least 2 samples and 1 calibration sample", "use --samples >= 2 --calib-samples >= 1")
    s = DynamicSettings(samples=args.samples, steps=args.steps, cfg=args.cfg, seed=args.seed, calib_samples=args.calib_samples,
                        out_dir=args.out)
    result = run_dynamic(s, progress=not args.quiet)
    return _written(SECTION, write_dynamic(result, s.out_dir), Path(s.out_dir) / "fidelity_dynamic.png", summary_lines(result))


def _engine(args) -> int:
    from dqar.studies.fidelity.engine import EngineSettings, run_engine, write_engine

    at_least("--samples", args.samples, 1)
    settings = EngineSettings(samples_per_class=max(1, args.samples // 10), steps=args.steps, cfg=args.cfg, seed=args.seed, out_dir=args.out)
    doc = write_engine(run_engine(settings, progress=not args.quiet), settings.out_dir)
    print(f"wrote section 'Engine' of {doc}")
    return 0


def _forecast(args) -> int:
    from dqar.studies.fidelity.forecast import SECTION, ForecastSettings, run_forecast
    from dqar.studies.fidelity.forecast_section import PLOT, summary_lines, write_forecast

    if args.samples < 2 or args.probe_samples < 1 or args.dpm_steps < 0:
        raise DqarError("the forecast study needs >= 2 samples, >= 1 probe sample and --dpm-steps >= 0",
                        "use --samples 100 --probe-samples 20 --dpm-steps 20")
    s = ForecastSettings(samples=args.samples, probe_samples=args.probe_samples, steps=args.steps, cfg=args.cfg, seed=args.seed,
                         dpm_steps=args.dpm_steps, peers=not args.no_peers, out_dir=args.out)
    result = run_forecast(s, progress=not args.quiet)
    return _written(SECTION, write_forecast(result, s.out_dir), Path(s.out_dir) / PLOT, summary_lines(result))


def _written(section: str, doc: Path, plot: Path, lines: list[str]) -> int:
    """Say what was written and the section's verdicts."""
    print(f"wrote section '{section}' of {doc}, {plot}")
    for line in lines:
        print("  " + line)
    return 0
