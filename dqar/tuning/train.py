"""Training the policy MLP on collected traces: regression of the log measured reuse error.

Generations (= seeds) are split into training and held-out sets, never cells of one generation
across both. Features and the target are standardized with the training split's mean/std, which
the checkpoint keeps. Every epoch logs the training and held-out loss; the held-out metrics
include the decision quality of "reuse where the prediction is at most τ" for τ at a few label
quantiles, next to a one-feature baseline (the last measured change rate times the age).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from dqar.errors import DqarError
from dqar.tuning.collect import PolicyTraces
from dqar.engine.features import FEATURES, LOG_FLOOR
from dqar.engine.policy_net import PolicyCheckpoint, PolicyNet, num_parameters

def check_trained_for(meta: dict, model: str | None) -> None:
    """Refuse a policy whose metadata names another model than `model` (None: the embedded DiT)."""
    trained, want = meta.get("model"), str(model or "embedded")
    if trained is None or trained == want:
        return
    raise DqarError(f"the policy was trained for model {trained!r} but this run uses {want!r}",
                    f"train one for it: dqar policy collect --model {want}, then dqar policy train")


QUANTILES = (0.3, 0.45, 0.6)  # held-out decisions are scored at these quantiles of the measured labels
MAX_PARAMETERS = 500_000


@dataclass(frozen=True)
class TrainSettings:
    """How the MLP is trained."""

    hidden: tuple[int, ...] = (64, 64)  # hidden layer widths
    epochs: int = 30
    batch_size: int = 1024
    lr: float = 3e-3
    weight_decay: float = 1e-5
    holdout: float = 0.2  # fraction of generations held out
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise DqarError(f"hidden = {self.hidden} is invalid", "use positive layer widths, e.g. --hidden 64 64")
        if not 0.0 < self.holdout < 1.0:
            raise DqarError(f"holdout = {self.holdout} is out of range", "use a fraction in (0, 1), e.g. 0.2")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise DqarError(f"{name} = {getattr(self, name)} is invalid", "use an integer >= 1")
        if not self.lr > 0:
            raise DqarError(f"lr = {self.lr} is invalid", "use a learning rate > 0")


@dataclass(frozen=True)
class TrainResult:
    checkpoint: PolicyCheckpoint
    report: dict  # curve, held-out metrics, parameter count, split


def split_groups(groups: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out generation ids (at least one of each)."""
    ids = np.unique(groups)
    if len(ids) < 2:
        raise DqarError(f"traces hold {len(ids)} generation(s); a held-out split needs at least 2",
                        "collect more generations (--generations)")
    ids = np.random.default_rng(seed).permutation(ids)
    n_hold = min(max(1, int(round(holdout * len(ids)))), len(ids) - 1)
    return np.sort(ids[n_hold:]), np.sort(ids[:n_hold])


def log_target(labels: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(labels.astype(np.float64), LOG_FLOOR))


def decision_metrics(pred_log: np.ndarray, labels: np.ndarray) -> dict:
    """At τ = the q-quantile of the labels: how well "reuse where predicted error <= τ" matches "measured error <= τ"."""
    out = {}
    for q in QUANTILES:
        tau = float(np.quantile(labels, q))
        say, safe = pred_log <= np.log(max(tau, LOG_FLOOR)), labels <= tau
        tp = int((say & safe).sum())
        out[str(q)] = {
            "tau": tau,
            "accuracy": float((say == safe).mean()),
            "precision": tp / int(say.sum()) if say.any() else None,  # of predicted-safe reuses, the share truly safe
            "recall": tp / int(safe.sum()) if safe.any() else None,
            "predicted_safe": float(say.mean()), "truly_safe": float(safe.mean()),
        }
    return out


def heldout_metrics(pred_log: np.ndarray, traces: PolicyTraces) -> dict:
    from scipy.stats import spearmanr

    y = log_target(traces.labels)
    names = list(traces.meta.get("features", FEATURES))
    naive = traces.features[:, names.index("log_change_rate")] + np.log(traces.features[:, names.index("age")])
    return {
        "rows": len(y),
        "mse_log": float(np.mean((pred_log - y) ** 2)),
        "variance_log": float(np.var(y)),
        "r2_log": float(1 - np.mean((pred_log - y) ** 2) / max(np.var(y), 1e-12)),
        "spearman": float(spearmanr(pred_log, y).statistic),
        "spearman_naive": float(spearmanr(naive, y).statistic),  # last change rate x age, no learning
        "decisions": decision_metrics(pred_log, traces.labels),
    }


def _predict(ckpt: PolicyCheckpoint, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ckpt.predict(torch.as_tensor(features)).double().numpy()


def _loss(net: PolicyNet, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net(x), y))


def train_policy(traces: PolicyTraces, settings: TrainSettings = TrainSettings(), progress: bool = True) -> TrainResult:
    """Fit the MLP; returns the checkpoint and a JSON-ready report."""
    from tqdm.auto import trange

    train_ids, hold_ids = split_groups(traces.group, settings.holdout, settings.seed)
    train, hold = traces.subset(np.isin(traces.group, train_ids)), traces.subset(np.isin(traces.group, hold_ids))
    x, y = torch.as_tensor(train.features, dtype=torch.float32), torch.as_tensor(log_target(train.labels), dtype=torch.float32)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # (F,)
    t_mean, t_std = float(y.mean()), max(float(y.std()), 1e-6)
    torch.manual_seed(settings.seed)
    net = PolicyNet(train.features.shape[1], settings.hidden)  # the traces' feature set (features.FEATURE_SETS)
    params = num_parameters(net)
    if params >= MAX_PARAMETERS:
        raise DqarError(f"the MLP has {params} parameters", f"use smaller --hidden widths (limit {MAX_PARAMETERS})")
    ckpt = PolicyCheckpoint(net, mean, std, t_mean, t_std, {**traces.meta, "hidden": list(settings.hidden)})
    xz, yz = (x - mean) / std, (y - t_mean) / t_std
    hx = (torch.as_tensor(hold.features, dtype=torch.float32) - mean) / std
    hy = (torch.as_tensor(log_target(hold.labels), dtype=torch.float32) - t_mean) / t_std
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.epochs)
    gen = torch.Generator().manual_seed(settings.seed)
    curve = [{"epoch": 0, "train_loss": _loss(net, xz, yz), "heldout_loss": _loss(net, hx, hy)}]  # before training
    for epoch in trange(settings.epochs, desc="training policy", disable=not progress):
        net.train()
        total = 0.0
        for idx in torch.randperm(len(xz), generator=gen).split(settings.batch_size):
            loss = torch.nn.functional.mse_loss(net(xz[idx]), yz[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        curve.append({"epoch": epoch + 1, "train_loss": total / len(xz), "heldout_loss": _loss(net, hx, hy)})
    net.eval().requires_grad_(False)
    report = {
        "parameters": params, "settings": asdict(settings), "trained_for": {k: v for k, v in traces.meta.items() if k not in ("collect", "seconds")},
        "collect_seconds": traces.meta.get("seconds"),
        "collect": traces.meta.get("collect"),
        "split": {"train_generations": train_ids.tolist(), "heldout_generations": hold_ids.tolist(),
                  "train_rows": len(train), "heldout_rows": len(hold)},
        "loss": "MSE of the standardized log relative error", "curve": curve,
        "heldout": heldout_metrics(_predict(ckpt, hold.features), hold),
    }
    return TrainResult(ckpt, report)
