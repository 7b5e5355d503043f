"""Python API: `handle = dqar.enable(pipe_or_transformer, config)`, `handle.stats`, `handle.disable()`."""
from __future__ import annotations

import math
from typing import Any

import torch

from dqar.engine.adapter import check_family, describe
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.engine.decider import Decider, DeciderContext, PlanDecider
from dqar.engine.flow_compiled import FlowCompiledEngine
from dqar.engine.fused import check_supported
from dqar.engine.gate import GateDecider
from dqar.engine.graph import GraphEngine, check_graph_supported, pattern_counts
from dqar.engine.policy import PolicyDecider
from dqar.errors import DqarError
from dqar.engine.plan import Plan, load_plan, stream_layout
from dqar.engine.executors import EXECUTORS
from dqar.engine.reuse import ReuseEngine
from dqar.engine.stats import ReuseStats
from dqar.engine.verify import VerifyDecider
from dqar.engine.verify_rows import SampleVerifyDecider

ALL_EXECUTORS = tuple(EXECUTORS)  # "graph": GraphEngine; "flow_compiled": FlowCompiledEngine; the others ReuseEngine
EXECUTOR_CHOICES = ("auto", *ALL_EXECUTORS)  # "auto" (the default): resolve_executor picks graph or patch


def make_decider(cfg: ReuseConfig, key: dict[str, Any] | None = None, plan: Plan | None = None) -> Decider:
    """The decider a config asks for: the verifying decider (`decider = "verify"`), a learned policy, the online gate
    (`gate = true`), else a plan (schedule, file or given)."""
    if cfg.decider == "verify" and plan is None:
        return SampleVerifyDecider(cfg) if cfg.verify_per_sample else VerifyDecider(cfg)
    if cfg.policy and plan is None:
        return PolicyDecider(cfg, key)
    if cfg.gate and plan is None:
        return GateDecider(cfg)
    return PlanDecider(cfg, key, plan)


def _resolve_config(config: ReuseConfig | RunConfig | str | None) -> ReuseConfig:
    if config is None:
        return preset("full_dqar")
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, RunConfig):
        return config.reuse
    if isinstance(config, ReuseConfig):
        return config
    raise DqarError(f"cannot use a {type(config).__name__} as a reuse config", "pass a preset name, ReuseConfig or RunConfig")


def _split(model: Any) -> tuple[torch.nn.Module, Any]:
    """(transformer, scheduler or None) from a pipeline or a bare transformer."""
    if hasattr(model, "transformer") and hasattr(model, "scheduler"):
        return model.transformer, model.scheduler
    if isinstance(model, torch.nn.Module):
        return model, None
    raise DqarError(f"cannot enable reuse on a {type(model).__name__}", "pass a diffusers pipeline or its transformer (DiT, PixArt, SD3, Flux, …)")


def on_cuda(transformer: torch.nn.Module) -> bool:
    """Whether the model's parameters are on a CUDA device (where "auto" may pick the graph executor)."""
    param = next(transformer.parameters(), None)
    return param is not None and param.device.type == "cuda"


def plan_patterns(transformer: torch.nn.Module, cfg: ReuseConfig, decider, steps: int) -> tuple[int, int] | None:
    """(distinct (row, CFG share) patterns, evaluations) of the decider's plan, CFG batches assumed; None: rows not known ahead.

    The evaluation count is only known at begin_generation, so this plans at a representative one: a given plan's or
    plan file's own length, else `steps` (the run config's sample steps, one evaluation each). `bound_patterns` applies
    as in `build_plan`.
    """
    if not isinstance(decider, PlanDecider):
        return None
    try:
        evaluations = decider.fixed.num_evaluations if decider.fixed else load_plan(cfg.plan_file).num_evaluations if cfg.plan_file else steps
        decider.begin(DeciderContext(evaluations, len(describe(transformer).blocks)))
    except DqarError:
        return None  # a plan that does not fit fails at begin_generation with its own message
    share_from = math.ceil(cfg.cfg_share_from * evaluations) if cfg.enabled and cfg.cfg_share != "none" else -1
    return len(pattern_counts(decider._rows, lambda e: cfg.cfg_share if 0 <= share_from <= e else "none")), evaluations


def compiled_takes(cfg: ReuseConfig, decider, transformer: torch.nn.Module) -> bool:
    """Whether the compiled executor runs the config and decider (what `ReuseEngine` checks for it)."""
    needs = getattr(decider, "needs", None)
    if needs is not None and needs.any or cfg.cfg_share != "none":
        return False
    try:
        layout = describe(transformer)
        check_family(layout, cfg, needs, "compiled")
        check_supported(cfg, list(layout.blocks))
    except DqarError:
        return False
    return True


def resolve_executor(transformer: torch.nn.Module, cfg: ReuseConfig, decider, steps: int | None = None) -> tuple[str, str]:
    """What "auto" runs, with the reason: "graph" on CUDA where the graph executor supports the config and decider and the
    plan's patterns fit `max_patterns` (else per-block fallbacks would storm: "compiled" where it runs), else "patch".

    Not "graph" on the CPU: there it compiles for 30-150 s per configuration (docs/BENCHMARKS.md, "Graph executor"); nor
    "flow_compiled", asked for by name: faster per generation, after a first generation that compiles (docs/BENCHMARKS.md).
    """
    if not on_cuda(transformer):
        return "patch", "patch: not on CUDA"
    if getattr(decider, "verifies", False) and compiled_takes(cfg, decider, transformer):  # graph's split: not run on CUDA yet
        return "compiled", "compiled: the verifying decider's two graphs per evaluation (graph) are not measured on CUDA"
    try:
        check_graph_supported(cfg, decider, transformer)
    except DqarError as exc:
        return "patch", f"patch: {exc.problem}"
    counted = plan_patterns(transformer, cfg, decider, steps or SampleConfig().steps)
    if counted is None:
        return "graph", f"graph: the decider's rows are not known ahead; at most max_patterns {cfg.max_patterns} get a graph"
    patterns, evaluations = counted
    if patterns <= cfg.max_patterns:
        return "graph", f"graph: {patterns} patterns fit max_patterns {cfg.max_patterns}"
    source = "the given plan" if decider.fixed else f"plan file {cfg.plan_file}" if cfg.plan_file else f"schedule {cfg.schedule!r}'s plan"
    why = (f"{source} has {patterns} distinct patterns over {evaluations} evaluations, above max_patterns "
           f"{cfg.max_patterns} (set bound_patterns = true)")
    return ("compiled", f"compiled: {why}") if compiled_takes(cfg, decider, transformer) else ("patch", f"patch: {why}")


class ReuseHandle:
    """A live attachment. Inside a stock `DiTPipeline` call, each new `set_timesteps` starts a fresh generation."""

    def __init__(self, model: Any, config: ReuseConfig | RunConfig | str | None = None, *, plan: Plan | None = None, decider=None,
                 key: dict | None = None, executor: str = "auto"):
        transformer, scheduler = _split(model)
        steps = config.sample.steps if isinstance(config, RunConfig) else None
        self.config = _resolve_config(config)
        if executor not in EXECUTOR_CHOICES:
            raise DqarError(f"unknown executor '{executor}'", f"choose one of: {', '.join(EXECUTOR_CHOICES)}")
        if self.config.enabled and self.config.plan_file and plan is None and decider is None:
            # a plan file is read at the first generation: refuse one made for another stream layout before attaching anything
            load_plan(self.config.plan_file).check_streams(stream_layout(transformer), model=type(transformer).__name__)
        decider = decider or make_decider(self.config, key, plan)
        self.executor_reason = f"{executor}: asked for"  # why this executor runs (a short sentence)
        if executor == "auto":
            executor, self.executor_reason = resolve_executor(transformer, self.config, decider, steps)
        if executor == "graph":
            self._engine = GraphEngine(transformer, self.config, decider, scheduler)
        elif executor == "flow_compiled":
            self._engine = FlowCompiledEngine(transformer, self.config, decider, scheduler)
        else:
            self._engine = ReuseEngine(transformer, self.config, decider, scheduler, executor)

    # sampler hook contract ----------------------------------------------------------------
    def begin_generation(self, num_evaluations: int | None = None, scheduler: Any = None, guided: bool | None = None) -> None:
        """Start a generation; with only a scheduler, its `timesteps` give the number of evaluations.

        `guided`: whether each forward batches [conditional; unconditional] rows (None: the engine looks once).
        """
        if num_evaluations is None:
            if scheduler is None or getattr(scheduler, "timesteps", None) is None:
                raise DqarError("begin_generation needs num_evaluations or a scheduler with timesteps set", "pass num_evaluations=steps")
            num_evaluations = len(scheduler.timesteps)
        self._engine.begin_generation(num_evaluations, scheduler, guided)

    def end_generation(self) -> ReuseStats | None:
        return self._engine.end_generation()

    # user surface --------------------------------------------------------------------------
    @property
    def stats(self) -> ReuseStats | None:
        """Stats of the last finished generation, computed once (or what ran so far of the one in progress)."""
        return self._engine.stats

    @property
    def plan(self) -> Plan | None:
        """The plan of the current generation, when decisions come from a plan."""
        return getattr(self._engine.decider, "plan", None)

    @property
    def executor(self) -> str:
        """The executor running this handle ("auto" resolved): "patch", "fused", "compiled" or "graph"."""
        return self._engine.executor

    @property
    def engine(self) -> ReuseEngine:
        return self._engine

    def disable(self) -> None:
        """Detach: the model computes exactly as before."""
        self._engine.detach()

    def __enter__(self) -> "ReuseHandle":
        return self

    def __exit__(self, *exc) -> None:
        if self._engine.attached:
            self.disable()


def enable(model: Any, config: ReuseConfig | RunConfig | str | None = None, *, executor: str = "auto", decider: Decider | None = None,
           plan: Plan | None = None, key: dict | None = None) -> ReuseHandle:
    """Attach reuse to a diffusers pipeline or transformer; default config is the `full_dqar` preset.

    Any transformer whose blocks diffusers' `TransformerBlockRegistry` describes: DiT, PixArt-α / Σ, SD3 / 3.5, Flux.1,
    Wan, … (`dqar.engine.adapter`); others are refused here, in one line. Inside a stock pipeline each call is a new
    generation, and CFG run as separate forwards (`cache_context("cond" / "uncond")`) keeps one history per branch.

    `executor="auto"` (default): "graph" when a DiT is on CUDA and the graph executor runs the config and decider,
    else "compiled" or "patch" (`resolve_executor`; `handle.executor` and `handle.executor_reason` say which and why).
    `"patch"` wraps each block's attention (or the block) and runs every family; `"fused"` runs DiT blocks as pure
    functions with the decision outside; `"compiled"` additionally compiles them with `torch.compile`; `"graph"` runs
    a whole DiT evaluation as one compiled graph per distinct (plan row, CFG share) pattern (CUDA graphs on CUDA).
    `decider`: decisions other than the config's (a plan, the gate, a policy); `plan`: a fixed `Plan` to follow;
    `key`: what a plan or policy is for (model, sampler, steps), checked against what it was made for.
    """
    return ReuseHandle(model, config, executor=executor, decider=decider, plan=plan, key=key)
