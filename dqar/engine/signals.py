"""Signals the reuse gate and calibration read: SNR, attention entropy, relative change of outputs.

Everything is computed on the device as 0-dim tensors and kept there: nothing here reads a
value back to the host. `SignalRecorder` holds one generation's signals; `Trace` is the host
copy made once, after the generation.

- scheduler SNR: `ᾱ_t / (1 - ᾱ_t)`, ᾱ gathered from the scheduler's `alphas_cumprod` with the
  timestep tensor the transformer receives;
- prediction SNR: `‖x̂0‖² / (‖x_t - x̂0‖² + ε)` from the model output;
- attention entropy: `-1/(H·R) Σ A log(A + ε)` over a fixed subsample of R query rows (all heads,
  all batch rows), divided by log T so it lies in [0, 1];
- relative change: `‖o_new - o_cached‖ / ‖o_cached‖` when a layer recomputes (with `change_of_reuse`,
  `o_cached` is what a reuse would read now: the forecast from the layer's history, a copy at order 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dqar.engine.attention import attend, project, split_heads
from dqar.errors import DqarError

ENTROPY_EPS = 1e-12
SNR_EPS = 1e-12
SNR_SOURCES = ("scheduler", "prediction")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class Needs:
    """What the engine must measure for a decider."""

    entropy: bool = False  # entropy of every computed attention
    change: bool = False  # relative change of every computed output against its cached value
    change_of_reuse: bool = False  # measure the change against what a reuse would read now (the forecast where forecast_order > 0)
    snr: tuple[str, ...] = ()  # SNR sources: "scheduler", "prediction"
    entropy_rows: int = 16  # query rows in the entropy subsample
    record: bool = False  # keep every (evaluation, layer) value for a `Trace`
    state_norm: bool = False  # RMS of each evaluation's input x_t

    @property
    def any(self) -> bool:
        return self.entropy or self.change or bool(self.snr) or self.record or self.state_norm


# ----- SNR ------------------------------------------------------------------------------------
def dit_alphas_cumprod(num_train_timesteps: int = 1000) -> torch.Tensor:
    """ᾱ of DiT's training schedule (linear betas 1e-4..0.02), used when no scheduler is known."""
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


def alphas_cumprod_of(scheduler: Any) -> torch.Tensor:
    """The scheduler's ᾱ as float32 (num_train_timesteps,), or DiT's when there is none."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return dit_alphas_cumprod()
    return torch.as_tensor(alphas).detach().float().cpu()


def prediction_type_of(scheduler: Any) -> str:
    config = getattr(scheduler, "config", None)
    kind = getattr(config, "prediction_type", None) or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise DqarError(f"prediction SNR does not know prediction_type '{kind}'", "use snr_source = 'scheduler'")
    return kind


def alpha_bar_at(alphas: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """ᾱ at the first timestep of the batch, gathered on the device: () float32."""
    idx = timestep.reshape(-1)[:1].long().clamp(0, alphas.numel() - 1)  # (1,)
    return alphas.index_select(0, idx).reshape(())


def scheduler_snr(alpha_bar: torch.Tensor) -> torch.Tensor:
    """ᾱ / (1 - ᾱ): () float32."""
    return alpha_bar / (1.0 - alpha_bar).clamp_min(SNR_EPS)


def predicted_x0(x_t: torch.Tensor, model_out: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x̂0 from the model output; `model_out` may carry extra (learned-variance) channels after x_t's."""
    pred = model_out[:, : x_t.shape[1]].float()  # (B, C, h, w)
    x = x_t.float()
    a = alpha_bar.float()
    if prediction_type == "epsilon":
        return (x - (1 - a).sqrt() * pred) / a.sqrt().clamp_min(SNR_EPS)
    if prediction_type == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * pred
    return pred


def prediction_snr(x_t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """‖x̂0‖² / (‖x_t - x̂0‖² + ε) over the whole batch: () float32."""
    return x0.pow(2).sum() / ((x_t.float() - x0).pow(2).sum() + SNR_EPS)


# ----- entropy --------------------------------------------------------------------------------
def subsample_rows(tokens: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` evenly spaced query rows out of `tokens` (all rows when count >= tokens): (R,) int64."""
    if count >= tokens:
        return torch.arange(tokens, device=device)
    rows = np.unique(np.round(np.linspace(0, tokens - 1, count)).astype(np.int64))
    return torch.as_tensor(rows, device=device)


def normalized_entropy(q_rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention entropy of the given query rows over log T: q_rows (B, H, R, D), k (B, H, T, D) → ()."""
    t = k.shape[-2]
    logits = torch.matmul(q_rows.float(), k.float().transpose(-1, -2)) * scale  # (B, H, R, T)
    probs = logits.softmax(dim=-1)
    ent = -(probs * torch.log(probs + ENTROPY_EPS)).sum(-1)  # (B, H, R)
    return ent.mean() / math.log(t) if t > 1 else ent.mean() * 0.0


def is_plain_attention(attn: torch.nn.Module) -> bool:
    """True for the self-attention DiT uses: no extra norms, no residual, no rescaling."""
    return (
        getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None
        and getattr(attn, "group_norm", None) is None and getattr(attn, "spatial_norm", None) is None
        and not getattr(attn, "residual_connection", False) and getattr(attn, "rescale_output_factor", 1.0) == 1.0
    )


def attention_entropy(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Normalized entropy of the attention map of projected Q, K (B, T, C) over the query `rows`: ()."""
    q4, k4 = split_heads(q, attn.heads), split_heads(k, attn.heads)  # (B, H, T, D)
    return normalized_entropy(q4.index_select(2, rows), k4, q4.shape[-1] ** -0.5)


def attention_with_entropy(attn: torch.nn.Module, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of `x` (B, T, C) with diffusers' SDPA math, and the entropy of the `rows` subsample."""
    q, k, v = project(attn, x)  # (B, T, C) each
    return attend(attn, q, k, v), attention_entropy(attn, q, k, rows)


def relative_change(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """‖new - old‖ / ‖old‖ over the whole tensor: () float32."""
    old = old.float()
    return (new.float() - old).norm() / old.norm().clamp_min(1e-12)


# ----- one generation's signals ----------------------------------------------------------------
class SignalRecorder:
    """One generation's signals on the device; the gate reads the latest, a `Trace` reads them all."""

    def __init__(self, needs: Needs, num_evaluations: int, num_layers: int, scheduler: Any = None):
        self.needs = needs
        self.num_evaluations = num_evaluations
        self.num_layers = num_layers
        self.alphas_host = alphas_cumprod_of(scheduler)  # (num_train_timesteps,) float32, CPU
        self.prediction_type = prediction_type_of(scheduler) if "prediction" in needs.snr or needs.record else "epsilon"
        self._alphas: dict[torch.device, torch.Tensor] = {}
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.entropy_last: list[torch.Tensor | None] = [None] * num_layers  # () per layer
        self.change_last: list[torch.Tensor | None] = [None] * num_layers  # () per layer, latest measured change
        self.x_norm: torch.Tensor | None = None  # RMS of the current evaluation's input x_t, ()
        self.snr: dict[str, torch.Tensor] = {}  # latest SNR per source, ()
        self.alpha_bar: torch.Tensor | None = None  # ᾱ of the current evaluation, ()
        self.evaluation = -1
        self.device = torch.device("cpu")  # the device of the current evaluation's input
        self.host_syncs = 0  # reads made by a decider from these signals
        self._log: dict[str, list] = {"entropy": [], "change": [], "snr_scheduler": [], "snr_prediction": []}

    def alphas(self, device: torch.device) -> torch.Tensor:
        if device not in self._alphas:
            self._alphas[device] = self.alphas_host.to(device)  # once per generation and device
        return self._alphas[device]

    def rows(self, tokens: int, device: torch.device) -> torch.Tensor:
        key = (tokens, device)
        if key not in self._rows:
            self._rows[key] = subsample_rows(tokens, self.needs.entropy_rows, device)
        return self._rows[key]

    # evaluation boundaries ----------------------------------------------------------------
    def begin_evaluation(self, evaluation: int, timestep: Any, device: torch.device, hidden: torch.Tensor | None = None) -> None:
        """Before evaluation `evaluation`: ᾱ and the scheduler SNR of the timestep it receives (and the RMS of its input)."""
        self.evaluation = evaluation
        self.device = device
        if self.needs.state_norm and hidden is not None:
            self.x_norm = hidden.float().pow(2).mean().sqrt()  # ()
        if self.needs.record:
            for name, log in self._log.items():
                log.append([None] * self.num_layers if name in ("entropy", "change") else None)
        if timestep is None or not (self.needs.snr or self.needs.record):
            return
        t = torch.as_tensor(timestep, device=device)
        self.alpha_bar = alpha_bar_at(self.alphas(device), t)
        if "scheduler" in self.needs.snr or self.needs.record:
            self.put_snr("scheduler", scheduler_snr(self.alpha_bar))

    def end_evaluation(self, x_t: torch.Tensor, model_out: torch.Tensor) -> None:
        """After the evaluation: the prediction SNR of its output (used by the next evaluation)."""
        if self.alpha_bar is None or not ("prediction" in self.needs.snr or self.needs.record):
            return
        x0 = predicted_x0(x_t, model_out, self.alpha_bar, self.prediction_type)
        self.put_snr("prediction", prediction_snr(x_t, x0))

    # per layer (hot path: a list store each) --------------------------------------------
    def put_entropy(self, layer: int, value: torch.Tensor) -> None:
        self.entropy_last[layer] = value
        if self.needs.record:
            self._log["entropy"][-1][layer] = value

    def put_change(self, layer: int, value: torch.Tensor) -> None:
        self.change_last[layer] = value
        if self.needs.record:
            self._log["change"][-1][layer] = value

    def put_snr(self, source: str, value: torch.Tensor) -> None:
        self.snr[source] = value
        if self.needs.record:
            self._log[f"snr_{source}"][-1] = value

    # reads ---------------------------------------------------------------------------------
    def entropy_vector(self, device: torch.device) -> torch.Tensor:
        """Latest entropy per layer (L,), 1.0 (never reusable) where none was measured yet."""
        one = torch.ones((), device=device)
        return torch.stack([one if v is None else v.to(device) for v in self.entropy_last])

    def trace(self) -> "Trace":
        """Host copy of everything recorded (one read, after the generation)."""
        if not self.needs.record:
            raise DqarError("signals were not recorded for this generation", "record a trace with dqar.tuning.calibrate.record_trace")
        return Trace.from_log(self._log, self.num_layers)


@dataclass(frozen=True)
class Trace:
    """Signals of one generation, on the host; NaN where a value was not measured."""

    entropy: np.ndarray  # (E, L) normalized attention entropy
    change: np.ndarray  # (E, L) relative change against the cached (full compute: previous) output, or its forecast
    snr_scheduler: np.ndarray  # (E,) ᾱ/(1-ᾱ) at each evaluation's timestep
    snr_prediction: np.ndarray  # (E,) ‖x̂0‖²/‖x_t-x̂0‖² of each evaluation's output

    @classmethod
    def from_log(cls, log: dict[str, list], num_layers: int) -> "Trace":
        values, slots = [], {}
        for name in ("entropy", "change"):
            for e, row in enumerate(log[name]):
                for l, v in enumerate(row):
                    if v is not None:
                        slots[(name, e, l)] = len(values)
                        values.append(v.float().reshape(()))
        for name in ("snr_scheduler", "snr_prediction"):
            for e, v in enumerate(log[name]):
                if v is not None:
                    slots[(name, e)] = len(values)
                    values.append(v.float().reshape(()))
        host = torch.stack([v.to(values[0].device) for v in values]).cpu().numpy() if values else np.zeros(0)
        e = len(log["entropy"])
        grids = {n: np.full((e, num_layers), np.nan) for n in ("entropy", "change")}
        lines = {n: np.full(e, np.nan) for n in ("snr_scheduler", "snr_prediction")}
        for key, i in slots.items():
            if len(key) == 3:
                grids[key[0]][key[1], key[2]] = host[i]
            else:
                lines[key[0]][key[1]] = host[i]
        return cls(**grids, **lines)

    def to_dict(self) -> dict:
        clean = lambda a: [None if not np.isfinite(v) else float(v) for v in np.asarray(a).reshape(-1)]  # noqa: E731
        e, l = self.entropy.shape
        return {
            "shape": [e, l],
            "entropy": clean(self.entropy), "change": clean(self.change),
            "snr_scheduler": clean(self.snr_scheduler), "snr_prediction": clean(self.snr_prediction),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Trace":
        e, l = data["shape"]
        arr = lambda k, shape: np.array([np.nan if v is None else v for v in data[k]], dtype=np.float64).reshape(shape)  # noqa: E731
        return cls(entropy=arr("entropy", (e, l)), change=arr("change", (e, l)),
                   snr_scheduler=arr("snr_scheduler", (e,)), snr_prediction=arr("snr_prediction", (e,)))
