"""`dqar bench`, `dqar ablate`, `dqar compared`: the timed studies, each written to its files."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dqar.cli.common import at_least, device_dtype, in_range, model_args, quiet_arg, threads_arg, writable_file, writable_folder


def cmd_bench(args) -> int:
    from dqar import models
    from dqar.io import atomic_write_json, atomic_write_text
    from dqar.studies.bench.family import bench_model
    from dqar.studies.bench.chart import CHART_FILE, render_chart
    from dqar.studies.bench.runner import BenchSettings, render_table, run_bench
    from dqar.studies.measure.timing import cpu_threads

    at_least("--threads", args.threads, 1)
    in_range("--cfg", args.cfg, 0.0, 100.0)
    settings = BenchSettings(**_bench_settings(args))  # checked before the model loads
    model = bench_model(args.model, args.resolution)  # --resolution: the model name to load, or a one-line refusal
    out = writable_folder(args.out)
    device, dtype = device_dtype(args)
    if model in models.RANDOM_DIT_XL2:
        loaded = models.random_dit_xl2(device, dtype, with_vae=True, resolution=models.RANDOM_DIT_XL2[model])
    else:
        loaded = models.load_model(model, device=device, dtype=dtype)

    def write(result: dict) -> None:  # after every warm-up and every timed case, atomically: a killed run keeps every measurement
        atomic_write_json(out / "bench.json", result | {"command": shlex.join(["dqar", *args.argv])})
        atomic_write_text(out / "bench.md", render_table(result) + "\n")

    with cpu_threads(device, args.threads):  # on CPU one thread unless --threads: the sampling thread's CPU time is the clock
        result = run_bench(loaded, device, settings, progress=not args.quiet, on_update=write,
                           log=lambda line: print(line, file=sys.stderr, flush=True))  # warm-up lines, --quiet too
    print(render_table(result))
    if render_chart(result, out / CHART_FILE):
        print(f"chart: {out / CHART_FILE}")
    return 0


def _bench_settings(args) -> dict:
    """BenchSettings keywords from the flags: --quick first, then the flags given."""
    quick = dict(batch_sizes=(2,), steps=10, repeats=3, warmup=1) if args.quick else {}
    flags = {"batch_sizes": tuple(args.batch_sizes) if args.batch_sizes is not None else None, "steps": args.steps, "cfg": args.cfg,
             "repeats": args.repeats, "executors": tuple(args.executors) if args.executors else None,
             "peers": tuple(args.peers) if args.peers is not None else None, "cases": tuple(args.cases or ()),
             "verify_target": args.verify_target}
    given = {k: v for k, v in flags.items() if v is not None}
    return {**quick, **given, "compile": not (args.no_compile or args.quick), "presets": tuple(args.presets)}


def bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the stock model (eager, torch.compile), dqar (no reuse, presets) on its executors and "
                                     "diffusers' caching peers, with intervals and peak memory")
    model_args(p)
    p.set_defaults(model=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="images per generation, e.g. 1 8 32 64 (default 1 8 32)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: a DiT 50 DDIM; Flux and SD3 28 flow-matching Euler)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale, 0-100 (default: the model's: DiT 4, Flux 1, SD3 4.5, embedded-flux 4). DiT: > 1 batched "
                        "[cond; uncond] CFG. Flux: <= 1 guidance-distilled, one forward per step (Flux-dev's guidance embedding "
                        "at 3.5), > 1 true CFG, a cond and an uncond forward per step. SD3: > 1 batched [uncond; cond] CFG, "
                        "<= 1 one unguided forward")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side in pixels, a positive multiple of 16: a random flow shape's (random-flux-dev, "
                        "random-sd35-medium: default 1024; random-flux-tiny, random-sd3-tiny: 64; as --model NAME@PX), or "
                        "random-dit-xl2's 256 or 512 (512: random-dit-xl2-512); refused for other models, whose resolution "
                        "is fixed (a DiT's sample_size, embedded-flux's training size)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per case, >= 3 (default 5)")
    p.add_argument("--presets", nargs="*", default=["full_dqar", "quant_cache_only", "block_reuse"], help="presets to time (--presets alone: none)")
    p.add_argument("--executors", nargs="+", default=None,
                   help="dqar executors with rows: eager (patch), compiled and graph (the DiT), flow_compiled (Flux and other "
                        "non-DiT blocks: patch's dispatch over compiled stock blocks); default all, each refused where it "
                        "cannot run, with the reason")
    p.add_argument("--peers", nargs="*", default=None,
                   help="diffusers caching peers to time (pab first_block_cache taylorseer magcache: the default), each under "
                        "torch.compile where it tolerates it, else eager, and with compile rows on also eagerly beside it "
                        "(peer_<name>_eager); --peers alone: none")
    p.add_argument("--cases", nargs="+", default=None, help="time only the cases with these names or shell patterns, e.g. 'stock_*' full_dqar_graph")
    p.add_argument("--verify-target", type=float, default=None,
                   help="with --presets adaptive: scale the verifying decider's τ to skip this share of the FLOPs (0-1, e.g. "
                        "0.64, full_dqar's on embedded-flux), calibrated on the batch's labels at other seeds before timing")
    p.add_argument("--no-compile", action="store_true", help="skip every torch.compile row (stock_compiled, stock_compiled_cudagraphs, dqar compiled and graph; "
                                                               "peers eager)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run (about 2 minutes on a slow 2-core CPU): no torch.compile rows (as --no-compile; peers eager), "
                        "batch size 2, 10 steps, 3 repeats, 1 warm-up pass; --batch-sizes, --steps, --repeats still apply")
    p.add_argument("--out", default="results/bench", help="output folder for bench.json, bench.md and bench.png (the chart)")
    threads_arg(p, "CPU threads while timing (default 1: the sampling thread's CPU time is the clock; more: wall time); ignored on GPU")
    quiet_arg(p, "no progress bars")
    p.set_defaults(func=cmd_bench)


def ablate_executor(args) -> str:
    """--executor as given; without it "auto", except --quick on a CPU: "patch" (a smoke run compiles nothing)."""
    if args.executor is not None:
        return args.executor
    from dqar.device import resolve_device

    return "patch" if args.quick and resolve_device(args.device).type != "cuda" else "auto"


def cmd_ablate(args) -> int:
    from dqar.studies.ablation.runner import REPORT_FILE, AblationOptions, run_ablation

    at_least("--threads", args.threads, 1)
    at_least("--steps", args.steps, 1)
    if args.config is not None and args.grid is not None:
        from dqar.errors import DqarError

        raise DqarError("--config and --grid both name the grid", "pass one of them")
    opts = AblationOptions(model=args.model, out=writable_folder(args.out), quick=args.quick, grid=args.grid or "default",
                           resume=args.resume, config=args.config,
                           device=args.device, dtype=args.dtype, progress=not args.quiet, repeats=args.repeats,
                           stop_after=args.stop_after, steps=args.steps, threads=args.threads, executor=ablate_executor(args),
                           command=shlex.join(["dqar", *args.argv]))
    done = run_ablation(opts)  # reads the grid and any previous results before it loads the model
    report = Path(args.out) / REPORT_FILE
    if done.interrupted:
        sys.stderr.write(f"dqar ablate: interrupted after {done.completed} of {done.total} configurations; "
                         f"partial report in {report} — rerun with --resume to finish\n")
        return 130
    skipped = "".join(f"; not run: {n['name']} ({n['reason']})" for n in done.not_run)
    print(f"ablation: {done.completed} of {done.total} configurations ({done.ran} this run) in {done.seconds:.0f}s; report: {report}{skipped}")
    return 0


def ablate_parser(sub) -> None:
    p = sub.add_parser("ablate", help="ablation study: presets and sweeps against a baseline, with a report")
    model_args(p)
    p.add_argument("--out", default="results/ablation", help="output folder (default results/ablation)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of every report section (about 1.5 minutes on a shared 2-core CPU): --grid quick (the main "
                        "comparison, two short sweeps, one peer, 3 rounds, one fidelity run with FD besides the baseline's), and on a CPU "
                        "every configuration eagerly (patch executor: no torch.compile, so no compile time) unless --executor is given")
    from dqar.studies.ablation.grid import GRIDS

    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="the shipped grid (dqar/grids/NAME.toml): default (every sweep and peer method, fewer points; within 15 minutes "
                        "on a slow 2-core CPU), full (every point and peer setting: about 21 minutes there), quick (as --quick, but on "
                        "the default executor)")
    p.add_argument("--resume", action="store_true", help="continue the study in --out, skipping finished configurations")
    p.add_argument("--config", default=None, help="a grid TOML file replacing the shipped one (format: dqar/grids/default.toml)")
    threads_arg(p, "CPU threads while timing (default 1: stable timings); ignored on GPU")
    quiet_arg(p, "no progress bars")
    p.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)  # tests: fewer than 3 repeats
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate Ctrl-C
    p.add_argument("--steps", type=int, default=None, help="shared step count of the study (default: the grid's [sample] steps)")
    from dqar.studies.ablation.blocks import EXECUTOR_PREFERENCES

    p.add_argument("--executor", choices=EXECUTOR_PREFERENCES, default=None,
                   help="auto (default; patch under --quick on a CPU): time each configuration on the graph executor on CUDA, compiled on a CPU, where the engine "
                        "supports it, else eager; graph: the graph executor first on a CPU too (faster per generation, minutes of "
                        "compiling per configuration there); patch: eager")
    p.set_defaults(func=cmd_ablate)


def cmd_compared(args) -> int:
    from dqar.reporting.compared import write_document

    doc = write_document(args.results, writable_file(args.doc), note=args.note)
    print(f"wrote the measured 'Compared to' section of {doc} from {Path(args.results)}")
    return 0


def compared_parser(sub) -> None:
    p = sub.add_parser("compared", help="write the measured peers-vs-dqar section of docs/COMPARED.md from a dqar ablate run")
    p.add_argument("--results", default="results/ablation", help="the --out folder of a finished dqar ablate run with peers")
    p.add_argument("--doc", default="docs/COMPARED.md", help="the Markdown file whose generated section is replaced")
    p.add_argument("--note", default="", help="a note on the machine, printed next to its description")
    p.set_defaults(func=cmd_compared)
