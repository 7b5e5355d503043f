"""The ablation's fidelity runs: after timing, the configurations a claim could rest on get the larger untimed run.

Which ones: the main configurations, then the recommendation's front and the configurations meeting the
target's speed side (dqar.reporting.findings.claim_candidates), at most FINALISTS beyond the main ones; or,
where the grid sets `fidelity_runs`, at most that many, the recommendation's front first. Chunk 0 of a run is
the timing batch: its warm-up images (same run, same executor) are reused, not generated again.
A fidelity run can move a configuration out of the fidelity bound, which changes the front, so the
choice is made again after every run until nothing new is needed. Each run replaces the record's
fidelity (and that of the records copying it), and the baseline of its sampling setting gets its own
run first; results are written after each. A study whose fidelity run is its timing batch has nothing to do.
"""
from __future__ import annotations

from typing import Callable

from dqar.engine.config import from_dict
from dqar.generate import generate
from dqar.reporting.findings import claim_candidates, is_baseline, is_peer, recommendation_front
from dqar.studies.ablation import fidelity as AF
from dqar.studies.ablation.blocks import COMPILED, timed_run
from dqar.studies.core import baseline_run

FINALISTS = 3  # fidelity runs beyond the main configurations


def verify(results: dict, ctx: dict, done: dict, write: Callable[[], None]) -> None:
    """Fidelity runs for the claim candidates of `results` (its records are `done`'s values), writing after each."""
    need, chunks = results["study"]["fidelity_samples"], ctx["chunks"]
    if chunks <= 1:
        return
    refs: dict = {}
    tried: set = set()
    cap = ctx.get("fidelity_runs")
    while True:
        ran = [r for r in done.values() if _has_run(r, need) and r.get("same_as") is None and not is_baseline(r)]
        todo = [r for r in claim_candidates(results) if not _has_run(r, need) and r["name"] not in tried]
        if cap is None:
            extra = sum(1 for r in ran if r["role"] != "main")
            todo = [r for r in todo if r["role"] == "main"] or todo[: max(0, FINALISTS - extra)]
        else:
            todo = front_first(todo, results)[: max(0, cap - len(ran))]
        if not todo:
            return
        tried.add(todo[0]["name"])
        _fidelity_run(todo[0], results, ctx, refs)
        write()


def front_first(todo: list[dict], results: dict) -> list[dict]:
    """`todo` with the recommendation's front (not yet verified members included) first, in the front's order."""
    cands = [r for r in results["records"] if not is_baseline(r) and not is_peer(r) and r.get("same_as") is None]
    front = [r for r in recommendation_front(results, cands, require_verified=False) if any(r is t for t in todo)]
    return front + [r for r in todo if all(r is not f for f in front)]


def _has_run(rec: dict, need: int) -> bool:
    return (rec["fidelity"].get("samples") or 0) >= need


def _images(rec: dict, run, ctx: dict):
    executor = rec["measurements"].get("executor")
    executor = executor if executor in COMPILED else "patch"  # the record's executor, not generate's default
    make = lambda r: generate(ctx["loaded"], ctx["labels"], timed_run(r), executor=executor)  # noqa: E731
    first = ctx["warm_images"].get(ctx["warm_key"](run, executor)) if "warm_images" in ctx else None
    bar = ctx["bars"]
    bar.start(f"fidelity {rec['name']}", ctx["chunks"])
    try:
        return AF.images_of(make, run, ctx["chunks"], len(ctx["labels"]), tick=bar.tick, first=first)
    finally:
        bar.close_inner()


def _reference(rec: dict, results: dict, ctx: dict, refs: dict):
    """The fidelity-run reference of `rec`: the baseline of its sampling setting on the executor its timing-batch images
    were paired with; the baseline record of that setting gets its fidelity from its own executor's run."""
    run = from_dict(rec["config"])
    m = rec["measurements"]
    key = (run.sample, m.get("reference_executor") or m.get("baseline_executor"))
    if key not in refs:
        base = next((r for r in results["records"] if is_baseline(r) and r["config"]["sample"] == rec["config"]["sample"]), None)
        images = _images({"measurements": {"executor": key[1]}, "name": f"baseline ({key[1]})"}, baseline_run(run), ctx)
        refs[key] = AF.reference(images, list(ctx["labels"]) * ctx["chunks"], ctx["evaluator"])
        if base is not None and base["measurements"]["executor"] == key[1]:
            _store(base, AF.fidelity(refs[key].images, refs[key]), results)
    return refs[key]


def _fidelity_run(rec: dict, results: dict, ctx: dict, refs: dict) -> None:
    ref = _reference(rec, results, ctx, refs)
    if is_baseline(rec):
        return  # its run is the reference's
    _store(rec, AF.fidelity(_images(rec, from_dict(rec["config"]), ctx), ref), results)


def _store(rec: dict, fidelity: dict, results: dict) -> None:
    """`fidelity` becomes the record's and that of every record copying it."""
    for r in results["records"]:
        if r is rec or r.get("same_as") == rec["name"]:
            r["fidelity"] = fidelity
