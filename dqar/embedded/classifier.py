"""A small Fashion-MNIST CNN: class accuracy and Fréchet-distance features for offline evaluation.

Usage: python -m dqar.embedded.classifier --out DIR --epochs E --seed S --threads T

Inputs are (N, 1, 28, 28) in [-1, 1] (the diffusion model's pixel space). `features(x)` returns the
penultimate activations (the input of the logits layer, after ReLU), `forward(x)` the logits.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dqar.errors import DqarError
from dqar.io import atomic_write_bytes, atomic_write_json
from dqar.embedded.data import NUM_CLASSES, load_split

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
STATS_FILE = "fmnist_test_stats.npz"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the CNN (saved in classifier.json)."""

    channels: tuple[int, int] = (32, 64)  # conv widths; each conv is followed by BN, ReLU, 2×2 max-pool
    feature_dim: int = 128  # penultimate width = Fréchet-distance feature size
    num_classes: int = NUM_CLASSES  # logits


class FashionCNN(nn.Module):
    """conv-BN-ReLU-pool ×2 → linear(feature_dim) → ReLU → linear(num_classes)."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        c1, c2 = cfg.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2 * 7 * 7, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) in [-1, 1] → (N, feature_dim) penultimate activations."""
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # (N, c1, 14, 14)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)  # (N, c2, 7, 7)
        return F.relu(self.fc(h.flatten(1)))  # (N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 28, 28) in [-1, 1] → (N, num_classes) logits."""
        return self.head(self.features(x))


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Apply `fn` to `x` in chunks and concatenate the results."""
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def accuracy(model: FashionCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of an eval-mode model on (N, 1, 28, 28) in [-1, 1]."""
    pred = batched(model, x).argmax(1)  # (N,)
    return float((pred == y).float().mean())


@torch.no_grad()
def feature_stats(model: FashionCNN, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D), float64, of the penultimate features."""
    f = batched(model.features, x).double().numpy()  # (N, D)
    return f.mean(0), np.cov(f, rowvar=False)


def train_classifier(
    out_dir,
    *,
    epochs: float = 3.0,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    data_dir=None,
    limit: int | None = None,
    test_limit: int | None = None,
    progress: bool = True,
    config: ClassifierConfig = ClassifierConfig(),
    command: str = "",
) -> dict:
    """Train the CNN, then write classifier.safetensors, classifier.json and fmnist_test_stats.npz."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    x, y = load_split("train", data_dir=data_dir, limit=limit)  # (N, 1, 28, 28), (N,)
    xt, yt = load_split("test", data_dir=data_dir, limit=test_limit)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FashionCNN(config)
    per_epoch = max(1, len(x) // batch_size)
    total = steps if steps is not None else int(round(epochs * per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    bar = _bar(total, progress)
    start, step, order = time.perf_counter(), 0, torch.empty(0, dtype=torch.long)
    model.train()
    while step < total:
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)  # new epoch
        idx = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - start
    acc = accuracy(model, xt, yt)
    mu, sigma = feature_stats(model, xt)

    atomic_write_bytes(out_dir / WEIGHTS_FILE, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, n=np.int64(len(xt)))
    atomic_write_bytes(out_dir / STATS_FILE, buf.getvalue())
    info = {
        "config": asdict(config),
        "test_accuracy": round(acc, 4),
        "test_images": len(xt),
        "steps": total,
        "epochs": round(total / per_epoch, 2),
        "batch_size": batch_size,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "features": "penultimate (post-ReLU input of the logits layer); inputs in [-1, 1]",
        "command": command,
    }
    atomic_write_json(out_dir / CONFIG_FILE, info)
    return info


def load_classifier(folder, device="cpu") -> FashionCNN:
    """The trained CNN from `folder` (classifier.json + classifier.safetensors), eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not (cfg_path.is_file() and w_path.is_file()):
        raise DqarError(
            f"classifier weights not found in {folder}",
            f"train them with `python -m dqar.embedded.classifier --out {folder}`",
        )
    raw = json.loads(cfg_path.read_text())["config"]
    cfg = ClassifierConfig(channels=tuple(raw["channels"]), feature_dim=raw["feature_dim"],
                           num_classes=raw["num_classes"])
    model = FashionCNN(cfg)
    model.load_state_dict(load_file(str(w_path)))
    return model.to(device).eval().requires_grad_(False)


def load_stats(path) -> dict:
    """Reference feature statistics {'mu': (D,), 'sigma': (D, D), 'n': int} from an .npz (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise DqarError(
            f"reference statistics not found at {path}",
            f"compute them with `python -m dqar.embedded.classifier --out {path.parent}`",
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"mu": z["mu"], "sigma": z["sigma"], "n": int(z["n"])}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # ValueError: an object array (a pickle)
        raise DqarError(f"cannot read reference statistics {path} ({str(exc).splitlines()[0][:200]})",
                        f"recompute them with `python -m dqar.embedded.classifier --out {path.parent}`") from None


def _bar(total, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dqar.embedded.classifier", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    command = "python -m dqar.embedded.classifier " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        info = train_classifier(args.out, epochs=args.epochs, seed=args.seed, batch_size=args.batch_size,
                                data_dir=args.data, progress=not args.no_progress, command=command)
    except DqarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"test accuracy {info['test_accuracy']:.4f} after {info['epochs']} epochs ({info['train_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
