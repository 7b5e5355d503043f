"""Train the embedded class-conditional pixel-space DiT on Fashion-MNIST (DDPM epsilon objective).

Usage: python -m dqar.embedded.train --out DIR --minutes M --seed S --threads T [--resume]

Design notes (docs/EMBEDDED.md, DESIGN.md §5b):
- the model is kept in `eval()` mode while training: diffusers' DiT gives every block its own
  label embedding with its own dropout, so labels are dropped to the null id *outside* the model;
- an EMA of the weights is what gets saved, in a diffusers layout (`transformer/`, `scheduler/`);
- a checkpoint (`train_state.pt`, loaded with `weights_only=True`) lets a killed run `--resume`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dqar.device import resolve_device
from dqar.errors import DqarError
from dqar.io import atomic_write_json, atomic_write_text
from dqar.embedded.data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, load_split
from dqar.embedded.loop import start_progress, train_loop

STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.json"


@dataclass(frozen=True)
class EmbeddedModelConfig:
    """Shape of the embedded DiT (diffusers `DiTTransformer2DModel`)."""

    sample_size: int = IMAGE_SIZE  # pixels per side; the model works in pixel space
    patch_size: int = 4  # 28 / 4 = 7 → 49 tokens
    in_channels: int = 1  # grey images
    num_layers: int = 8  # transformer blocks
    heads: int = 4  # attention heads
    head_dim: int = 32  # width = heads * head_dim = 128
    num_classes: int = NUM_CLASSES  # null (unconditional) class id == num_classes

    def build(self) -> nn.Module:
        """A freshly initialised model (DiT-style init), in eval mode."""
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(
            num_attention_heads=self.heads,
            attention_head_dim=self.head_dim,
            in_channels=self.in_channels,
            out_channels=self.in_channels,  # epsilon only, no learned sigma
            num_layers=self.num_layers,
            sample_size=self.sample_size,
            patch_size=self.patch_size,
            num_embeds_ada_norm=self.num_classes,
            norm_type="ada_norm_zero",
            norm_num_groups=1,
        )
        dit_init_(model)
        return model.eval()


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; saved into train_log.json."""

    seed: int = 0  # seeds init, batches, timesteps, noise and label dropout
    batch_size: int = 64  # images per step
    lr: float = 3e-4  # AdamW peak learning rate
    warmup_steps: int = 200  # linear learning-rate warmup
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip
    ema_decay: float = 0.999  # EMA of weights (warmed up as min(decay, (1+n)/(10+n)))
    label_drop: float = 0.1  # probability of training a sample with the null class
    log_every: int = 50  # steps between loss-curve points
    checkpoint_every_s: float = 120.0  # seconds between resumable checkpoints
    num_train_timesteps: int = 1000  # DDPM steps
    beta_start: float = 0.0001  # linear beta schedule start
    beta_end: float = 0.02  # linear beta schedule end


def dit_init_(model: nn.Module) -> None:
    """DiT's initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN modulation and output."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.pos_embed.proj  # patch embedding conv, initialised like a linear layer
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def make_train_scheduler(cfg: TrainConfig):
    """The DDPM noise schedule used for training."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule="linear",
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
    )


def make_sample_scheduler(cfg: TrainConfig):
    """The shipped sampling scheduler: DDIM with the training betas and clip_sample=False (DESIGN.md §5b)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule="linear",
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        clip_sample=False,
        prediction_type="epsilon",
    )


def training_loss(model, x0, labels, gen, alphas_cumprod, cfg: TrainConfig) -> torch.Tensor:
    """DDPM epsilon MSE on one batch; labels are dropped to the null id outside the model."""
    n, dev = x0.shape[0], x0.device
    t = torch.randint(0, cfg.num_train_timesteps, (n,), generator=gen).to(dev)  # (N,)
    noise = torch.randn(x0.shape, generator=gen).to(dev)  # (N, 1, H, W)
    drop = (torch.rand(n, generator=gen) < cfg.label_drop).to(dev)  # (N,)
    y = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)  # (N,)
    a = alphas_cumprod[t].view(n, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise  # (N, 1, H, W)
    pred = model(xt, timestep=t, class_labels=y, return_dict=False)[0]  # (N, 1, H, W)
    return F.mse_loss(pred, noise)


def save_weights(out_dir: Path, ema: nn.Module, cfg: TrainConfig) -> None:
    """Write OUT/transformer (safetensors), OUT/scheduler/scheduler_config.json and OUT/class_names.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final, tmp, old = out_dir / "transformer", out_dir / ".transformer.tmp", out_dir / ".transformer.old"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    ema.save_pretrained(tmp, safe_serialization=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    sched = make_sample_scheduler(cfg)
    atomic_write_text(out_dir / "scheduler" / "scheduler_config.json", sched.to_json_string())
    atomic_write_json(out_dir / "class_names.json", list(CLASS_NAMES))


def _write_log(out_dir: Path, progress: dict, cfg: TrainConfig, mcfg: EmbeddedModelConfig, n_params: int, done: bool):
    log = {
        "command": progress["command"],
        "seed": cfg.seed,
        "steps": progress["step"],
        "minutes": round(progress["elapsed_s"] / 60.0, 2),
        "cpu_minutes": None if progress.get("cpu_s") is None else round(progress["cpu_s"] / 60.0, 2),
        "final_loss": progress["ema_loss"],
        "finished": done,
        "threads": torch.get_num_threads(),
        "device": progress.get("device", "cpu"),
        "parameters": n_params,
        "train_config": asdict(cfg),
        "model_config": asdict(mcfg),
        "loss_curve": progress["curve"],
    }
    atomic_write_json(out_dir / LOG_FILE, log)


def train_embedded(
    out_dir,
    *,
    minutes: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    data_dir=None,
    limit: int | None = None,
    progress: bool = True,
    resume: bool = False,
    keep_checkpoint: bool = False,
    model_config: EmbeddedModelConfig | None = None,
    train_config: TrainConfig | None = None,
    command: str | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train (or resume) until `minutes` of wall-clock or `steps` steps; returns the train_log dict.

    `train_config`, when given, replaces `seed` and `batch_size`. Random draws come from one CPU
    generator whatever the `device`, so the batches, timesteps and noise do not depend on it.
    The learning rate is constant after warm-up, so a `--minutes` run equals a `--steps N` run
    with the N it reached.
    """
    if minutes is None and steps is None:
        raise DqarError("no stopping rule for training", "pass --minutes M or --steps N")
    out_dir = Path(out_dir)
    mcfg = model_config or EmbeddedModelConfig()
    cfg = train_config or TrainConfig(seed=seed, batch_size=batch_size)
    device = torch.device(device)
    x_all, y_all = load_split("train", data_dir=data_dir, limit=limit)  # (N, 1, 28, 28), (N,)
    x_all, y_all = x_all.to(device), y_all.to(device)

    torch.manual_seed(cfg.seed)
    model = mcfg.build().to(device)  # stays in eval(): no in-model label dropout
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    alphas_cumprod = make_train_scheduler(cfg).alphas_cumprod.float().to(device)  # (T,)
    n_params = sum(p.numel() for p in model.parameters())

    state_path = out_dir / STATE_FILE
    prog = start_progress(state_path, model, ema, opt, gen, device, command, resume)
    out_dir.mkdir(parents=True, exist_ok=True)

    def loss_at() -> torch.Tensor:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen).to(device)  # (B,)
        return training_loss(model, x_all[idx], y_all[idx], gen, alphas_cumprod, cfg)

    def write(done: bool) -> None:
        save_weights(out_dir, ema, cfg)
        _write_log(out_dir, prog, cfg, mcfg, n_params, done=done)

    train_loop(model, ema, opt, gen, cfg, prog, state_path, loss_at=loss_at, write=write, minutes=minutes, steps=steps,
               progress=progress, keep_checkpoint=keep_checkpoint)
    return json.loads((out_dir / LOG_FILE).read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dqar.embedded.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (diffusers layout)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget in minutes")
    p.add_argument("--steps", type=int, default=None, help="number of optimisation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="AdamW peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps, help="linear learning-rate warmup")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N; random draws stay on the CPU generator")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/train_state.pt after finishing")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p


def _bad_flag(args) -> str | None:
    """The first out-of-range optimiser flag, described; None when all are valid."""
    if not (args.lr > 0 and math.isfinite(args.lr)):
        return f"--lr {args.lr} is not a positive number; pass a rate such as --lr 1e-3"
    if args.warmup_steps < 0:
        return f"--warmup-steps {args.warmup_steps} is negative; pass 0 or more"
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size} is below 1; pass a batch such as --batch-size 64"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    bad = _bad_flag(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    cfg = TrainConfig(seed=args.seed, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps)
    command = "python -m dqar.embedded.train " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        log = train_embedded(
            args.out, minutes=args.minutes, steps=args.steps, train_config=cfg,
            data_dir=args.data, limit=args.limit, progress=not args.no_progress, resume=args.resume,
            keep_checkpoint=args.keep_checkpoint, command=command, device=resolve_device(args.device),
        )
    except DqarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {log['steps']} steps in {log['minutes']} min, final loss {log['final_loss']:.4f} → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
