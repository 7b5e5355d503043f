"""`dqar` command line: a thin layer over the library. Bad input → one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from .errors import DqarError

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
    from .config import RunConfig, load_toml, preset

    run = load_toml(args.config) if args.config else RunConfig()
    if args.preset:
        run = replace(run, reuse=preset(args.preset))
    flags = {k: getattr(args, k) for k in ("steps", "cfg", "sampler", "seed", "eta") if getattr(args, k, None) is not None}
    if flags:
        from .config import SampleConfig, build

        run = replace(run, sample=build(SampleConfig, {**run.sample.__dict__, **flags}, "sample"))
    return run


def cmd_sample(args) -> int:
    from .device import resolve_device, resolve_dtype
    from .generate import generate
    from .images import save_samples
    from .io import atomic_write_json
    from .labels import default_labels, parse_labels
    from .models import load_model

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
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 4.0)")
    p.add_argument("--sampler", default=None, help="ddim | dpm (default ddim)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0)")
    p.add_argument("--seed", type=int, default=None, help="base seed; sample i uses seed + i (default 42)")
    p.add_argument("--preset", default=None, help="baseline | scheduling_only | quant_cache_only | full_dqar")
    p.add_argument("--config", default=None, help="TOML file with [reuse] and [sample] tables")
    p.add_argument("--out", default="results/sample", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dqar", description="Dynamic and Quantization-Aware Attention Reuse for DiT sampling")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _sample_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
