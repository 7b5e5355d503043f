"""`dqar bench` peer rows: a diffusers caching method on its own copy of the transformer, under the best compile it tolerates.

Each peer (dqar.studies.peers) is attached to a deep copy of the transformer on its first call (the
warm-up; MagCache calibrates its ratios there, on other seeds), and that copy is tried under
`torch.compile` (default mode, static shapes) with the peer's hooks attached — diffusers' hooks break
the graph where they decide on tensors. If the compiled generation raises in the warm-up, the row
falls back to eager and its `setting` says why; a failure after the warm-up is an error.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from dqar.errors import DqarError, first_line
from dqar.generate import generate
from dqar.studies import peers as P
from dqar.studies.peer_rows import attach_peer, model_copy

PEERS: dict[str, Callable[[], Any]] = {m: P.PEERS[m] for m in ("pab", "first_block_cache", "taylorseer", "magcache")}  # diffusers' own, default settings
PREFIX = "peer_"
COMPILED = ("torch.compile (default mode, static shapes) with the peer's diffusers hooks attached (graph breaks at the hooks; "
            "frames past dynamo's recompile limit run eagerly)")
EAGER = "eager (compile rows off)"


def check_peers(names) -> None:
    """Refuse an unknown peer name (one line)."""
    for name in names:
        if name not in PEERS:
            raise DqarError(f"unknown peer '{name}'", f"use some of: {', '.join(PEERS)}")


def compile_model(transformer: torch.nn.Module) -> torch.nn.Module:
    """The peer's transformer under torch.compile (its hooks run inside the compiled call)."""
    return torch.compile(transformer, dynamic=False)


class PeerCase:
    """One generation closure for a peer; `setting` says how it ran (compiled, or eager and why)."""

    def __init__(self, loaded, labels, run, name: str, compile: bool):
        self.loaded, self.labels, self.run, self.name, self.compile = loaded, list(labels), run, name, compile
        self.attached = self.model = self.eager = None
        self.setting = COMPILED if compile else EAGER
        self.calls = 0

    def _attach(self) -> None:
        """Copy the transformer and apply the peer (MagCache: calibrated here, eagerly, on other seeds)."""
        row = attach_peer(PEERS[self.name](), model_copy(self.loaded), self.labels, self.run)
        self.attached, self.eager = row.attached, row.loaded
        self.model = replace(self.eager, transformer=compile_model(self.eager.transformer)) if self.compile else self.eager

    def _generate(self):
        with self.attached.generation():
            return generate(self.model, self.labels, self.run)

    def __call__(self):
        first = self.calls == 0
        self.calls += 1
        if first:
            self._attach()
        try:
            return self._generate()
        except Exception as exc:  # noqa: BLE001 - compiling foreign hooks: fall back in the warm-up only
            if not first or self.model is self.eager:
                raise
            self.model = self.eager
            self.setting = f"eager: torch.compile failed in the warm-up ({_why(exc)})"[:300]
            return self._generate()


def _why(exc: BaseException) -> str:
    """The error in one line, with its root cause where it wraps one (dynamo's BackendCompilerFailed does)."""
    root, seen = exc, {id(exc)}
    while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None and id(inner) not in seen:
        root = inner
        seen.add(id(root))
    own = f"{type(exc).__name__}: {first_line(exc)}"
    return own if root is exc else f"{own} {type(root).__name__}: {first_line(root)}"
