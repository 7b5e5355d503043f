"""Inductor and dynamo cache artifacts kept in one file, so a later process (the next call in the same GPU window) skips
compiling what an earlier one compiled.

`load` at the start of a run hot-loads the file's artifacts into the local caches (`torch.compiler.load_cache_artifacts`);
`save` writes what this process compiled or hit (`torch.compiler.save_cache_artifacts`) merged with what the file already
held, atomically. The file is `path` or, without one, the `DQAR_COMPILE_CACHE` environment variable; neither: nothing
happens. A missing, corrupt or unwritable file costs one warning line, never the run.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from dqar.errors import first_line, quiet_logger
from dqar.io import atomic_write_bytes

ENV = "DQAR_COMPILE_CACHE"
_TORCH_LOGGER = "torch.compiler._cache"  # logs a multi-line traceback on bytes it cannot read; we warn in one line instead


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cache_file(path: str | os.PathLike | None = None) -> Path | None:
    """The cache file: `path`, else $DQAR_COMPILE_CACHE, else None (no cache)."""
    chosen = path if path is not None else os.environ.get(ENV) or None
    return Path(chosen) if chosen is not None else None


def _counts(artifacts) -> dict[str, int]:
    """{kind: how many} of a CacheInfo's or a deserialized artifact dict's entries."""
    items = artifacts.artifacts if hasattr(artifacts, "artifacts") else artifacts
    return {kind: len(entries) for kind, entries in items.items()}


def load(path: str | os.PathLike | None = None, log: Callable[[str], None] = _stderr) -> dict | None:
    """Hot-load the cache file's artifacts; returns {"path", "loaded": {kind: n} or None, "warning"} or None (no file set)."""
    file = cache_file(path)
    if file is None:
        return None
    out = {"path": str(file), "loaded": None, "warning": None}
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        out["warning"] = f"compile cache {file} does not exist yet: compiling from scratch (it is written at the end)"
    except OSError as exc:
        out["warning"] = f"compile cache {file} is unreadable ({exc.strerror}): compiling from scratch"
    else:
        try:
            with quiet_logger(_TORCH_LOGGER, logging.CRITICAL):
                info = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # noqa: BLE001 - a bad cache must never cost the run
            info, why = None, first_line(exc) or type(exc).__name__
        else:
            why = "not a torch.compiler cache artifact file, or another torch version's"
        if info is None:
            out["warning"] = f"compile cache {file} could not be loaded ({why}): compiling from scratch"
        else:
            out["loaded"] = _counts(info)
            log(f"compile cache: loaded {_describe(out['loaded'])} from {file}")
    if out["warning"]:
        log(f"warning: {out['warning']}")
    return out


def save(path: str | os.PathLike | None = None, log: Callable[[str], None] = _stderr) -> dict | None:
    """Write this process's artifacts, merged with the file's, atomically; returns {"path", "saved", "warning"} or None."""
    file = cache_file(path)
    if file is None:
        return None
    out = {"path": str(file), "saved": None, "warning": None}
    try:
        with quiet_logger(_TORCH_LOGGER, logging.CRITICAL):
            produced = torch.compiler.save_cache_artifacts()
        if produced is None:
            log(f"compile cache: nothing compiled in this process, {file} left as it is")
            return out
        data, counts = _merge(file, produced[0])
        atomic_write_bytes(file, data)
    except Exception as exc:  # noqa: BLE001 - saving is a convenience: warn, keep the measurements
        out["warning"] = f"compile cache {file} not saved ({first_line(exc) or type(exc).__name__})"
        log(f"warning: {out['warning']}")
        return out
    out["saved"] = counts
    log(f"compile cache: saved {_describe(counts)} to {file}")
    return out


def _merge(file: Path, new: bytes) -> tuple[bytes, dict[str, int]]:
    """`new` artifacts with those of `file` that `new` lacks (an artifact loaded but not used this run is kept)."""
    from torch.compiler._cache import CacheArtifactManager, _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer

    with quiet_logger(_TORCH_LOGGER, logging.CRITICAL):
        fresh = CacheArtifactManager.deserialize(new) or {}
        try:
            old = CacheArtifactManager.deserialize(file.read_bytes()) or {}
        except OSError:
            old = {}
    merged: dict[str, dict[str, object]] = {}
    for artifacts in (old, fresh):  # the new entry of a key wins
        for kind, entries in artifacts.items():
            merged.setdefault(kind, {}).update({a.key: a for a in entries})
    if not merged:
        return new, _counts(fresh)
    writer = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    writer.extend((kind, list(entries.values())) for kind, entries in merged.items())
    return writer.to_bytes(), {kind: len(entries) for kind, entries in merged.items()}


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) + " artifacts" if counts else "no artifacts"
