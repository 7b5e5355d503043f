"""What each executor is: the capabilities the engine checks at enable, instead of flags on engine classes.

"patch" hooks each block's attention (or the block) and runs every option on every family; "fused" and
"compiled" replace DiT blocks by pure block functions (`dqar.engine.fused`, compiled or not); "graph"
runs a whole DiT evaluation as one compiled graph per pattern (`dqar.engine.graph`), over its own static
history, so it builds no per-block kernels. "flow_compiled" keeps patch's per-layer dispatch and runs each hooked
module's stock forward under `torch.compile` (`dqar.engine.flow_compiled`): the compiled path of the non-DiT families.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Executor:
    """One executor's capabilities."""

    name: str
    kernels: bool  # runs `dqar.engine.fused`'s block functions (compiled when `compile`)
    compile: bool
    cfg_share: bool  # runs CFG-branch sharing of attn1
    signals: bool  # runs deciders that measure signals (the gate, policies, traces)
    branches: bool  # keeps one history per CFG branch run as a separate forward (cache_context)
    dit_only: bool  # runs the class-conditional DiT only


EXECUTORS = {e.name: e for e in (
    Executor("patch", kernels=False, compile=False, cfg_share=True, signals=True, branches=True, dit_only=False),
    Executor("fused", kernels=True, compile=False, cfg_share=False, signals=False, branches=True, dit_only=True),
    Executor("compiled", kernels=True, compile=True, cfg_share=False, signals=False, branches=True, dit_only=True),
    Executor("graph", kernels=False, compile=False, cfg_share=True, signals=False, branches=False, dit_only=True),
    Executor("flow_compiled", kernels=False, compile=True, cfg_share=False, signals=False, branches=True, dit_only=False),
)}
