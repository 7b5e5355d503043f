"""Analytic FLOP counts for a DiT forward, from the model config (2 FLOPs per multiply-add)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DitShape:
    """What the FLOP count depends on."""

    width: int  # hidden size C = heads * head_dim
    tokens: int  # T = (H / p) * (W / p)
    layers: int
    patch_in: int  # p * p * in_channels
    patch_out: int  # p * p * out_channels
    ff_mult: int = 4


def dit_shape(config, height: int, width: int) -> DitShape:
    """A `DitShape` from a diffusers DiT config and the latent size."""
    p = config.patch_size
    c = config.num_attention_heads * config.attention_head_dim
    out = config.out_channels or config.in_channels
    return DitShape(width=c, tokens=(height // p) * (width // p), layers=config.num_layers, patch_in=p * p * config.in_channels, patch_out=p * p * out)


def attention_flops(s: DitShape) -> int:
    """One sample row through one attention sublayer: q/k/v/out projections + QKᵀ and AV."""
    return 2 * (4 * s.tokens * s.width * s.width + 2 * s.tokens * s.tokens * s.width)


def kv_projection_flops(s: DitShape) -> int:
    """The K and V projections alone (what a K/V cache skips)."""
    return 2 * (2 * s.tokens * s.width * s.width)


def mlp_flops(s: DitShape) -> int:
    return 2 * (2 * s.ff_mult * s.tokens * s.width * s.width)


def block_flops(s: DitShape) -> int:
    """Attention + MLP + the block's own adaLN modulation (timestep MLP and 6C projection)."""
    ada = 2 * (256 * s.width + s.width * s.width + 6 * s.width * s.width)
    return attention_flops(s) + mlp_flops(s) + ada


def forward_flops(s: DitShape) -> int:
    """One sample row through the whole transformer."""
    edges = 2 * (s.tokens * s.patch_in * s.width + 2 * s.width * s.width + s.tokens * s.width * s.patch_out)
    return s.layers * block_flops(s) + edges


def skipped_flops(s: DitShape, target: str, granularity: str) -> int:
    """FLOPs one sample row saves when one layer reuses."""
    if granularity == "block":
        return block_flops(s)
    return kv_projection_flops(s) if target == "kv" else attention_flops(s)
