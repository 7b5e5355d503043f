"""The bench's cases: how one row runs (the stock model eager or compiled, dqar on an executor, a peer) and the
verifying decider's rows beside the static plan of its own executed decisions (`adaptive_rows`)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.engine.plan import Plan
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.labels import cycle_labels
from dqar.sampling import make_scheduler
from dqar.studies.ablation.blocks import timed_run
from dqar.studies.bench.family import compiled_twin, family, refusal, stock_supported
from dqar.studies.bench.peers import EAGER_TWIN, PeerCase, flow_peer_refusal
from dqar.tuning.distill import executed_plan
from dqar.tuning.verify_tau import calibrate_tau

COMPILE_SETTING = "torch.compile (default mode, static shapes)"
CUDAGRAPHS_SETTING = "torch.compile (mode reduce-overhead: CUDA graphs, static shapes)"


@dataclass
class Case:
    """One bench case: a generation closure, how it ran, and the stats of its last run (None without dqar)."""

    run: Callable[[], Any]
    setting: Callable[[], str]
    stats: Callable[[], Any] = lambda: None
    refused: str | None = None  # why the row does not apply to this model (its executor or peer refuses it): not timed


@dataclass
class Batch:
    """What the cases of one batch size share: the model, the labels, the settings and the distilled plans."""

    loaded: Any
    labels: list[int]
    s: Any  # BenchSettings
    plans: dict = field(default_factory=dict)

    def config(self, name: str, per_sample: bool = False) -> ReuseConfig:
        """Preset `name` (`per_sample`: a verifying-decider preset with `verify_per_sample`); a verifying-decider preset with
        `s.verify_target` set gets its τ scaled (`verify_scale`) by `calibrate_tau` to skip that share of the FLOPs on
        this batch's labels, seeds offset by 1000 (once per batch and form)."""
        cfg = replace(preset(name), verify_per_sample=True) if per_sample else preset(name)
        if cfg.decider != "verify" or self.s.verify_target is None:
            return cfg
        key = ("tau", name, per_sample)
        if key not in self.plans:
            self.plans[key] = calibrate_tau(self.loaded, [self.labels], run_config(self.s, cfg), self.s.verify_target)
        return self.plans[key].config

    def note(self, name: str, per_sample: bool = False) -> str:
        """How a verifying-decider row's τ was set, for its setting ("" for the preset's own τ)."""
        cal = self.plans.get(("tau", name, per_sample))
        form = ", per-sample refresh (the batch split after the probe block)" if per_sample else ""
        if cal is None:
            return form
        return form + f", τ × {cal.scale:.3g} (calibrated to skip {cal.target:.0%} of the FLOPs; {cal.skipped:.1%} on the probe seeds)"

    def reuse(self, name: str) -> tuple[ReuseConfig, Plan | None]:
        """A preset for the compiled executors: a gate's decisions, taken once eagerly, frozen into a plan (zero syncs)."""
        cfg = self.config(name)
        if not cfg.gate:
            return cfg, None
        if name not in self.plans:
            self.plans[name] = executed_plan(self.loaded, self.labels, run_config(self.s, cfg))
        return replace(cfg, gate=False), self.plans[name]


def labels_for(loaded, batch: int) -> list[int]:
    return cycle_labels(loaded.num_classes, batch, stride=7)


def run_config(s, cfg: ReuseConfig) -> RunConfig:
    return timed_run(RunConfig(reuse=cfg, sample=SampleConfig(steps=s.steps, cfg=s.cfg, sampler="ddim", seed=s.seed)))


def dqar_case(b: Batch, cfg: ReuseConfig, executor: str, plan: Plan | None = None,
              how: str = "the gate's decisions frozen into a plan", note: str = "") -> Case:
    """dqar attached on `executor` (patch, compiled, graph) under `cfg`; the setting names the executor that ran."""
    why = refusal(b.loaded, cfg, executor)
    if why:
        return refused_case(why)
    run = run_config(b.s, cfg)
    last = []

    def one():
        gen = generate(b.loaded, b.labels, run, executor=executor, plan=plan)
        last[:] = [gen]
        return gen

    planned = (f", {how}" if plan is not None else "") + note

    def setting() -> str:  # the executor that ran (the engine's own word), not the one asked for
        ran = last[0].executor if last else executor
        return f"dqar executor {ran}{planned}" if ran else "nothing of dqar attached (reuse off on the patch executor)"

    return Case(one, setting, lambda: last[0].stats if last else None)


def refused_case(why: str) -> Case:
    def run():
        raise DqarError(why, "the row is not timed")

    return Case(run, lambda: why, refused=why)


def pipeline_case(loaded, labels, s, transformer) -> Callable:
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=transformer, vae=loaded.vae, scheduler=make_scheduler("ddim", loaded.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: [torch.Generator().manual_seed(s.seed + i) for i in range(len(labels))]  # noqa: E731
    return lambda: pipe(labels, num_inference_steps=s.steps, guidance_scale=s.cfg, generator=gen(), output_type="pt")


def stock_case(b: Batch, mode: str | None) -> Case:
    """The stock model, nothing of dqar attached: diffusers' DiTPipeline where it runs the model, else dqar's no-reuse
    loop (bit-identical to it, tests/test_sampling.py); `mode`: the whole transformer under torch.compile in that mode."""
    compiled = compiled_transformer if family(b.loaded) == "dit" else compiled_twin  # a flow model keeps its class
    transformer = compiled(b.loaded.transformer, mode) if mode else b.loaded.transformer
    setting = {None: "eager", "default": COMPILE_SETTING, "reduce-overhead": CUDAGRAPHS_SETTING}[mode]
    if b.s.stock and stock_supported(b.loaded) is None:
        return Case(pipeline_case(b.loaded, b.labels, b.s, transformer), lambda: setting)
    model = replace(b.loaded, transformer=transformer)
    run = run_config(b.s, ReuseConfig(enabled=False))
    return Case(lambda: generate(model, b.labels, run), lambda: setting)


def peer_case(b: Batch, name: str, compile: bool = True) -> Case:
    """Peer `name` on its own copy of the transformer, under torch.compile when `compile` and the run compiles."""
    why = flow_peer_refusal(b.loaded) if family(b.loaded) != "dit" else None
    if why:
        return refused_case(why)
    peer = PeerCase(b.loaded, b.labels, run_config(b.s, ReuseConfig(enabled=False)), name, b.s.compile and compile)
    if b.s.compile and not compile:
        peer.setting = EAGER_TWIN
    return Case(peer, lambda: peer.setting)


@functools.lru_cache(maxsize=8)
def compiled_transformer(transformer, mode: str = "default"):
    """The whole transformer under torch.compile (static shapes); default mode: as dqar's compiled executor."""
    return torch.compile(transformer, mode=mode, dynamic=False)


def planned_case(b: Batch, name: str, executor: str, **change) -> Case:
    why = refusal(b.loaded, replace(preset(name), **change), executor)
    if why:  # before b.reuse: a gate preset would be traced on a model that refuses it
        return refused_case(why)
    cfg, plan = b.reuse(name)
    return dqar_case(b, replace(cfg, **change), executor, plan, note=b.note(name))




STATIC_OF_VERIFY = "the verifying decider's own executed decisions, frozen into a plan: the same FLOPs skipped, no probe check, no host reads"


def verify_static_case(b: Batch, name: str, executor: str) -> Case:
    """The static twin of a verifying-decider row: one untimed generation of preset `name` on `executor` (same labels,
    noise and steps as the timed rows), its executed reuse mask replayed as a fixed plan on the same executor. Its time
    against the live row is what the probe check and its one scalar read per deciding evaluation cost."""
    why = refusal(b.loaded, preset(name), executor)
    if why:
        return refused_case(why)
    cfg, key = b.config(name), ("verify_static", name, executor)
    if key not in b.plans:
        gen = generate(b.loaded, b.labels, run_config(b.s, cfg), executor=executor)
        b.plans[key] = Plan(mask=np.array(gen.stats.reuse_mask, dtype=bool))  # (E, L)
    return dqar_case(b, replace(cfg, decider="plan"), executor, b.plans[key], how=STATIC_OF_VERIFY, note=b.note(name))
