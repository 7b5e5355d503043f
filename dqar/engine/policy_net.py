"""The policy network (a small MLP predicting the log relative error of a reuse) and its safetensors checkpoint.

A checkpoint holds the MLP weights, the feature normalization (mean/std, shape (F,)), the target
normalization, and as metadata the configuration it was trained for (model, layers, sampler,
steps, guidance, feature names, the label's definition). Loading reads safetensors only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dqar.errors import DqarError
from dqar.engine.features import FEATURE_SETS, FEATURES

POLICY_FORMAT = "dqar-policy/1"
FIX = "train one with `dqar policy train` or point policy at a .safetensors file it wrote"


class PolicyNet(nn.Module):
    """MLP: F standardized features → predicted standardized log relative error."""

    def __init__(self, num_features: int = len(FEATURES), hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        dims = (num_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(dims[-1], 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)  # (..., F) -> (...)


def num_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@dataclass(frozen=True)
class PolicyCheckpoint:
    """A trained policy: network, normalization, and what it was trained for."""

    net: PolicyNet
    feature_mean: torch.Tensor  # (F,)
    feature_std: torch.Tensor  # (F,)
    target_mean: float  # of the log relative error
    target_std: float
    meta: dict[str, Any] = field(default_factory=dict)  # trained-for config, hidden sizes, label definition

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted log relative error (...,) of features (..., F); float32 on the features' device."""
        mean, std = self.feature_mean.to(features.device), self.feature_std.to(features.device)
        z = self.net((features.float() - mean) / std)
        return z * self.target_std + self.target_mean

    def to(self, device: torch.device | str) -> "PolicyCheckpoint":
        """A copy on `device` (the network is copied; this one is unchanged)."""
        net = PolicyNet(len(self.meta.get("features", FEATURES)), tuple(self.meta.get("hidden", (64, 64))))
        net.load_state_dict(self.net.state_dict())
        return PolicyCheckpoint(net.to(device).eval().requires_grad_(False), self.feature_mean.to(device),
                                self.feature_std.to(device), self.target_mean, self.target_std, dict(self.meta))


def save_policy(ckpt: PolicyCheckpoint, path: str | Path) -> None:
    """Write a checkpoint as safetensors (tensors + JSON metadata), atomically."""
    from safetensors.torch import save

    from dqar.io import atomic_write_bytes

    tensors = {f"net.{k}": v.detach().float().cpu().contiguous() for k, v in ckpt.net.state_dict().items()}
    tensors["feature_mean"] = ckpt.feature_mean.float().cpu().contiguous()
    tensors["feature_std"] = ckpt.feature_std.float().cpu().contiguous()
    tensors["target"] = torch.tensor([ckpt.target_mean, ckpt.target_std], dtype=torch.float32)
    meta = {"format": POLICY_FORMAT, "meta": json.dumps(ckpt.meta, sort_keys=True)}
    atomic_write_bytes(Path(path), save(tensors, metadata=meta))


def load_policy(path: str | Path) -> PolicyCheckpoint:
    """Read a checkpoint written by `save_policy`; anything else is a one-line `DqarError`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DqarError(f"policy file '{path}' does not exist", FIX)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for foreign or truncated files
        raise DqarError(f"policy file '{path}' is not a safetensors file ({type(exc).__name__})", FIX) from None
    if header.get("format") != POLICY_FORMAT:
        raise DqarError(f"policy file '{path}' has format {header.get('format')!r}, expected {POLICY_FORMAT!r}", FIX)
    try:
        meta = json.loads(header["meta"])
        names = tuple(meta["features"])
        if names not in FEATURE_SETS:
            raise ValueError(f"features {list(names)} are none of this version's sets {[list(f) for f in FEATURE_SETS]}")
        net = PolicyNet(len(names), tuple(int(h) for h in meta["hidden"]))
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")}, strict=True)
        target = tensors["target"]
        ckpt = PolicyCheckpoint(net.eval().requires_grad_(False), tensors["feature_mean"], tensors["feature_std"],
                                float(target[0]), float(target[1]), meta)
        if ckpt.feature_mean.shape != (len(names),) or ckpt.feature_std.shape != (len(names),):
            raise ValueError("feature normalization has the wrong shape")
    except (KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise DqarError(f"policy file '{path}' is not a valid dqar policy ({str(exc).splitlines()[0][:200]})", FIX) from None
    return ckpt
