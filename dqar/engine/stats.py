"""What one generation with reuse did: counts, bytes, error, FLOPs, host syncs."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class ReuseStats:
    """Summary of one generation; `reuse_mask[e][l]` is 1 where layer l reused at evaluation e."""

    evaluations: int
    layers: int
    reused: int  # reused layer-evaluations
    reuse_fraction: float  # reused / (evaluations * layers)
    per_layer_reused: list[int]
    per_evaluation_reused: list[int]
    reuse_mask: list[list[int]]
    cache_bytes: int  # held at the end of the generation, values + scales
    cache_bytes_peak: int
    quant_error: float | None  # mean relative L2 round-trip error of INT8 stores; None without INT8
    flops_total: int  # analytic FLOPs of all model evaluations without reuse
    flops_skipped: int
    host_syncs: int  # device→host reads on the engine's path during the generation
    nonfinite_recomputes: int = 0  # nonfinite_guard on: planned reuses that recomputed because the cache held NaN/Inf
    nonfinite_reused: int = 0  # nonfinite_guard off: reuses of cache entries holding NaN/Inf (counted, warned)
    cfg_shared: int = 0  # layer-evaluations whose attn1 ran on one CFG half and was copied to the other
    forecasts: int = 0  # reuses that extrapolated from two or more computed outputs (forecast_order >= 1); the rest copied
    cache_entries_peak: int = 0  # most stored outputs held at once, every entry of every layer's history counted
    graphs: int = 0  # executor 'graph': distinct whole-model graphs (patterns) this generation ran
    fallback_evaluations: int = 0  # executor 'graph': evaluations beyond max_patterns, run on the per-block compiled path
    fallback_rows: list[str] = field(default_factory=list)  # executor 'graph': those evaluations' reuse rows ('R' reuse, '.' compute)
    compile_seconds: float = 0.0  # executor 'graph': seconds of first calls (compile, and capture on CUDA) in this generation

    @property
    def attention_skipped_fraction(self) -> float:
        """Share of attention-sublayer work not done: reused layer-evaluations + half of the CFG-shared ones."""
        cells = self.evaluations * self.layers
        return (self.reused + 0.5 * self.cfg_shared) / cells if cells else 0.0

    @property
    def flops_skipped_fraction(self) -> float:
        return self.flops_skipped / self.flops_total if self.flops_total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flops_skipped_fraction"] = self.flops_skipped_fraction
        d["attention_skipped_fraction"] = self.attention_skipped_fraction
        return d


def summarize(mask: np.ndarray, **rest) -> ReuseStats:
    """Build stats from the executed reuse mask (E, L) and the other fields."""
    mask = np.asarray(mask, dtype=bool)
    e, l = mask.shape
    reused = int(mask.sum())
    return ReuseStats(
        evaluations=e,
        layers=l,
        reused=reused,
        reuse_fraction=reused / (e * l) if e * l else 0.0,
        per_layer_reused=mask.sum(axis=0).astype(int).tolist(),
        per_evaluation_reused=mask.sum(axis=1).astype(int).tolist(),
        reuse_mask=mask.astype(int).tolist(),
        **rest,
    )
