"""Block work that really ran: counted calls per layer and what each costs, the same for dqar and for peers.

A transformer's layers come from the block adapter (`dqar.engine.adapter.describe`): the DiT's
`transformer_blocks`; Flux's dual-stream `transformer_blocks` then single-stream
`single_transformer_blocks`. Each layer has three probes, children that run only inside their
parent's own forward (a cache hook that returns a cached or predicted output skips them):

- block: `norm1` (DiT, PixArt, SD3, Flux dual-stream, Wan), `norm` (Flux single-stream) or `img_norm1` (Qwen-Image);
- attention ("attn1" in the counts: the layer's self/joint attention module): its `to_q`;
- MLP ("ff"): `ff.net.0` (DiT, PixArt, SD3, Flux dual-stream), `ffn.net.0` (Wan), `img_mlp.net.0` (Qwen-Image),
  `proj_mlp` (Flux single-stream; a bare Linear, counted, never itself a peer's target).

Work weights: per layer, FLOPs of one attention call and of the rest of the block (its MLP, norms,
projections): analytic on the DiT (`dqar.engine.flops`), counted with torch's FlopCounterMode on a
captured forward elsewhere. "Work skipped" is 1 − the weighted calls that ran over the baseline's.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from dqar.engine.adapter import describe
from dqar.errors import DqarError

COUNTED = ("block", "attn1", "ff")  # what `count_calls` counts
FIX = "count calls on DiT, PixArt, SD3, Flux, Wan or Qwen-Image blocks"


def layers(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's layers in execution order (every block list the adapter describes)."""
    return list(describe(transformer).blocks)


def _child(module: torch.nn.Module, names: Sequence[str], what: str) -> torch.nn.Module:
    for name in names:
        sub = module
        for part in name.split("."):
            sub = getattr(sub, part, None) if not part.isdigit() else (sub[int(part)] if sub is not None else None)
            if sub is None:
                break
        if sub is not None:
            return sub
    raise DqarError(f"{type(module).__name__} has no {what} to count ({' or '.join(names)})", FIX)


def probes(block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The child module each counted kind fires on."""
    attn = getattr(block, "attn1", None) or getattr(block, "attn", None)
    if attn is None:
        raise DqarError(f"{type(block).__name__} has no attention module to count", FIX)
    return {"block": _child(block, ("norm1", "norm", "img_norm1"), "block norm"),
            "attn1": _child(attn, ("to_q",), "query projection"),
            "ff": _child(block, ("ff.net.0", "ffn.net.0", "img_mlp.net.0", "proj_mlp"), "MLP projection")}


@contextlib.contextmanager
def count_calls(blocks: Sequence[torch.nn.Module], per_layer: list | None = None) -> Iterator[dict[str, int]]:
    """Count the block, attention and MLP forwards that really run while inside (a dict filled as they happen).

    `per_layer`: a list, filled with one such dict per block (the weighted share needs them).
    """
    counts = {k: 0 for k in COUNTED}
    mine = [{k: 0 for k in COUNTED} for _ in blocks]
    if per_layer is not None:
        per_layer[:] = mine
    handles = []

    def counter(key: str, layer: dict):
        def hook(module, args, output) -> None:
            counts[key] += 1
            layer[key] += 1

        return hook

    try:
        for block, layer in zip(blocks, mine):
            for key, probe in probes(block).items():
                handles.append(probe.register_forward_hook(counter(key, layer)))
        yield counts
    finally:
        for h in handles:
            h.remove()


def computed_fractions(counts: dict[str, int], baseline: dict[str, int]) -> dict[str, float | None]:
    """Computed calls of a peer as a fraction of the baseline's, per counted kind."""
    return {k: (counts[k] / baseline[k] if baseline.get(k) else None) for k in COUNTED}


# ----- work weights ------------------------------------------------------------------------------
@contextlib.contextmanager
def captured_forward(transformer: torch.nn.Module) -> Iterator[dict]:
    """The first forward's (args, kwargs) while inside, as {"args", "kwargs"} (what `counted_weights` counts)."""
    seen: dict = {}

    def grab(module, args, kwargs) -> None:
        if not seen:
            seen.update(args=args, kwargs=dict(kwargs))

    handle = transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def dit_weights(loaded) -> list[tuple[float, float]]:
    """The DiT's analytic (attention, MLP) FLOPs of one call, every layer alike (one sample row)."""
    from dqar.engine.flops import attention_flops, dit_shape, mlp_flops

    cfg = loaded.transformer.config
    shape = dit_shape(cfg, cfg.sample_size, cfg.sample_size)
    return [(float(attention_flops(shape)), float(mlp_flops(shape)))] * cfg.num_layers


def counted_weights(transformer: torch.nn.Module, forward: dict) -> list[tuple[float, float]]:
    """Per layer: (attention FLOPs, the rest of the block's FLOPs), counted on the captured forward's shapes."""
    from dqar.engine.flops import counted_flops

    if not forward:
        raise DqarError("no transformer forward was captured", "count the weights around a generation")
    flops = counted_flops(transformer, forward["args"], forward["kwargs"])
    out = []
    for spec in describe(transformer).specs:
        attn = float(flops.get(f"{spec.path}.{spec.attention}", 0)) if spec.attention else 0.0
        out.append((attn, float(flops.get(spec.path, 0)) - attn))
    return out


def work_weights(loaded, forward: dict | None = None) -> list[tuple[float, float]]:
    """(attention, rest-of-block) FLOPs per layer: analytic on the DiT, counted on `forward` elsewhere."""
    if describe(loaded.transformer).is_dit:
        return dit_weights(loaded)
    return counted_weights(loaded.transformer, forward or {})


def skipped_share(per_layer: Sequence[dict], base: Sequence[dict], weights: Sequence[tuple[float, float]]) -> float:
    """Share of the baseline's weighted attention + MLP work that did not run."""
    def work(rows):
        return sum(r["attn1"] * wa + r["ff"] * wf for r, (wa, wf) in zip(rows, weights))

    return 1.0 - work(per_layer) / work(base)
