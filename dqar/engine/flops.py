"""FLOP counts (2 FLOPs per multiply-add): analytic for the class-conditional DiT, counted on fake tensors for every other family."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from dqar.errors import DqarError


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


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel: as the CUDA kernels' formula (torch counts those itself)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _register_cpu_attention() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_registry:
        register_flop_formula(op, get_raw=False)(_cpu_attention_flops)


def counted_flops(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, int]:
    """Matmul/attention FLOPs of `module(*args, **kwargs)` per module path, counted on fake tensors (nothing computes).

    torch's `FlopCounterMode` counts each matmul, convolution and attention kernel (2 FLOPs per multiply-add, as the
    analytic DiT count); `FakeTensorMode` runs the forward on shapes only. Keys are module paths below the root
    ("transformer_blocks.0", "transformer_blocks.0.attn", …) and "" for the whole forward.
    """
    _register_cpu_attention()
    with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args, **kwargs)
    counts = counter.get_flop_counts()
    out = {"": sum(counts.get("Global", {}).values())}
    for name, per_op in counts.items():
        if name != "Global" and "." in name:
            out[name.split(".", 1)[1]] = sum(per_op.values())
    return out


@dataclass(frozen=True)
class FlopModel:
    """Per sample row: FLOPs of one forward, of each layer's reuse (what it skips, (L,)), and of one attention sublayer."""

    forward: int
    skip: np.ndarray  # (L,) int64
    attention: int  # what half a CFG-shared attn1 saves per row (DiT only; 0 elsewhere)


def dit_model(config, height: int, width: int, layers: int, target: str, granularity: str) -> FlopModel:
    """The class-conditional DiT's analytic model (every layer alike)."""
    shape = dit_shape(config, height, width)
    return FlopModel(forward_flops(shape), np.full(layers, skipped_flops(shape, target, granularity), dtype=np.int64),
                     attention_flops(shape))


def counted_model(counts: dict[str, int], rows: int, paths: list[str]) -> FlopModel:
    """A model from `counted_flops` of a forward of `rows` sample rows; `paths`: the module each layer's reuse skips."""
    missing = [p for p in paths if p not in counts]
    if missing:
        raise DqarError(f"no FLOPs were counted for {missing[0]}", "report this model: its blocks did not run in the counted forward")
    return FlopModel(counts[""] // rows, np.asarray([counts[p] // rows for p in paths], dtype=np.int64), 0)


def shape_key(args: tuple, kwargs: dict) -> tuple:
    """What a counted forward's FLOPs depend on: the shapes and dtypes of its tensor arguments."""
    def one(v):
        return (tuple(v.shape), str(v.dtype)) if torch.is_tensor(v) else type(v).__name__
    return tuple(one(v) for v in args) + tuple((k, one(v)) for k, v in sorted(kwargs.items()))
