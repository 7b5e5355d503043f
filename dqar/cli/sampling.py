"""`dqar sample`, `dqar fid-sample`, `dqar fid`: generate images with reuse, and score sample files."""
from __future__ import annotations

import time
from pathlib import Path

from dqar.cli.common import class_labels, load, model_args, quiet_arg, run_config, sampling_args, writable_file, writable_folder
from dqar.errors import DqarError


def refuse_flow(args) -> None:
    """`--sampler flow` (or `sampler = "flow"` in --config): flow matching needs a Flux or SD3 transformer; these commands load DiTs."""
    sampler = getattr(args, "sampler", None)
    if sampler is None and getattr(args, "config", None):
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            sampler = tomllib.loads(Path(args.config).read_text()).get("sample", {}).get("sampler")
        except (OSError, ValueError, AttributeError):
            return  # run_config reports an unreadable or malformed file
    if sampler == "flow":
        raise DqarError("flow matching needs a flow-matching transformer (Flux, SD3); this command samples class-conditional DiTs",
                        "use --sampler ddim or dpm, or dqar.sampling.sample_flow with a Flux or SD3 transformer (docs/SAMPLING.md)")


def cmd_sample(args) -> int:
    from dqar.generate import generate
    from dqar.images import save_samples
    from dqar.io import atomic_write_json

    refuse_flow(args)
    run = run_config(args)
    out = writable_folder(args.out)
    loaded = load(args)
    labels = class_labels(args.classes, loaded)
    start = time.perf_counter()
    gen = generate(loaded, labels, run, executor=args.executor, progress=not args.quiet)
    seconds = time.perf_counter() - start
    save_samples(gen.output.images, labels, out, scale=1 if gen.output.images.shape[-1] >= 128 else 4)
    record = {"model": loaded.name, "family": loaded.family, "labels": labels, "config": run.to_dict(), "seconds": seconds, "executor": gen.executor,
              "stats": gen.stats.to_dict() if gen.stats else None}
    atomic_write_json(out / "stats.json", record)
    reuse = f", reuse {100 * gen.stats.reuse_fraction:.1f}% on the {gen.executor} executor" if gen.stats else ", no reuse"
    print(f"wrote {len(labels)} samples to {out} in {seconds:.1f}s{reuse}")
    return 0


def sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="generate class-conditional samples with reuse")
    model_args(p)
    p.add_argument("--classes", nargs="+", default=None, help="class ids or names (default: one per class, or 8 ImageNet classes)")
    sampling_args(p)
    p.add_argument("--out", default="results/sample", help="output folder")
    executor_arg(p)
    quiet_arg(p)
    p.set_defaults(func=cmd_sample)


def executor_arg(p) -> None:
    from dqar.engine.api import EXECUTOR_CHOICES

    p.add_argument("--executor", default="auto", choices=EXECUTOR_CHOICES,
                   help="auto (default: graph on CUDA where it runs the config, else patch; not graph on a CPU, where it "
                        "compiles for 30-150 s per configuration), patch (every option), fused / compiled (pure DiT block "
                        "functions), graph (one compiled graph per plan row and CFG share; plans only)")


def cmd_fid_sample(args) -> int:
    from dqar.studies.scale.distributed import FidSampleJob, run_job

    refuse_flow(args)
    job = FidSampleJob(out=Path(args.out), num_samples=args.num_samples, batch_size=args.batch_size, run=run_config(args),
                       model=args.model, classes=tuple(args.classes) if args.classes else None, device=args.device,
                       dtype=args.dtype, keep_shards=args.keep_shards, progress=not args.quiet, executor=args.executor)
    start = time.perf_counter()
    record = run_job(job)
    if record:  # rank 0
        drawn = f", drawn on the {record['rank0_executor']} executor" if record["rank0_executor"] else ""
        print(f"wrote {record['num_samples']} samples {tuple(record['image_shape'])} to {args.out} "
              f"with {record['world_size']} rank(s) in {time.perf_counter() - start:.1f}s "
              f"({record['rank0_resumed']} of rank 0's {record['rank0_batches']} batches resumed{drawn})")
    return 0


def fid_sample_parser(sub) -> None:
    p = sub.add_parser("fid-sample", help="generate N samples into one .npz for FID (shards over torchrun ranks)",
                       description="Run under `torchrun --nproc_per_node=N -m dqar.cli fid-sample ...` to shard; "
                                   "sample i has label classes[i % len(classes)] and seed seed + i.")
    model_args(p)
    p.add_argument("--num-samples", type=int, required=True, help="N (50000 for the standard FID protocol)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per batch on each rank (default 32)")
    p.add_argument("--classes", nargs="+", default=None, help="class ids or names cycled over indices (default: all classes)")
    sampling_args(p)
    p.add_argument("--out", required=True, help="merged .npz (arr_0 uint8 (N, H, W, C), labels); parts in <out>.shards/")
    p.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after merging")
    executor_arg(p)
    quiet_arg(p)
    p.set_defaults(func=cmd_fid_sample)


def cmd_fid(args) -> int:
    from dqar.device import resolve_device
    from dqar.io import atomic_write_json
    from dqar.studies.scale.fid import fid_embedded, fid_inception

    if not args.embedded and args.ref is None:
        raise DqarError("--ref is required without --embedded", "pass an .npz with mu and sigma (ADM's reference batch)")
    if args.json_out:
        writable_file(args.json_out)
    device = resolve_device(args.device)
    if args.embedded:
        result = fid_embedded(args.samples, args.ref, device=device, batch_size=args.batch_size)
    else:
        result = fid_inception(args.samples, args.ref, args.inception, device=device, batch_size=args.batch_size)
    if args.json_out:
        atomic_write_json(Path(args.json_out), result.to_dict())
    accuracy = f", class accuracy {result.class_accuracy:.3f}" if result.class_accuracy is not None else ""
    print(f"FID {result.fid:.4f} ({result.features}, {result.num_samples} samples vs {result.reference}{accuracy})")
    return 0


def fid_parser(sub) -> None:
    p = sub.add_parser("fid", help="score a samples .npz: Inception FID against reference statistics, or --embedded")
    p.add_argument("--samples", required=True, help=".npz with arr_0 uint8 (N, H, W, C)")
    p.add_argument("--ref", default=None, help=".npz with mu and sigma (ADM's reference batch); with --embedded default: shipped stats")
    p.add_argument("--inception", default=None, help="TorchScript inception-2015-12-05.pt (runs code from the file: trusted files only)")
    p.add_argument("--embedded", action="store_true", help="embedded-model samples: FD of the embedded classifier's features (offline)")
    p.add_argument("--batch-size", type=int, default=100, help="feature batch size (default 100)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json-out", default=None, help="also write the score as JSON here")
    p.set_defaults(func=cmd_fid)

