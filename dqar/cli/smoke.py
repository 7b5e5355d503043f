"""`dqar smoke`: the fail-fast stage 0 of a GPU session (dqar.studies.bench.smoke); exit 1 on any FAIL, 2 on bad input."""
from __future__ import annotations

import shlex
import sys

from dqar.cli.common import at_least, device_dtype, model_args, writable_folder

EXIT_FAIL = 1


def cmd_smoke(args) -> int:
    from dqar import models
    from dqar.io import atomic_write_json
    from dqar.studies.bench.smoke import SmokeSettings, run_smoke

    at_least("--steps", args.steps, 1)
    at_least("--batch", args.batch, 1)
    settings = SmokeSettings(steps=args.steps, batch=args.batch, **({"cases": tuple(args.cases)} if args.cases else {}))
    out = writable_folder(args.out)
    device, dtype = device_dtype(args)
    if args.model in models.RANDOM_DIT_XL2:  # as dqar bench: DiT-XL/2 shapes with random weights; no VAE: the checks read
        # the latents, and a decode in every generation would dilute time_follows_work's comparison of transformer work
        loaded = models.random_dit_xl2(device, dtype, with_vae=False, resolution=models.RANDOM_DIT_XL2[args.model])
    else:
        loaded = models.load_model(args.model, device=device, dtype=dtype)
    command = shlex.join(["dqar", *args.argv])

    def write(result: dict) -> None:  # after every case, atomically: a killed smoke keeps what it saw
        atomic_write_json(out / "smoke.json", result | {"command": command})

    result = run_smoke(loaded, device, settings, log=lambda line: print(line, flush=True), on_update=write)
    write(result)
    verdict = "PASS" if result["passed"] else "FAIL"
    print(f"smoke {verdict}: {len(result['cases'])} cases on {result['device']} ({result['dtype']}); {out / 'smoke.json'}")
    if not result["passed"]:
        sys.stderr.write("dqar smoke: a check failed (FAIL above): the graph executor is broken here, stop before the bench stages\n")
    return 0 if result["passed"] else EXIT_FAIL


def smoke_parser(sub) -> None:
    p = sub.add_parser("smoke", help="fail fast: 8 steps, batch 2, noreuse_graph and full_dqar_graph against the patch executor; "
                                     "PASS/FAIL on CUDA-graph capture, recompiles, equality, host syncs and time against "
                                     "the skipped work (exit 1 on a FAIL)",
                       description="--model also takes random-dit-xl2 and random-dit-xl2-512 (DiT-XL/2 shapes, random weights, as "
                                   "dqar bench); $DQAR_COMPILE_CACHE names a compile-cache file loaded first and saved after every case")
    model_args(p)
    p.add_argument("--steps", type=int, default=8, help="DDIM steps (default 8: full_dqar's forecasts then read a full history)")
    p.add_argument("--batch", type=int, default=2, help="images per generation (default 2)")
    p.add_argument("--cases", nargs="+", default=None, help="graph cases of dqar bench (default noreuse_graph full_dqar_graph)")
    p.add_argument("--out", default="results/smoke", help="output folder for smoke.json (default results/smoke)")
    p.set_defaults(func=cmd_smoke)
