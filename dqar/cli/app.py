"""`dqar` command line: a thin layer over the library. Bad input → one line on stderr, exit code 2.

The commands live by concept: `sampling` (sample, fid-sample, fid), `studies` (bench, ablate, compared),
`fidelity` (the fidelity sections), `tuning` (calibrate, policy); `common` holds the shared flags and the checks each command runs
before any work.
"""
from __future__ import annotations

import argparse
import sys

from dqar.cli import fidelity, sampling, smoke, studies, tuning
from dqar.cli.common import EXIT_USAGE, Parser
from dqar.errors import DqarError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dqar", description="Dynamic and Quantization-Aware Attention Reuse for DiT sampling")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sampling.sample_parser(sub)
    studies.bench_parser(sub)
    sampling.fid_sample_parser(sub)
    sampling.fid_parser(sub)
    studies.ablate_parser(sub)
    studies.compared_parser(sub)
    tuning.calibrate_parser(sub)
    fidelity.fidelity_parser(sub)
    tuning.policy_parser(sub)
    smoke.smoke_parser(sub)
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
