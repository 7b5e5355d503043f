"""Python API: `handle = dqar.enable(pipe_or_transformer, config)`, `handle.stats`, `handle.disable()`."""
from __future__ import annotations

from typing import Any

import torch

from dqar.engine.config import ReuseConfig, RunConfig, preset
from dqar.engine.decider import Decider, PlanDecider
from dqar.engine.gate import GateDecider
from dqar.engine.graph import GraphEngine, check_graph_supported
from dqar.engine.policy import PolicyDecider
from dqar.errors import DqarError
from dqar.engine.plan import Plan
from dqar.engine.reuse import EXECUTORS, ReuseEngine
from dqar.engine.stats import ReuseStats

ALL_EXECUTORS = (*EXECUTORS, "graph")  # "graph": dqar.engine.graph.GraphEngine
EXECUTOR_CHOICES = ("auto", *ALL_EXECUTORS)  # "auto" (the default): resolve_executor picks graph or patch


def make_decider(cfg: ReuseConfig, key: dict[str, Any] | None = None, plan: Plan | None = None) -> Decider:
    """The decider a config asks for: a learned policy, the online gate (`gate = true`), else a plan (schedule, file or given)."""
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
    raise DqarError(f"cannot enable reuse on a {type(model).__name__}", "pass a diffusers DiTPipeline or DiTTransformer2DModel")


def on_cuda(transformer: torch.nn.Module) -> bool:
    """Whether the model's parameters are on a CUDA device (where "auto" may pick the graph executor)."""
    param = next(transformer.parameters(), None)
    return param is not None and param.device.type == "cuda"


def resolve_executor(transformer: torch.nn.Module, cfg: ReuseConfig, decider) -> str:
    """What "auto" runs: "graph" on CUDA where the graph executor supports the config and decider, else "patch".

    Not "graph" on the CPU: there it compiles for 30-150 s per configuration (docs/BENCHMARKS.md, "Graph executor").
    """
    if not on_cuda(transformer):
        return "patch"
    try:
        check_graph_supported(cfg, decider, transformer)
    except DqarError:
        return "patch"
    return "graph"


class ReuseHandle:
    """A live attachment. Inside a stock `DiTPipeline` call, each new `set_timesteps` starts a fresh generation."""

    def __init__(self, model: Any, config: ReuseConfig | RunConfig | str | None = None, *, plan: Plan | None = None, decider=None,
                 key: dict | None = None, executor: str = "auto"):
        transformer, scheduler = _split(model)
        self.config = _resolve_config(config)
        if executor not in EXECUTOR_CHOICES:
            raise DqarError(f"unknown executor '{executor}'", f"choose one of: {', '.join(EXECUTOR_CHOICES)}")
        decider = decider or make_decider(self.config, key, plan)
        if executor == "auto":
            executor = resolve_executor(transformer, self.config, decider)
        if executor == "graph":
            self._engine = GraphEngine(transformer, self.config, decider, scheduler)
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


def enable(model: Any, config: ReuseConfig | RunConfig | str | None = None, **kwargs) -> ReuseHandle:
    """Attach reuse to a `DiTPipeline` or `DiTTransformer2DModel`; default config is the `full_dqar` preset.

    `executor="auto"` (default): "graph" when the model is on CUDA and the graph executor runs the config
    and decider, else "patch" (`resolve_executor`; `handle.executor` says which). `"patch"` wraps each
    block's `attn1` (or the block) and works with every option; `"fused"` runs DiT blocks as pure
    functions with the decision outside; `"compiled"` additionally compiles them with `torch.compile` —
    a bounded set of graphs shared by all blocks and evaluations; `"graph"` runs a whole evaluation as
    one compiled graph per distinct (plan row, CFG share) pattern (CUDA graphs on CUDA).
    """
    return ReuseHandle(model, config, **kwargs)
