"""`dqar calibrate` and `dqar policy collect|train|distill|evaluate`: plans and the learned policy."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from dqar.cli.common import (Parser, at_least, check_reuse_files, class_labels, load, model_args, quiet_arg, run_config,
                             sampling_args, set_threads, threads_arg, writable_file, writable_folder)
from dqar.labels import cycle_labels


def cmd_calibrate(args) -> int:
    from dqar.engine.plan import save_plan
    from dqar.io import atomic_write_json
    from dqar.engine.config import with_overrides
    from dqar.tuning.calibrate import calibrate, check_goal

    set_threads(args.threads)
    run = run_config(args, check_files=False)  # checked below, after --forecast-order
    if args.forecast_order is not None:
        run = replace(run, reuse=with_overrides(run.reuse, forecast_order=args.forecast_order))
    check_reuse_files(run)
    at_least("--samples", args.samples, 1)
    at_least("--max-patterns", args.max_patterns, 1)
    check_goal(args.target, args.budget, run.reuse.max_staleness if args.max_staleness is None else args.max_staleness, args.structure,
               args.first_evaluation, args.max_patterns)
    writable_file(args.out)
    if args.trace:
        writable_file(args.trace)
    loaded = load(args)
    labels = cycle_labels(class_labels(args.classes, loaded), args.samples)
    cal = calibrate(loaded, labels, run, target_fraction=args.target, error_budget=args.budget,
                    max_staleness=args.max_staleness, first_evaluation=args.first_evaluation, structure=args.structure,
                    max_patterns=args.max_patterns, progress=not args.quiet)
    save_plan(cal.plan, args.out)
    if args.trace:
        atomic_write_json(Path(args.trace), {"key": cal.plan.key, "labels": labels, **cal.trace.to_dict()})
    bound = "" if args.max_patterns is None else f" (at most {args.max_patterns})"
    print(f"wrote plan {args.out} for {cal.plan.key}: reuse {100 * cal.plan.reuse_fraction:.1f}% "
          f"of {cal.plan.num_evaluations} evaluations x {cal.plan.num_layers} layers, {cal.plan.num_patterns} distinct rows{bound} "
          f"(use it with plan_file = \"{args.out}\" and "
          f"forecast_order = {run.reuse.forecast_order}, granularity = \"{run.reuse.granularity}\")")
    return 0


def calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="derive a reuse plan from one full-compute pass on a few samples",
                       description="Records per (evaluation, layer) the error of the reuse the engine would perform there "
                                   "(order 0: the relative change of the output; order 1/2: the error of the engine's forecast), "
                                   "its entropy and the SNR (Flux / SD3: the change measured by forward hooks per CFG branch, no entropy), "
                                   "then picks the cells (or per-layer refresh intervals) with the "
                                   "smallest estimated error. The plan is keyed by model, sampler, steps, granularity and forecast "
                                   "order: sample it with the same forecast_order. Sampling with it makes no host syncs.")
    model_args(p)
    p.add_argument("--classes", nargs="+", default=None, help="class ids or names cycled over the samples (default: all classes)")
    p.add_argument("--samples", type=int, default=8, help="calibration samples (default 8)")
    sampling_args(p)
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target", type=float, default=None, help="reuse fraction of all (evaluation, layer) cells, e.g. 0.5")
    goal.add_argument("--budget", type=float, default=None, help="largest estimated relative error of any reused cell, e.g. 0.1")
    p.add_argument("--max-staleness", type=int, default=None, help="longest reuse run (default: the config's max_staleness)")
    p.add_argument("--forecast-order", type=int, default=None,
                   help="0 copy | 1 linear | 2 quadratic: the reuse the plan is ranked for and must be run with (default: the config's)")
    p.add_argument("--structure", default="cells", help="cells (greedy per cell, default) | layers (one refresh interval per layer)")
    p.add_argument("--max-patterns", type=int, default=None,
                   help="at most N distinct plan rows (executor graph: one whole-model graph each, none falls back); "
                        "derived at a higher internal target so the bounded plan still reaches --target (default: unbounded)")
    p.add_argument("--first-evaluation", type=int, default=1, help="evaluations always computed at the start (default 1)")
    p.add_argument("--out", default="plan.json", help="plan JSON (default plan.json)")
    p.add_argument("--trace", default=None, help="also write the recorded signals as JSON here")
    quiet_arg(p)
    threads_arg(p)
    p.set_defaults(func=cmd_calibrate)


def cmd_policy_collect(args) -> int:
    from dqar.io import atomic_write_json
    from dqar.models import SAMPLE_DEFAULTS
    from dqar.tuning.collect import CollectSettings, ValidateSettings, collect_traces, granularity_for, save_traces, validate_proxy

    set_threads(args.threads)
    granularity = granularity_for(args.model, args.granularity)
    defaults = {"steps": 50, "cfg": 4.0, **SAMPLE_DEFAULTS.get(str(args.model), {})}
    settings = CollectSettings(generations=args.generations, batch=args.batch, seed=args.seed,
                               steps=defaults["steps"] if args.steps is None else args.steps,
                               cfg=defaults["cfg"] if args.cfg is None else args.cfg, sampler=args.sampler, max_age=args.max_age,
                               entropy_rows=args.entropy_rows, forecast_order=args.forecast_order, probe_feature=args.probe_feature,
                               granularity=granularity, forecast_kind=args.forecast_kind)
    at_least("--validate", args.validate, 0)
    validation = Path(writable_file(args.out)).with_suffix(".validation.json")
    loaded = load(args)
    start = time.perf_counter()
    traces = collect_traces(loaded, settings, progress=not args.quiet)
    save_traces(traces, args.out)
    print(f"wrote {len(traces)} rows from {settings.generations} generations to {args.out} in {time.perf_counter() - start:.0f}s")
    if args.validate:
        check = validate_proxy(loaded, settings, ValidateSettings(groups=args.validate), progress=not args.quiet)
        atomic_write_json(validation, check)
        print(f"label vs final-image error over {check['groups']} reuse runs: Spearman {check['spearman']:.3f} "
              f"(single cells {check['spearman_single_cells']}); wrote {validation}")
    return 0


def cmd_policy_train(args) -> int:
    import json

    from dqar.engine.policy_net import save_policy
    from dqar.io import atomic_write_json
    from dqar.tuning.collect import load_traces
    from dqar.tuning.train import TrainSettings, train_policy

    set_threads(args.threads)
    settings = TrainSettings(hidden=tuple(args.hidden), epochs=args.epochs, lr=args.lr, holdout=args.holdout, seed=args.seed)
    out = writable_file(args.out)
    traces = load_traces(args.traces)
    start = time.perf_counter()
    result = train_policy(traces, settings, progress=not args.quiet)
    report = {**result.report, "traces": str(args.traces), "seconds": time.perf_counter() - start}
    validation = Path(args.traces).with_suffix(".validation.json")
    if validation.is_file():
        report["label_validation"] = {k: v for k, v in json.loads(validation.read_text()).items() if k != "rows"}
    save_policy(result.checkpoint, out)
    atomic_write_json(out.with_suffix(".json"), report)
    h = report["heldout"]
    print(f"MLP with {report['parameters']} parameters; held-out ({len(report['split']['heldout_generations'])} generations): "
          f"Spearman {h['spearman']:.3f} (last change x age: {h['spearman_naive']:.3f}), R2 of log error {h['r2_log']:.3f}; "
          f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def cmd_policy_distill(args) -> int:
    from dqar.engine.config import with_overrides
    from dqar.engine.plan import save_plan
    from dqar.tuning.distill import check_distillable, distill_plan

    set_threads(args.threads)
    run = run_config(args, check_files=False)  # checked below, after --policy
    given = {k: v for k, v in (("policy", args.policy), ("policy_threshold", args.threshold), ("policy_budget", args.budget)) if v is not None}
    run = replace(run, reuse=with_overrides(run.reuse, **given))
    check_distillable(run)
    check_reuse_files(run)  # the --policy checkpoint
    _check_policy_for(run.reuse.policy, args.model)
    at_least("--samples", args.samples, 1)
    writable_file(args.out)
    loaded = load(args)
    plan = distill_plan(loaded, cycle_labels(class_labels(args.classes, loaded), args.samples), run, progress=not args.quiet)
    save_plan(plan, args.out)
    print(f"wrote plan {args.out}: reuse {100 * plan.reuse_fraction:.1f}% of {plan.num_evaluations} evaluations x "
          f"{plan.num_layers} layers, decided by {run.reuse.policy} at threshold {run.reuse.policy_threshold} "
          f"(use it with plan_file = \"{args.out}\": no host syncs)")
    return 0


def _check_policy_for(policy: str, model: str | None) -> None:
    """Before loading the model: the policy was trained for `model` (a policy names its model)."""
    from dqar.engine.policy_net import load_policy
    from dqar.tuning.train import check_trained_for

    check_trained_for(load_policy(policy).meta, model)


def cmd_policy_evaluate(args) -> int:
    from dqar.studies.fidelity.policy_eval import shipped_policy
    from dqar.studies.fidelity.policy_report import run_command

    set_threads(args.threads)
    writable_folder(args.out)
    _check_policy_for(args.policy or str(shipped_policy(args.model)), args.model)
    return run_command(args)  # checks its settings before it samples


def _collect_parser(psub) -> None:
    c = psub.add_parser("collect", help="full-compute generations -> features and measured reuse errors (.npz)")
    model_args(c)
    c.add_argument("--generations", type=int, default=64, help="generations; the held-out split is by generation (default 64)")
    c.add_argument("--batch", type=int, default=2, help="samples per generation (default 2)")
    c.add_argument("--seed", type=int, default=10_000, help="generation g, sample i uses seed + g * batch + i (default 10000)")
    c.add_argument("--steps", type=int, default=None, help="sampler steps (default 50; embedded-flux 28)")
    c.add_argument("--cfg", type=float, default=None, help="guidance scale (default 4.0)")
    c.add_argument("--sampler", default="ddim", help="ddim | dpm (default ddim)")
    c.add_argument("--max-age", type=int, default=3, help="largest reuse staleness labelled (default 3)")
    c.add_argument("--entropy-rows", type=int, default=16, help="query rows of the entropy subsample (default 16)")
    c.add_argument("--forecast-order", type=int, default=0,
                   help="the reuse labelled: 0 copy (default) | 1 linear | 2 quadratic forecast (kept in the traces' metadata)")
    c.add_argument("--granularity", default=None, choices=("attention", "block"),
                   help="attention: DiT attention labels and features (default on the DiT) | block: whole-block labels and the "
                        "model-agnostic BLOCK_FEATURES, on any family (default, and the only choice, on flow models)")
    c.add_argument("--forecast-kind", default="taylor", help="block granularity: the forecaster the labels measure, "
                   "taylor (default) | hermite | bdf2_heun (run the policy with the same forecast_kind)")
    c.add_argument("--probe-feature", action="store_true",
                   help="also record log_probe_error (the first layer's last change, what the verifying decider's probe sees); "
                        "`policy train` on these traces gives a policy that reads it (docs/POLICY.md: it fits better, samples worse)")
    c.add_argument("--validate", type=int, default=0, help="also sample N reuse runs to the end and correlate labels with the final error")
    c.add_argument("--out", default="traces.npz", help="traces file (default traces.npz)")
    quiet_arg(c, "no progress bars")
    threads_arg(c)
    c.set_defaults(func=cmd_policy_collect)


def _train_parser(psub) -> None:
    t = psub.add_parser("train", help="train the policy MLP on traces; writes .safetensors and a .json report")
    t.add_argument("--traces", required=True, help="a file written by `dqar policy collect`")
    t.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden layer widths (default 64 64)")
    t.add_argument("--epochs", type=int, default=30, help="epochs (default 30)")
    t.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    t.add_argument("--holdout", type=float, default=0.2, help="fraction of generations held out (default 0.2)")
    t.add_argument("--seed", type=int, default=0, help="split and initialization seed (default 0)")
    t.add_argument("--out", default="policy.safetensors", help="checkpoint (default policy.safetensors; report next to it)")
    quiet_arg(t)
    threads_arg(t)
    t.set_defaults(func=cmd_policy_train)


def _distill_parser(psub) -> None:
    d = psub.add_parser("distill", help="freeze a policy's decisions on a few samples into a plan JSON (no host syncs)")
    model_args(d)
    d.add_argument("--policy", default=None, help="policy checkpoint (or policy = ... in the --config file)")
    d.add_argument("--threshold", type=float, default=None, help="policy_threshold (default: the config's)")
    d.add_argument("--budget", type=float, default=None, help="policy_budget (default: the config's)")
    d.add_argument("--classes", nargs="+", default=None, help="class ids or names cycled over the samples (default: all classes)")
    d.add_argument("--samples", type=int, default=10, help="samples the decisions are taken on (default 10)")
    sampling_args(d)
    d.add_argument("--out", default="plan.json", help="plan JSON (default plan.json)")
    threads_arg(d)
    quiet_arg(d)
    d.set_defaults(func=cmd_policy_distill)


def _evaluate_parser(psub) -> None:
    from dqar.studies.fidelity.policy_report import add_arguments

    e = psub.add_parser("evaluate", help="policy vs gate vs calibrated plan vs static schedules at matched reuse -> docs/FIDELITY.md")
    add_arguments(e)
    threads_arg(e)
    e.set_defaults(func=cmd_policy_evaluate)


def policy_parser(sub) -> None:
    p = sub.add_parser("policy", help="the learned reuse policy: collect traces, train the MLP, evaluate it",
                       description="Use a trained policy with `policy = \"PATH\"` (and policy_threshold / policy_budget) in [reuse].")
    psub = p.add_subparsers(dest="policy_command", required=True, parser_class=Parser)
    _collect_parser(psub)
    _train_parser(psub)
    _distill_parser(psub)
    _evaluate_parser(psub)
