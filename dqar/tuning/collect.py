"""Training traces for the learned policy: features and measured reuse errors from full-compute generations.

Each generation samples a few images with every layer computed. Per (evaluation e, layer l) it
records the signals the policy reads (`dqar.engine.features`) and, as the label, the **measured
perturbation a reuse would have injected**: reusing `attn1`'s output from `a` evaluations earlier
adds `gate_msa_e ⊙ (o_(e−a) − o_e)` to the block's residual stream, so the label is
`‖gate_msa_e ⊙ (o_(e−a) − o_e)‖ / ‖h_e‖` (h_e: the block's input; all batch rows), for every age
`a` = 1..`max_age`. Rows are written for every age, and for every span the "last relative
change" feature could have had at sampling time (the attention output's change against the
output `g` = 1..`max_age` evaluations before it, divided by `g`).

`validate_proxy` checks that label against the final sample: it reuses single cells and short
runs of cells of one layer, samples to the end, and correlates (Spearman) the summed labels with
the relative L2 error of the final images against full compute — next to the same correlation for
the attention output's plain relative change (what calibrated plans are greedy on).
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dqar.engine import forecast
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.errors import DqarError
from dqar.engine.decider import TracingDecider
from dqar.engine.signals import Trace, relative_change
from dqar.engine.features import (BLOCK_FEATURES, BLOCK_PROBE_FEATURES, FEATURE_SETS, FEATURES, MISSING_CHANGE, PROBE_FEATURES, PROBE_LAYER,
                                  feature_matrix)
from dqar.engine.plan import Plan
from dqar.generate import generate
from dqar.labels import cycle_labels

TRACES_FORMAT = "dqar-policy-traces/1"
LABEL = ("relative residual-stream perturbation of reusing attn1's output from `age` evaluations earlier: "
         "||gate_msa_e * (o_(e-age) - o_e)|| / ||h_e|| over all batch rows (h_e: the block's input)")
BLOCK_LABEL = ("relative perturbation of reusing a whole block's residual as the engine's {kind} forecast (order {order}, "
               "evaluation axis) from the residuals computed at e-age, e-age-1, ...: max over output streams of "
               "||forecast - r_e|| / ||h_e|| (r: block output - input, h: the stream's block input), largest over CFG branches")
FORECAST_LABEL = ("relative residual-stream perturbation of reusing attn1's output as the engine's order-{order} forecast "
                  "(evaluation axis) from the outputs computed at e-age, e-age-1, ...: ||gate_msa_e * (forecast - o_e)|| / ||h_e||")


@dataclass(frozen=True)
class CollectSettings:
    """What `collect_traces` samples."""

    generations: int = 64  # full-compute generations (the unit of the held-out split)
    batch: int = 2  # samples per generation
    seed: int = 10_000  # generation g, sample i uses seed + g * batch + i (away from evaluation seeds 0..)
    steps: int = 50
    cfg: float = 4.0
    sampler: str = "ddim"
    max_age: int = 3  # largest staleness labelled (the policy's max_staleness)
    entropy_rows: int = 16  # query rows of the entropy subsample (as the engine measures it)
    forecast_order: int = 0  # what a reuse returns (the engine's forecast_order): labels measure that reuse's error
    probe_feature: bool = False  # add `log_probe_error` (features.PROBE_FEATURES): the probe layer's change one evaluation before
    granularity: str = "attention"  # "block": whole-block labels and `BLOCK_FEATURES` on any family (`block_labels`)
    forecast_kind: str = "taylor"  # block granularity: the engine's forecaster the labels measure (attention: taylor)

    def __post_init__(self) -> None:
        self.reuse  # validates (the engine's check)
        if self.granularity == "attention" and self.forecast_kind != "taylor":
            raise DqarError(f"attention-granularity labels measure taylor forecasts, not forecast_kind = '{self.forecast_kind}'",
                            "use --granularity block with --forecast-kind, or forecast_kind taylor")
        for name, lo in (("generations", 1), ("batch", 1), ("max_age", 1), ("entropy_rows", 1), ("steps", 2), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise DqarError(f"{name} = {v!r} is invalid", f"use an integer >= {lo}")
        SampleConfig(steps=self.steps, cfg=self.cfg, sampler=self.sampler)  # validates

    @property
    def reuse(self) -> ReuseConfig:
        return ReuseConfig(forecast_order=self.forecast_order, forecast_kind=self.forecast_kind, granularity=self.granularity)

    @property
    def names(self) -> tuple[str, ...]:
        """The feature set the traces hold."""
        if self.granularity == "block":
            return BLOCK_PROBE_FEATURES if self.probe_feature else BLOCK_FEATURES
        return PROBE_FEATURES if self.probe_feature else FEATURES

    def run(self, seed: int) -> RunConfig:
        return RunConfig(reuse=self.reuse, sample=SampleConfig(steps=self.steps, cfg=self.cfg, sampler=self.sampler, seed=seed))


@dataclass(frozen=True)
class PolicyTraces:
    """Training rows: one per (generation, evaluation, age, change span, layer)."""

    features: np.ndarray  # (N, F) float32, columns FEATURES
    labels: np.ndarray  # (N,) float32 measured relative error of the reuse
    group: np.ndarray  # (N,) int64 generation index (held-out splits are by generation = by seed)
    evaluation: np.ndarray  # (N,) int64
    layer: np.ndarray  # (N,) int64
    age: np.ndarray  # (N,) int64
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray) -> "PolicyTraces":
        return PolicyTraces(self.features[keep], self.labels[keep], self.group[keep], self.evaluation[keep], self.layer[keep],
                            self.age[keep], dict(self.meta))


def save_traces(traces: PolicyTraces, path: str | Path) -> None:
    """An uncompressed .npz (no pickled objects; the metadata as a JSON string), written atomically."""
    from dqar.io import atomic_write_npz

    atomic_write_npz(Path(path), features=traces.features, labels=traces.labels, group=traces.group,
                     evaluation=traces.evaluation, layer=traces.layer, age=traces.age,
                     meta=np.array(json.dumps({"format": TRACES_FORMAT, **traces.meta})))


def load_traces(path: str | Path) -> PolicyTraces:
    path = Path(path)
    fix = "collect traces with `dqar policy collect --out traces.npz`"
    if not path.is_file():
        raise DqarError(f"traces file '{path}' does not exist", fix)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ("features", "labels", "group", "evaluation", "layer", "age")}
    except (OSError, ValueError, KeyError) as exc:
        raise DqarError(f"traces file '{path}' is not readable ({str(exc).splitlines()[0][:120]})", fix) from None
    if meta.pop("format", None) != TRACES_FORMAT or tuple(meta.get("features", ())) not in FEATURE_SETS:
        raise DqarError(f"traces file '{path}' was written by another version or tool", fix)
    return PolicyTraces(**arrays, meta=meta)


# ----- one full-compute generation ---------------------------------------------------------------
class ReuseErrors:
    """Hooks on every block: what reusing an earlier `attn1` output would change, measured on the device.

    Per evaluation e, layer l and age a: `change` = ‖o_e − o_(e−a)‖ / ‖o_(e−a)‖ (the engine's relative change)
    and `label` = ‖g_e ⊙ (ŷ − o_e)‖ / ‖h_e‖, where ŷ is what the reuse returns (order 0: o_(e−a); order N:
    the engine's forecast from o_(e−a), o_(e−a−1), … at evaluation e), g_e the block's `gate_msa` (from
    `norm1`) and h_e the block's input: the relative perturbation a reuse injects into the residual stream.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], max_age: int, order: int = 0):
        self.max_age = max_age
        self.order = order
        self.history: list[list[torch.Tensor]] = [[] for _ in blocks]  # per layer, newest last
        self.values: dict[str, list[list[list[torch.Tensor | None]]]] = {"change": [[] for _ in blocks], "label": [[] for _ in blocks]}
        self.inputs: list[torch.Tensor | None] = [None] * len(blocks)  # h_e per layer, (B, T, C)
        self.gates: list[torch.Tensor | None] = [None] * len(blocks)  # gate_msa per layer, (B, C)
        self.handles = []
        for i, b in enumerate(blocks):
            self.handles += [b.register_forward_pre_hook(functools.partial(self._block_in, i), with_kwargs=True),
                             b.norm1.register_forward_hook(functools.partial(self._gate, i)),
                             b.attn1.register_forward_hook(functools.partial(self._attn_out, i))]

    def _block_in(self, layer: int, module, args, kwargs) -> None:
        self.inputs[layer] = (args[0] if args else kwargs["hidden_states"]).detach()

    def _gate(self, layer: int, module, args, output) -> None:
        if not isinstance(output, tuple) or len(output) < 2:
            raise DqarError("policy labels need ada_norm_zero blocks (norm1 returning gate_msa)", "use a DiT with norm_type 'ada_norm_zero'")
        self.gates[layer] = output[1].detach()

    def _attn_out(self, layer: int, module, args, output) -> None:
        out = output.detach()  # (B, T, C)
        past = self.history[layer]
        gate, h = self.gates[layer].unsqueeze(1), self.inputs[layer]  # (B, 1, C), (B, T, C)
        ages = range(1, self.max_age + 1)
        self.values["change"][layer].append([relative_change(out, past[-a]) if a <= len(past) else None for a in ages])
        self.values["label"][layer].append([(gate * (self.reused(past, a) - out.float())).norm() / h.float().norm().clamp_min(1e-12)
                                            if a <= len(past) else None for a in ages])
        past.append(out)
        del past[: -(self.max_age + self.order)]

    def reused(self, past: list[torch.Tensor], age: int) -> torch.Tensor:
        """What a reuse `age` evaluations after the newest of `past[:len(past) - age + 1]` returns: (B, T, C) float32."""
        known = past[: len(past) - age + 1][::-1]  # newest first, the newest computed `age` evaluations ago
        w = forecast.weights([-age - i for i in range(len(known))], 0.0, self.order)
        return sum(wi * y.float() for wi, y in zip(w, known))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def host(self, name: str) -> np.ndarray:
        """(E, L, A) float64 of `change` or `label`, NaN where undefined (one read)."""
        table = self.values[name]
        layers, evals = len(table), len(table[0])
        flat = [v for per_layer in table for per_eval in per_layer for v in per_eval if v is not None]
        host = torch.stack(flat).cpu().numpy() if flat else np.zeros(0)
        out = np.full((layers, evals, self.max_age), np.nan)
        i = 0
        for l in range(layers):
            for e in range(evals):
                for a, v in enumerate(table[l][e]):
                    if v is not None:
                        out[l, e, a] = host[i]
                        i += 1
        return out.transpose(1, 0, 2)


@dataclass(frozen=True)
class FullCompute:
    """Signals, per-age output errors and the final images of one full-compute generation."""

    trace: Trace
    x_rms: np.ndarray  # (E,) RMS of each evaluation's input
    change: np.ndarray  # (E, L, A) relative change of the attention output against the one `age` evaluations earlier
    errors: np.ndarray  # (E, L, A) label: relative residual-stream perturbation of reusing that earlier output
    images: torch.Tensor  # (N, C, H, W) final images


def full_compute(loaded, labels: Sequence[int], run: RunConfig, max_age: int, entropy_rows: int) -> FullCompute:
    """Sample `labels` with every layer computed, recording features and output errors (of `run`'s forecast order)."""
    decider = TracingDecider(entropy_rows, input_rms=True)
    hooks = ReuseErrors(list(loaded.transformer.transformer_blocks), max_age, run.reuse.forecast_order)
    try:
        out = generate(loaded, labels, replace(run, reuse=ReuseConfig()), decider=decider).output
    finally:
        hooks.remove()
    x_rms = torch.stack([v.float().reshape(()) for v in decider.x_rms]).cpu().numpy().astype(np.float64)
    return FullCompute(decider.trace(), x_rms, hooks.host("change"), hooks.host("label"), out.images)


def rows_of(fc: FullCompute, num_layers: int, max_age: int, probe_feature: bool = False,
            names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Training rows of one generation: for evaluation e >= 1, age a, change span g, and every layer.

    `probe_feature`: also `log_probe_error`, the probe layer's age-1 change measured at e − 1 (what a policy reads at the
    start of e; `MISSING_CHANGE` at e = 1, where the probe has no change yet). `names`: the feature set (default:
    `FEATURES`, or `PROBE_FEATURES` with the probe feature); `BLOCK_FEATURES` reads no entropy or SNR.
    """
    names = tuple(names) if names is not None else (PROBE_FEATURES if probe_feature else FEATURES)
    probe_feature = probe_feature or "log_probe_error" in names
    e_count = fc.errors.shape[0]
    combos = []  # (e, a, g) with g = 0 where no change was measured at the source yet
    for e in range(1, e_count):
        for a in range(1, min(max_age, e) + 1):
            c = e - a
            spans = [g for g in range(1, max_age + 1) if c - g >= 0] or [0]
            combos += [(e, a, g) for g in spans]
    e_i, a_i, g_i = (np.array(v, dtype=np.int64) for v in zip(*combos))  # (K,) each
    c_i = e_i - a_i
    change = np.where((g_i > 0)[:, None], fc.change[c_i, :, np.maximum(g_i, 1) - 1], MISSING_CHANGE)  # (K, L)
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    feats = feature_matrix(
        entropy=t(fc.trace.entropy[c_i]), change=t(change), gap=t(np.maximum(g_i, 1)[:, None]).expand(len(e_i), num_layers),
        snr_scheduler=t(fc.trace.snr_scheduler[e_i]), snr_prediction=t(fc.trace.snr_prediction[e_i - 1]),
        x_rms=t(fc.x_rms[e_i]), step_fraction=t(e_i / max(e_count - 1, 1)), ages=t(a_i[:, None]), num_layers=num_layers,
        probe_error=t(np.where(e_i >= 2, fc.change[np.maximum(e_i - 1, 0), PROBE_LAYER, 0], MISSING_CHANGE)) if probe_feature else None,
        names=names,
    )  # (K, L, F)
    labels = fc.errors[e_i, :, a_i - 1]  # (K, L)
    grid = lambda v: np.broadcast_to(v[:, None], labels.shape).reshape(-1)  # noqa: E731
    return {"features": feats.reshape(-1, feats.shape[-1]).numpy(), "labels": labels.reshape(-1).astype(np.float32),
            "evaluation": grid(e_i), "age": grid(a_i), "layer": np.broadcast_to(np.arange(num_layers), labels.shape).reshape(-1)}


def flow_model_name(model: str | None) -> bool:
    """A model name known to load a flow model (embedded-flux, random Flux / SD3 shapes), before loading it."""
    from dqar.models import RANDOM_FLOW

    name = str(model or "")
    return name == "embedded-flux" or name.split("@")[0] in RANDOM_FLOW


def policy_refusal(model: str, family: str) -> DqarError:
    return DqarError(f"a policy with DiT features (attention entropy, attn1's change, gate_msa, DDPM SNR) runs on DiT "
                     f"BasicTransformerBlocks only, not on {model} ({family})",
                     f"collect a block-feature policy for it: dqar policy collect --model {model} --granularity block")


def granularity_for(model: str | None, given: str | None) -> str:
    """The policy granularity for `model` before loading it: `given`, else "block" on flow models and "attention" on the
    DiT; attention on a flow model is refused (its features are DiT signals)."""
    flow = flow_model_name(model)
    if given == "attention" and flow:
        raise policy_refusal(str(model), "a flow transformer")
    return given or ("block" if flow else "attention")


def check_policy_family(loaded, names: Sequence[str] = FEATURES) -> None:
    """Refuse a loaded model whose blocks are not DiT `BasicTransformerBlock`s for a feature set that reads DiT signals."""
    from dqar.engine.adapter import describe
    from dqar.engine.features import dit_only

    layout = describe(loaded.transformer)
    if dit_only(names) and not layout.dit_blocks:
        raise policy_refusal(loaded.name, layout.family)


def generation_labels(g: int, batch: int, num_classes: int) -> list[int]:
    """Generation g's labels: the classes cycled on from sample g * batch."""
    return cycle_labels(num_classes, batch, start=g * batch)


def collect_traces(loaded, settings: CollectSettings = CollectSettings(), progress: bool = True) -> PolicyTraces:
    """Full-compute generations of `settings.batch` samples each, turned into training rows."""
    check_policy_family(loaded, settings.names)
    from tqdm.auto import tqdm

    start = time.perf_counter()
    layers = num_layers_of(loaded)
    parts: list[dict[str, np.ndarray]] = []
    for g in tqdm(range(settings.generations), desc="collecting traces", disable=not progress):
        labels = generation_labels(g, settings.batch, loaded.num_classes)
        fc = computed(loaded, labels, settings.run(settings.seed + g * settings.batch), settings)
        rows = rows_of(fc, layers, settings.max_age, names=settings.names)
        rows["group"] = np.full(len(rows["labels"]), g, dtype=np.int64)
        parts.append(rows)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if settings.granularity == "block":
        label = BLOCK_LABEL.format(kind=settings.forecast_kind, order=settings.forecast_order)
    else:
        label = FORECAST_LABEL.format(order=settings.forecast_order) if settings.forecast_order else LABEL
    meta = {**trained_for(loaded, settings), "collect": asdict(settings), "label": label, "features": list(settings.names),
            "seconds": time.perf_counter() - start}
    return PolicyTraces(features=cat["features"].astype(np.float32), labels=cat["labels"], group=cat["group"],
                        evaluation=cat["evaluation"].astype(np.int64), layer=cat["layer"].astype(np.int64),
                        age=cat["age"].astype(np.int64), meta=meta)


def trained_for(loaded, settings: CollectSettings) -> dict[str, Any]:
    """What a policy trained on these traces is for (`PolicyDecider` refuses a run that differs)."""
    sampler = "flow" if getattr(loaded, "family", "dit") != "dit" else settings.sampler  # what the model really runs
    return {"model": loaded.name, "num_layers": num_layers_of(loaded), "sampler": sampler,
            "steps": settings.steps, "cfg": settings.cfg, "max_age": settings.max_age, "entropy_rows": settings.entropy_rows,
            "forecast_order": settings.forecast_order, "granularity": settings.granularity,
            "forecast_kind": settings.forecast_kind, "forecast_axis": "evaluation"}


def num_layers_of(loaded) -> int:
    """The layers reuse sees (every block list, in order: Flux's dual- then single-stream blocks)."""
    from dqar.engine.adapter import describe

    return len(describe(loaded.transformer).blocks)


def computed(loaded, labels: Sequence[int], run: RunConfig, settings: CollectSettings) -> FullCompute:
    """One full-compute generation's labels and signals: whole blocks (`block_labels`, any family) or DiT attention."""
    if settings.granularity == "block":
        from dqar.tuning.block_labels import block_full_compute

        return FullCompute(*block_full_compute(loaded, labels, run, settings.max_age))
    return full_compute(loaded, labels, run, settings.max_age, settings.entropy_rows)


# ----- proxy validation --------------------------------------------------------------------------
@dataclass(frozen=True)
class ValidateSettings:
    """Which reuse runs `validate_proxy` samples to the end."""

    groups: int = 32  # single cells and short runs of cells of one layer
    samples: int = 2  # images per run
    seed: int = 20_000  # sample i uses seed + i (not a training or evaluation seed)
    rng_seed: int = 0  # which cells


def choose_groups(num_evaluations: int, num_layers: int, max_age: int, count: int, rng_seed: int) -> list[tuple[int, int, int]]:
    """(last evaluation e, layer l, length a): layer l reuses at evaluations e-a+1..e from the output of e-a."""
    rng = np.random.default_rng(rng_seed)
    out = []
    for _ in range(count):
        e = int(rng.integers(1, num_evaluations))
        out.append((e, int(rng.integers(0, num_layers)), int(rng.integers(1, min(max_age, e) + 1))))
    return out


def validate_proxy(loaded, settings: CollectSettings, check: ValidateSettings = ValidateSettings(), progress: bool = True) -> dict:
    """Spearman correlation of the label (summed over a run's cells) with the final-image error of that run."""
    check_policy_family(loaded, settings.names)
    from scipy.stats import spearmanr
    from tqdm.auto import tqdm

    labels = cycle_labels(loaded.num_classes, check.samples)
    run = settings.run(check.seed)
    base = computed(loaded, labels, run, settings)
    e_count, l_count, _ = base.errors.shape
    rows = []
    for e, l, a in tqdm(choose_groups(e_count, l_count, settings.max_age, check.groups, check.rng_seed),
                        desc="validating the label", disable=not progress):
        mask = np.zeros((e_count, l_count), dtype=bool)
        mask[e - a + 1 : e + 1, l] = True
        proxy = float(sum(base.errors[e - a + j, l, j - 1] for j in range(1, a + 1)))
        change = float(sum(base.change[e - a + j, l, j - 1] for j in range(1, a + 1)))
        out = generate(loaded, labels, run, plan=Plan(mask)).output
        ref = base.images.double()
        final = float((out.images.double() - ref).norm() / ref.norm().clamp_min(1e-12))
        rows.append({"evaluation": e, "layer": l, "cells": a, "label_sum": proxy, "change_sum": change, "final_relative_error": final})
    final = np.array([r["final_relative_error"] for r in rows])
    single = np.array([r["cells"] == 1 for r in rows])
    every = np.ones(len(rows), dtype=bool)

    def rho(key: str, keep: np.ndarray) -> float | None:
        x = np.array([r[key] for r in rows])
        return float(spearmanr(x[keep], final[keep]).statistic) if keep.sum() >= 3 else None

    return {"spearman": rho("label_sum", every), "spearman_single_cells": rho("label_sum", single),
            "spearman_attention_change": rho("change_sum", every), "spearman_attention_change_single_cells": rho("change_sum", single),
            "single_cells": int(single.sum()), "groups": len(rows), "samples": check.samples, "seed": check.seed, "rows": rows}
