"""`dqar` command line: a thin layer over the library. Bad input → one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from dqar.errors import DqarError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> None:  # noqa: D401
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(EXIT_USAGE)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id (facebook/DiT-XL-2-256), local folder, or 'embedded' (default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16")


def _run_config(args):
    """Config file, then --preset, then explicit sampling flags."""
    from dqar.engine.config import RunConfig, load_toml, preset

    run = load_toml(args.config) if args.config else RunConfig()
    if args.preset:
        run = replace(run, reuse=preset(args.preset))
    flags = {k: getattr(args, k) for k in ("steps", "cfg", "sampler", "seed", "eta") if getattr(args, k, None) is not None}
    if flags:
        from dqar.engine.config import SampleConfig, build

        run = replace(run, sample=build(SampleConfig, {**run.sample.__dict__, **flags}, "sample"))
    return run


def cmd_sample(args) -> int:
    from dqar.device import resolve_device, resolve_dtype
    from dqar.generate import generate
    from dqar.images import save_samples
    from dqar.io import atomic_write_json
    from dqar.labels import default_labels, parse_labels
    from dqar.models import load_model

    run = _run_config(args)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    labels = parse_labels(args.classes, loaded.num_classes, loaded.class_names) if args.classes else default_labels(loaded.num_classes)
    out = Path(args.out)
    start = time.perf_counter()
    gen = generate(loaded, labels, run, progress=not args.quiet)
    seconds = time.perf_counter() - start
    save_samples(gen.output.images, labels, out, scale=1 if gen.output.images.shape[-1] >= 128 else 4)
    record = {"model": loaded.name, "labels": labels, "config": run.to_dict(), "seconds": seconds,
              "stats": gen.stats.to_dict() if gen.stats else None}
    atomic_write_json(out / "stats.json", record)
    reuse = f", reuse {100 * gen.stats.reuse_fraction:.1f}%" if gen.stats else ""
    print(f"wrote {len(labels)} samples to {out} in {seconds:.1f}s{reuse}")
    return 0


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate class-conditional samples with reuse")
    _model_args(p)
    p.add_argument("--classes", nargs="+", default=None, help="class ids or names (default: one per class, or 8 ImageNet classes)")
    _sampling_args(p)
    p.add_argument("--out", default="results/sample", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags read by `_run_config`."""
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 4.0)")
    p.add_argument("--sampler", default=None, help="ddim | dpm (default ddim)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=None, help="base seed; sample i uses seed + i (default 42)")
    p.add_argument("--preset", default=None, help="baseline | scheduling_only | quant_cache_only | full_dqar")
    p.add_argument("--config", default=None, help="TOML file with [reuse] and [sample] tables")


def cmd_fid_sample(args) -> int:
    from dqar.studies.distributed import FidSampleJob, run_job

    job = FidSampleJob(out=Path(args.out), num_samples=args.num_samples, batch_size=args.batch_size, run=_run_config(args),
                       model=args.model, classes=tuple(args.classes) if args.classes else None, device=args.device,
                       dtype=args.dtype, keep_shards=args.keep_shards, progress=not args.quiet)
    start = time.perf_counter()
    record = run_job(job)
    if record:  # rank 0
        print(f"wrote {record['num_samples']} samples {tuple(record['image_shape'])} to {args.out} "
              f"with {record['world_size']} rank(s) in {time.perf_counter() - start:.1f}s "
              f"({record['rank0_resumed']} of rank 0's {record['rank0_batches']} batches resumed)")
    return 0


def _fid_sample_parser(sub) -> None:
    p = sub.add_parser("fid-sample", help="generate N samples into one .npz for FID (shards over torchrun ranks)",
                       description="Run under `torchrun --nproc_per_node=N -m dqar.cli fid-sample ...` to shard; "
                                   "sample i has label classes[i % len(classes)] and seed seed + i.")
    _model_args(p)
    p.add_argument("--num-samples", type=int, required=True, help="N (50000 for the standard FID protocol)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch on each rank (default 32)")
    p.add_argument("--classes", nargs="+", default=None, help="class ids or names cycled over indices (default: all classes)")
    _sampling_args(p)
    p.add_argument("--out", required=True, help="merged .npz (arr_0 uint8 (N, H, W, C), labels); parts in <out>.shards/")
    p.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after merging")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fid_sample)


def cmd_fid(args) -> int:
    from dqar.device import resolve_device
    from dqar.studies.fid import fid_embedded, fid_inception
    from dqar.io import atomic_write_json

    device = resolve_device(args.device)
    if args.embedded:
        result = fid_embedded(args.samples, args.ref, device=device, batch_size=args.batch_size)
    else:
        if args.ref is None:
            raise DqarError("--ref is required without --embedded", "pass an .npz with mu and sigma (ADM's reference batch)")
        result = fid_inception(args.samples, args.ref, args.inception, device=device, batch_size=args.batch_size)
    if args.json_out:
        atomic_write_json(Path(args.json_out), result.to_dict())
    accuracy = f", class accuracy {result.class_accuracy:.3f}" if result.class_accuracy is not None else ""
    print(f"FID {result.fid:.4f} ({result.features}, {result.num_samples} samples vs {result.reference}{accuracy})")
    return 0


def _fid_parser(sub) -> None:
    p = sub.add_parser("fid", help="score a samples .npz: Inception FID against reference statistics, or --embedded")
    p.add_argument("--samples", required=True, help=".npz with arr_0 uint8 (N, H, W, C)")
    p.add_argument("--ref", default=None, help=".npz with mu and sigma (ADM's reference batch); with --embedded default: shipped stats")
    p.add_argument("--inception", default=None, help="TorchScript inception-2015-12-05.pt (runs code from the file: trusted files only)")
    p.add_argument("--embedded", action="store_true", help="embedded-model samples: FD of the embedded classifier's features (offline)")
    p.add_argument("--batch-size", type=int, default=100, help="feature batch size (default 100)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json-out", default=None, help="also write the score as JSON here")
    p.set_defaults(func=cmd_fid)


def cmd_bench(args) -> int:
    from dqar.studies.bench import BenchSettings, render_table, run_bench
    from dqar.device import resolve_device, resolve_dtype
    from dqar.io import atomic_write_json, atomic_write_text
    from dqar.models import load_model, random_dit_xl2

    _set_threads(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model == "random-dit-xl2":
        loaded = random_dit_xl2(device, dtype, with_vae=True)
    else:
        loaded = load_model(args.model, device=device, dtype=dtype)
    quick = dict(batch_sizes=(1, 2), steps=10) if args.quick else {}
    given = {k: v for k, v in (("batch_sizes", tuple(args.batch_sizes or ())), ("steps", args.steps), ("repeats", args.repeats)) if v}
    settings = BenchSettings(**{**quick, **given, "compile": not args.no_compile, "presets": tuple(args.presets)})
    out = Path(args.out)

    def write(result: dict) -> None:  # after every batch size: a killed run keeps what it finished
        atomic_write_json(out / "bench.json", result)
        atomic_write_text(out / "bench.md", render_table(result) + "\n")

    result = run_bench(loaded, device, settings, progress=not args.quiet, on_batch=write)
    print(render_table(result))
    return 0


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time stock DiTPipeline, dqar no-reuse (eager, compiled) and presets")
    _model_args(p)
    p.set_defaults(model=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="images per generation (default 1 8 32)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case, >= 3 (default 3)")
    p.add_argument("--presets", nargs="+", default=["full_dqar", "quant_cache_only", "block_reuse"], help="presets to time")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--quick", action="store_true", help="batch sizes 1 2, 10 steps: a smoke run")
    p.add_argument("--out", default="results/bench", help="output folder for bench.json and bench.md")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_bench)


def cmd_ablate(args) -> int:
    from dqar.studies.ablation import REPORT_FILE, AblationOptions, run_ablation

    opts = AblationOptions(model=args.model, out=Path(args.out), quick=args.quick, resume=args.resume, config=args.config,
                           device=args.device, dtype=args.dtype, progress=not args.quiet, repeats=args.repeats,
                           stop_after=args.stop_after, steps=args.steps, threads=args.threads,
                           command=shlex.join(["dqar", *args.argv]))
    done = run_ablation(opts)
    report = Path(args.out) / REPORT_FILE
    if done.interrupted:
        sys.stderr.write(f"dqar ablate: interrupted after {done.completed} of {done.total} configurations; "
                         f"partial report in {report} — rerun with --resume to finish\n")
        return 130
    skipped = "".join(f"; not run: {n['name']} ({n['reason']})" for n in done.not_run)
    print(f"ablation: {done.completed} of {done.total} configurations ({done.ran} this run) in {done.seconds:.0f}s; report: {report}{skipped}")
    return 0


def _ablate_parser(sub) -> None:
    p = sub.add_parser("ablate", help="ablation study: presets and sweeps against a baseline, with a report")
    _model_args(p)
    p.add_argument("--out", default="results/ablation", help="output folder (default results/ablation)")
    p.add_argument("--quick", action="store_true", help="the small shipped grid (quick.toml) instead of default.toml")
    p.add_argument("--resume", action="store_true", help="continue the study in --out, skipping finished configurations")
    p.add_argument("--config", default=None, help="a grid TOML file replacing the shipped one (format: dqar/grids/default.toml)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default 1: stable timings); ignored on GPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--repeats", type=int, default=None, help=argparse.SUPPRESS)  # tests: fewer than 3 repeats
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate Ctrl-C
    p.add_argument("--steps", type=int, default=None, help="shared step count of the study (default: the grid's [sample] steps)")
    p.set_defaults(func=cmd_ablate)


def cmd_compared(args) -> int:
    from dqar.reporting.compared import write_document

    doc = write_document(args.results, args.doc, note=args.note)
    print(f"wrote the measured 'Compared to' section of {doc} from {Path(args.results)}")
    return 0


def _compared_parser(sub) -> None:
    p = sub.add_parser("compared", help="write the measured peers-vs-dqar section of docs/COMPARED.md from a dqar ablate run")
    p.add_argument("--results", default="results/ablation", help="the --out folder of a finished dqar ablate run with peers")
    p.add_argument("--doc", default="docs/COMPARED.md", help="the Markdown file whose generated section is replaced")
    p.add_argument("--note", default="", help="a note on the machine, printed next to its description")
    p.set_defaults(func=cmd_compared)


def cmd_calibrate(args) -> int:
    from dqar.tuning.calibrate import calibrate
    from dqar.device import resolve_device, resolve_dtype
    from dqar.io import atomic_write_json
    from dqar.labels import default_labels, parse_labels
    from dqar.models import load_model
    from dqar.engine.plan import save_plan

    run = _run_config(args)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    classes = parse_labels(args.classes, loaded.num_classes, loaded.class_names) if args.classes else default_labels(loaded.num_classes)
    if args.samples < 1:
        raise DqarError(f"--samples {args.samples} is invalid", "use at least 1 calibration sample")
    labels = [classes[i % len(classes)] for i in range(args.samples)]
    cal = calibrate(loaded, labels, run, target_fraction=args.target, error_budget=args.budget,
                    max_staleness=args.max_staleness, progress=not args.quiet)
    save_plan(cal.plan, args.out)
    if args.trace:
        atomic_write_json(Path(args.trace), {"key": cal.plan.key, "labels": labels, **cal.trace.to_dict()})
    print(f"wrote plan {args.out} for {cal.plan.key}: reuse {100 * cal.plan.reuse_fraction:.1f}% "
          f"of {cal.plan.num_evaluations} evaluations x {cal.plan.num_layers} layers (use it with plan_file = \"{args.out}\")")
    return 0


def _calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="derive a reuse plan from one full-compute pass on a few samples",
                       description="Records per (evaluation, layer) the relative change of attn1's output, its entropy and the "
                                   "SNR, then picks the cells with the smallest accumulated change. The plan is keyed by model, "
                                   "sampler and steps; sampling with it makes no host syncs.")
    _model_args(p)
    p.add_argument("--classes", nargs="+", default=None, help="class ids or names cycled over the samples (default: all classes)")
    p.add_argument("--samples", type=int, default=8, help="calibration samples (default 8)")
    _sampling_args(p)
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target", type=float, default=None, help="reuse fraction of all (evaluation, layer) cells, e.g. 0.5")
    goal.add_argument("--budget", type=float, default=None, help="largest estimated relative error of any reused cell, e.g. 0.1")
    p.add_argument("--max-staleness", type=int, default=None, help="longest reuse run (default: the config's max_staleness)")
    p.add_argument("--out", default="plan.json", help="plan JSON (default plan.json)")
    p.add_argument("--trace", default=None, help="also write the recorded signals as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_calibrate)


def cmd_fidelity(args) -> int:
    if args.section == "engine":
        from dqar.studies.engine_fidelity import EngineSettings, run_engine, write_engine

        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        settings = EngineSettings(samples_per_class=max(1, args.samples // 10), steps=args.steps, cfg=args.cfg, seed=args.seed, out_dir=args.out)
        doc = write_engine(run_engine(settings, progress=not args.quiet), settings.out_dir)
        print(f"wrote section 'Engine' of {doc}")
        return 0
    from dqar.studies.evidence import run_section

    return run_section(args)


def _fidelity_parser(sub) -> None:
    from dqar.studies.evidence import add_arguments

    p = sub.add_parser("fidelity", help="fidelity evidence on the embedded model, written to docs/FIDELITY.md")
    p.add_argument("--section", required=True, choices=["dynamic", "engine"],
                   help="dynamic: static schedules vs gate vs calibrated plans vs CFG sharing; engine: presets, refresh intervals, "
                        "cache formats and granularity (--samples is the total, spread over the 10 classes)")
    add_arguments(p)
    p.set_defaults(func=cmd_fidelity)


def _set_threads(args) -> None:
    """`--threads N`: torch CPU threads (1 avoids oversubscription on a busy machine)."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise DqarError(f"--threads {args.threads} is invalid", "use --threads 1 or more")
        import torch

        torch.set_num_threads(args.threads)


def cmd_policy_collect(args) -> int:
    from dqar.device import resolve_device, resolve_dtype
    from dqar.io import atomic_write_json
    from dqar.models import load_model
    from dqar.tuning.collect import CollectSettings, ValidateSettings, collect_traces, save_traces, validate_proxy

    _set_threads(args)
    settings = CollectSettings(generations=args.generations, batch=args.batch, seed=args.seed, steps=args.steps, cfg=args.cfg,
                               sampler=args.sampler, max_age=args.max_age, entropy_rows=args.entropy_rows)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    start = time.perf_counter()
    traces = collect_traces(loaded, settings, progress=not args.quiet)
    save_traces(traces, args.out)
    print(f"wrote {len(traces)} rows from {settings.generations} generations to {args.out} in {time.perf_counter() - start:.0f}s")
    if args.validate:
        check = validate_proxy(loaded, settings, ValidateSettings(groups=args.validate), progress=not args.quiet)
        path = Path(args.out).with_suffix(".validation.json")
        atomic_write_json(path, check)
        print(f"label vs final-image error over {check['groups']} reuse runs: Spearman {check['spearman']:.3f} "
              f"(single cells {check['spearman_single_cells']}); wrote {path}")
    return 0


def cmd_policy_train(args) -> int:
    import json

    from dqar.io import atomic_write_json
    from dqar.engine.policy_net import save_policy
    from dqar.tuning.collect import load_traces
    from dqar.tuning.train import TrainSettings, train_policy

    _set_threads(args)
    settings = TrainSettings(hidden=tuple(args.hidden), epochs=args.epochs, lr=args.lr, holdout=args.holdout, seed=args.seed)
    traces = load_traces(args.traces)
    start = time.perf_counter()
    result = train_policy(traces, settings, progress=not args.quiet)
    report = {**result.report, "traces": str(args.traces), "seconds": time.perf_counter() - start}
    validation = Path(args.traces).with_suffix(".validation.json")
    if validation.is_file():
        report["label_validation"] = {k: v for k, v in json.loads(validation.read_text()).items() if k != "rows"}
    out = Path(args.out)
    save_policy(result.checkpoint, out)
    atomic_write_json(out.with_suffix(".json"), report)
    h = report["heldout"]
    print(f"MLP with {report['parameters']} parameters; held-out ({len(report['split']['heldout_generations'])} generations): "
          f"Spearman {h['spearman']:.3f} (last change x age: {h['spearman_naive']:.3f}), R2 of log error {h['r2_log']:.3f}; "
          f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def cmd_policy_distill(args) -> int:
    from dqar.engine.config import with_overrides
    from dqar.device import resolve_device, resolve_dtype
    from dqar.labels import default_labels, parse_labels
    from dqar.models import load_model
    from dqar.engine.plan import save_plan
    from dqar.tuning.distill import distill_plan

    _set_threads(args)
    run = _run_config(args)
    given = {k: v for k, v in (("policy", args.policy), ("policy_threshold", args.threshold), ("policy_budget", args.budget)) if v is not None}
    run = replace(run, reuse=with_overrides(run.reuse, **given))
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device, dtype=resolve_dtype(args.dtype, device))
    classes = parse_labels(args.classes, loaded.num_classes, loaded.class_names) if args.classes else default_labels(loaded.num_classes)
    if args.samples < 1:
        raise DqarError(f"--samples {args.samples} is invalid", "use at least 1 sample")
    plan = distill_plan(loaded, [classes[i % len(classes)] for i in range(args.samples)], run, progress=not args.quiet)
    save_plan(plan, args.out)
    print(f"wrote plan {args.out}: reuse {100 * plan.reuse_fraction:.1f}% of {plan.num_evaluations} evaluations x "
          f"{plan.num_layers} layers, decided by {run.reuse.policy} at threshold {run.reuse.policy_threshold} "
          f"(use it with plan_file = \"{args.out}\": no host syncs)")
    return 0


def cmd_policy_evaluate(args) -> int:
    from dqar.studies.policy_eval import run_command

    _set_threads(args)
    return run_command(args)


def _policy_parser(sub) -> None:
    p = sub.add_parser("policy", help="the learned reuse policy: collect traces, train the MLP, evaluate it",
                       description="Use a trained policy with `policy = \"PATH\"` (and policy_threshold / policy_budget) in [reuse].")
    psub = p.add_subparsers(dest="policy_command", required=True, parser_class=_Parser)
    c = psub.add_parser("collect", help="full-compute generations -> features and measured reuse errors (.npz)")
    _model_args(c)
    c.add_argument("--generations", type=int, default=64, help="generations; the held-out split is by generation (default 64)")
    c.add_argument("--batch", type=int, default=2, help="samples per generation (default 2)")
    c.add_argument("--seed", type=int, default=10_000, help="generation g, sample i uses seed + g * batch + i (default 10000)")
    c.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    c.add_argument("--cfg", type=float, default=4.0, help="guidance scale (default 4.0)")
    c.add_argument("--sampler", default="ddim", help="ddim | dpm (default ddim)")
    c.add_argument("--max-age", type=int, default=3, help="largest reuse staleness labelled (default 3)")
    c.add_argument("--entropy-rows", type=int, default=16, help="query rows of the entropy subsample (default 16)")
    c.add_argument("--validate", type=int, default=0, help="also sample N reuse runs to the end and correlate labels with the final error")
    c.add_argument("--out", default="traces.npz", help="traces file (default traces.npz)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    c.set_defaults(func=cmd_policy_collect)
    t = psub.add_parser("train", help="train the policy MLP on traces; writes .safetensors and a .json report")
    t.add_argument("--traces", required=True, help="a file written by `dqar policy collect`")
    t.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden layer widths (default 64 64)")
    t.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    t.add_argument("--holdout", type=float, default=0.2, help="fraction of generations held out (default 0.2)")
    t.add_argument("--seed", type=int, default=0, help="split and initialization seed (default 0)")
    t.add_argument("--out", default="policy.safetensors", help="checkpoint (default policy.safetensors; report next to it)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    t.set_defaults(func=cmd_policy_train)
    d = psub.add_parser("distill", help="freeze a policy's decisions on a few samples into a plan JSON (no host syncs)")
    _model_args(d)
    d.add_argument("--policy", default=None, help="policy checkpoint (or policy = ... in the --config file)")
    d.add_argument("--threshold", type=float, default=None, help="policy_threshold (default: the config's)")
    d.add_argument("--budget", type=float, default=None, help="policy_budget (default: the config's)")
    d.add_argument("--classes", nargs="+", default=None, help="class ids or names cycled over the samples (default: all classes)")
    d.add_argument("--samples", type=int, default=10, help="samples the decisions are taken on (default 10)")
    _sampling_args(d)
    d.add_argument("--out", default="plan.json", help="plan JSON (default plan.json)")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_policy_distill)
    from dqar.studies.policy_eval import add_arguments

    e = psub.add_parser("evaluate", help="policy vs gate vs calibrated plan vs static schedules at matched reuse -> docs/FIDELITY.md")
    add_arguments(e)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 on a busy machine)")
    e.set_defaults(func=cmd_policy_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dqar", description="Dynamic and Quantization-Aware Attention Reuse for DiT sampling")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _sample_parser(sub)
    _bench_parser(sub)
    _fid_sample_parser(sub)
    _fid_parser(sub)
    _ablate_parser(sub)
    _compared_parser(sub)
    _calibrate_parser(sub)
    _fidelity_parser(sub)
    _policy_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that save results
    try:
        return args.func(args)
    except DqarError as exc:
        sys.stderr.write(f"dqar {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"dqar {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
