"""The block adapter: which blocks a diffusers transformer runs, in order, and what each returns — from diffusers itself.

diffusers names a transformer's block lists (`hooks._common._ALL_TRANSFORMER_BLOCK_IDENTIFIERS`:
`transformer_blocks`, `single_transformer_blocks`, `blocks`, `layers`, …) and describes, per block
class, which outputs are `hidden_states` and which `encoder_hidden_states`
(`hooks._helpers.TransformerBlockRegistry`). The adapter reads both: the block lists, in the order
the model declares them (Flux's dual-stream then single-stream blocks make one layer sequence),
become dqar's layers, and each layer outputs one stream (the image tokens) or two (image and text).
Every executor asks this module; a transformer with a block diffusers does not describe is refused
when reuse is enabled, never later.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dqar.engine.executors import EXECUTORS
from dqar.errors import DqarError

# Per block class, its self- or joint-attention submodule: where attention granularity reuses. Other blocks: block only.
ATTENTION_MODULES = {
    "BasicTransformerBlock": "attn1",  # DiT, PixArt-α / Σ
    "JointTransformerBlock": "attn",  # SD3 / 3.5 (joint attention: image and text outputs)
    "FluxTransformerBlock": "attn",  # Flux.1 dual-stream (joint attention: image and text outputs)
    "FluxSingleTransformerBlock": "attn",  # Flux.1 single-stream (attention over [text; image] tokens)
    "QwenImageTransformerBlock": "attn",  # Qwen-Image (joint attention)
    "WanTransformerBlock": "attn1",  # Wan (self-attention; cross-attention is attn2)
}
DIT_CLASS = "DiTTransformer2DModel"  # the class-conditional DiT: analytic FLOPs, fused/compiled/graph executors, cfg_share
DIT_FAMILIES = {DIT_CLASS}  # transformer classes run as the DiT (a test double of its shape may join)


@dataclass(frozen=True)
class BlockSpec:
    """One layer: where it lives, which outputs are which stream, and where its attention output can be isolated."""

    path: str  # e.g. "single_transformer_blocks.3"
    kind: str  # the block's class name
    hidden_index: int | None  # position of hidden_states in a tuple output (None: the block returns one tensor)
    encoder_index: int | None  # position of encoder_hidden_states in the output (None: not an output)
    hidden_arg: str  # the forward parameter holding the image stream
    encoder_arg: str  # the forward parameter holding the text stream
    attention: str | None  # attribute of the self/joint attention module (None: block granularity only)

    @property
    def streams(self) -> int:
        """Outputs reuse keeps a residual of: 1 (image) or 2 (image, text)."""
        return 1 if self.encoder_index is None else 2


@dataclass(frozen=True)
class Layout:
    """A transformer's layers (`blocks`, in execution order) with their specs; `family` is its class name."""

    family: str
    blocks: tuple[torch.nn.Module, ...]
    specs: tuple[BlockSpec, ...]
    metadata: tuple[Any, ...]  # diffusers' TransformerBlockMetadata per layer (reads a block's inputs)

    @property
    def is_dit(self) -> bool:
        return self.family in DIT_FAMILIES

    @property
    def dit_blocks(self) -> bool:
        """Every block is a `BasicTransformerBlock` (DiT, PixArt): kv target, the entropy gate and cfg_share apply."""
        return all(s.kind == "BasicTransformerBlock" for s in self.specs)

    @property
    def slots(self) -> tuple[int, ...]:
        """First cache slot of each layer: one slot per output stream."""
        out, n = [], 0
        for s in self.specs:
            out.append(n)
            n += s.streams
        return tuple(out)

    @property
    def num_slots(self) -> int:
        return sum(s.streams for s in self.specs)

    def attention_module(self, layer: int) -> torch.nn.Module:
        """Layer `layer`'s self/joint attention module; refused with the granularity that works where there is none."""
        spec = self.specs[layer]
        if spec.attention is None:
            raise DqarError(f"attention granularity is not available for {spec.kind} blocks ({self.family})",
                            "set granularity = 'block' for this model")
        return getattr(self.blocks[layer], spec.attention)

    def heads(self) -> int:
        """Attention heads of the first layer (per-head INT8 groups); 1 where the block has no attention module."""
        spec = self.specs[0]
        attn = getattr(self.blocks[0], spec.attention, None) if spec.attention else None
        return int(getattr(attn, "heads", 1) or 1)

    def inputs(self, layer: int, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(image stream, text stream or None) a block was called with."""
        spec, meta = self.specs[layer], self.metadata[layer]
        hidden = meta._get_parameter_from_args_kwargs(spec.hidden_arg, args, kwargs)
        if spec.encoder_index is None:
            return hidden, None
        return hidden, meta._get_parameter_from_args_kwargs(spec.encoder_arg, args, kwargs)


def _registry():
    from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS
    from diffusers.hooks._helpers import TransformerBlockRegistry
    return _ALL_TRANSFORMER_BLOCK_IDENTIFIERS, TransformerBlockRegistry


def supported_blocks() -> list[str]:
    """Block classes diffusers describes (the registry), sorted."""
    _, registry = _registry()
    registry._register()
    return sorted(cls.__name__ for cls in registry._registry)


def describe(transformer: torch.nn.Module) -> Layout:
    """The layout of a diffusers transformer, or a one-line refusal naming its class and what is supported."""
    identifiers, registry = _registry()
    family = type(transformer).__name__
    lists = [(name, child) for name, child in transformer.named_children()
             if name in identifiers and isinstance(child, torch.nn.ModuleList) and len(child)]
    if not lists:
        raise DqarError(f"{family} has no diffusers transformer block lists ({', '.join(identifiers)})",
                        "pass a diffusers DiT transformer or pipeline (DiT, PixArt, SD3, Flux, Qwen-Image, Wan, …)")
    blocks, specs, metadata = [], [], []
    for name, child in lists:
        for i, block in enumerate(child):
            try:
                meta = registry.get(type(block))
            except ValueError:
                raise DqarError(f"{family}'s {type(block).__name__} blocks are not in diffusers' TransformerBlockRegistry",
                                f"use a transformer whose blocks are registered: {', '.join(supported_blocks())}") from None
            kind = type(block).__name__
            attention = ATTENTION_MODULES.get(kind)
            blocks.append(block)
            metadata.append(meta)
            specs.append(BlockSpec(path=f"{name}.{i}", kind=kind, hidden_index=meta.return_hidden_states_index,
                                   encoder_index=meta.return_encoder_hidden_states_index,
                                   hidden_arg=meta.hidden_states_argument_name, encoder_arg=meta.encoder_hidden_states_argument_name,
                                   attention=attention if attention and hasattr(block, attention) else None))
    return Layout(family=family, blocks=tuple(blocks), specs=tuple(specs), metadata=tuple(metadata))


def outputs(spec: BlockSpec, out: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(image stream, text stream or None) of a block's output."""
    if torch.is_tensor(out):
        return out, None
    hidden = out[spec.hidden_index or 0]
    return hidden, (out[spec.encoder_index] if spec.encoder_index is not None else None)


def pack(spec: BlockSpec, form: int, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
    """A block output shaped as the block returns it, from its streams; `form`: 0 a tensor, n a tuple of n (see `form_of`)."""
    if not form:
        return hidden
    items: list[Any] = [None] * form
    items[spec.hidden_index or 0] = hidden
    if spec.encoder_index is not None:
        items[spec.encoder_index] = encoder
    return tuple(items)


def form_of(out: Any) -> int:
    """0 for a tensor output, else the tuple's length (what `pack` rebuilds)."""
    return 0 if torch.is_tensor(out) else len(out)


def check_family(layout: Layout, cfg, needs, executor: str) -> None:
    """Refuse at enable what a family cannot run, with one line naming what works."""
    family = layout.family
    if EXECUTORS[executor].dit_only and not layout.is_dit:
        raise DqarError(f"the '{executor}' executor runs the class-conditional DiT ({DIT_CLASS}), not {family}",
                        "use executor = 'patch' (or 'auto') for this model")
    if not layout.dit_blocks:
        if needs.entropy or needs.snr or needs.record:
            raise DqarError(f"the entropy gate, DiT-feature policies and signal traces read DiT BasicTransformerBlock attention, "
                            f"not {family}'s blocks", "use a plan, gate_signal = 'probe_error' or a block-feature policy "
                            "(dqar policy collect --model <this model>) for this model")
        if needs.any and cfg.granularity != "block":
            raise DqarError(f"on {family} the engine measures block changes on whole blocks only",
                            "set granularity = 'block' (a block-feature policy's setting)")
        if cfg.target == "kv":
            raise DqarError(f"target 'kv' caches BasicTransformerBlock K/V, not {family}'s", "use target = 'attention'")
    if cfg.cfg_share != "none" and not layout.is_dit:
        raise DqarError(f"cfg_share splits class-conditional [conditional; null-class] batches, which {family} does not run",
                        "set cfg_share = 'none' for this model")
    if cfg.granularity == "attention":
        for layer, spec in enumerate(layout.specs):
            if spec.attention is None:
                layout.attention_module(layer)  # raises: names the block kind and the granularity that works
