"""Train the embedded Flux on Fashion-MNIST with rectified flow (the velocity objective).

Usage: python -m dqar.embedded.flux_train --out DIR (--minutes M | --steps N) --seed S --threads T [--resume]

Design notes (docs/EMBEDDED.md, "The embedded Flux"):
- x_s = (1 - s) x0 + s ε with s = sigmoid(n), n ~ N(0, 1) (logit-normal), target v = ε - x0; the transformer gets
  `timestep = s` (it multiplies by 1000 itself, as FluxPipeline's t / 1000 undoes);
- the prompt table (10 class prompts + the null prompt) trains with the transformer; a label is replaced by the
  null prompt with probability `label_drop`, so true CFG has an unconditional branch;
- an EMA of transformer and prompts is what is saved: OUT/config.json + diffusion_pytorch_model.safetensors
  (diffusers layout), OUT/prompts.safetensors, OUT/scheduler_config.json, OUT/train_log.json;
- a checkpoint (`flux_train_state.pt`, loaded with `weights_only=True`) lets a killed run `--resume`.
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

from dqar.device import resolve_device
from dqar.errors import DqarError
from dqar.io import atomic_write_bytes, atomic_write_json
from dqar.embedded.data import CLASS_NAMES, load_split
from dqar.embedded.flux import (
    MODEL_FILES, NULL_PROMPT_ID, PROMPTS_FILE, SCHEDULER_FILE, EmbeddedFlux, FluxModelConfig, image_ids,
    model_config_dict, pack_images, scheduler_config,
)
from dqar.embedded.loop import start_progress, train_loop

STATE_FILE = "flux_train_state.pt"
LOG_FILE = "train_log.json"


@dataclass(frozen=True)
class FluxTrainConfig:
    """Optimisation settings; saved into train_log.json."""

    seed: int = 0  # seeds init, batches, timesteps, noise and label dropout
    batch_size: int = 32  # images per step
    lr: float = 1e-3  # AdamW peak learning rate
    warmup_steps: int = 200  # linear learning-rate warmup, then constant
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # global gradient-norm clip
    ema_decay: float = 0.999  # EMA of weights (warmed up as min(decay, (1+n)/(10+n)))
    label_drop: float = 0.1  # probability of training a sample with the null prompt
    logit_mean: float = 0.0  # s = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0
    log_every: int = 50  # steps between loss-curve points
    checkpoint_every_s: float = 180.0  # seconds between resumable checkpoints and weight refreshes


def training_loss(net: EmbeddedFlux, x0, labels, gen, cfg: FluxTrainConfig, img_ids, txt_ids) -> torch.Tensor:
    """Rectified-flow velocity MSE on one batch of (N, 1, 28, 28) images in [-1, 1]."""
    n, dev = x0.shape[0], x0.device
    s = torch.sigmoid(torch.randn(n, generator=gen) * cfg.logit_std + cfg.logit_mean).to(dev)  # (N,) in (0, 1)
    noise = torch.randn(x0.shape, generator=gen).to(dev)  # (N, 1, 28, 28)
    drop = (torch.rand(n, generator=gen) < cfg.label_drop).to(dev)  # (N,)
    ids = torch.where(drop, torch.full_like(labels, NULL_PROMPT_ID), labels)  # (N,)
    x0p, noisep = pack_images(x0), pack_images(noise)  # (N, 196, 4)
    xs = (1.0 - s.view(n, 1, 1)) * x0p + s.view(n, 1, 1) * noisep
    embeds, pooled = net.prompts(ids)  # (N, T, D), (N, P)
    pred = net.transformer(hidden_states=xs, timestep=s, encoder_hidden_states=embeds, pooled_projections=pooled,
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]  # (N, 196, 4)
    return F.mse_loss(pred, noisep - x0p)


def save_flux_weights(out_dir: Path, ema: EmbeddedFlux) -> None:
    """Write the EMA transformer (diffusers layout), the prompt table and the scheduler config, file by file atomically."""
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".transformer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ema.transformer.save_pretrained(tmp, safe_serialization=True)
    for name in reversed(MODEL_FILES):  # weights first, then the config that names them
        os.replace(tmp / name, out_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)
    table = {"prompt_embeds": ema.prompts.embeds.detach().float().cpu().contiguous(),
             "pooled_prompt_embeds": ema.prompts.pooled.detach().float().cpu().contiguous()}
    atomic_write_bytes(out_dir / PROMPTS_FILE, save(table, metadata={"rows": "classes 0-9, then the null prompt (10)"}))
    atomic_write_json(out_dir / SCHEDULER_FILE, scheduler_config())
    atomic_write_json(out_dir / "class_names.json", list(CLASS_NAMES))


def _write_log(out_dir: Path, prog: dict, cfg: FluxTrainConfig, mcfg: FluxModelConfig, n_params: int, done: bool):
    atomic_write_json(out_dir / LOG_FILE, {
        "command": prog["command"], "seed": cfg.seed, "steps": prog["step"],
        "minutes": round(prog["elapsed_s"] / 60.0, 2), "cpu_minutes": round(prog["cpu_s"] / 60.0, 2),
        "final_loss": prog["ema_loss"], "finished": done, "threads": torch.get_num_threads(),
        "device": prog.get("device", "cpu"), "parameters": n_params, "train_config": asdict(cfg),
        "model_config": model_config_dict(mcfg), "loss_curve": prog["curve"],
    })


def train_flux(out_dir, *, minutes: float | None = None, steps: int | None = None, data_dir=None,
               limit: int | None = None, progress: bool = True, resume: bool = False, keep_checkpoint: bool = False,
               model_config: FluxModelConfig | None = None, train_config: FluxTrainConfig | None = None,
               command: str | None = None, device: str | torch.device = "cpu") -> dict:
    """Train (or resume) until `minutes` of wall-clock or `steps` steps; returns the train_log dict.

    All random draws come from one seeded CPU generator; the learning rate is constant after warm-up, so a
    `--minutes` run equals a `--steps N` run with the N it reached, and a resumed run continues bit for bit.
    """
    if minutes is None and steps is None:
        raise DqarError("no stopping rule for training", "pass --minutes M or --steps N")
    out_dir = Path(out_dir)
    mcfg, cfg = model_config or FluxModelConfig(), train_config or FluxTrainConfig()
    device = torch.device(device)
    x_all, y_all = load_split("train", data_dir=data_dir, limit=limit)  # (N, 1, 28, 28), (N,)
    x_all, y_all = x_all.to(device), y_all.to(device)

    torch.manual_seed(cfg.seed)
    net = EmbeddedFlux(mcfg).to(device)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    img_ids = image_ids(device=device)  # (196, 3)
    txt_ids = torch.zeros(mcfg.prompt_tokens, 3, device=device)  # (T, 3)
    n_params = sum(p.numel() for p in net.transformer.parameters())

    state_path = out_dir / STATE_FILE
    prog = start_progress(state_path, net, ema, opt, gen, device, command, resume)
    out_dir.mkdir(parents=True, exist_ok=True)

    def loss_at() -> torch.Tensor:
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen).to(device)  # (B,)
        return training_loss(net, x_all[idx], y_all[idx], gen, cfg, img_ids, txt_ids)

    def write(done: bool) -> None:
        save_flux_weights(out_dir, ema)
        _write_log(out_dir, prog, cfg, mcfg, n_params, done=done)

    train_loop(net, ema, opt, gen, cfg, prog, state_path, loss_at=loss_at, write=write, minutes=minutes, steps=steps,
               progress=progress, keep_checkpoint=keep_checkpoint)
    return json.loads((out_dir / LOG_FILE).read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dqar.embedded.flux_train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (the transformer in diffusers layout + prompt table)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget in minutes")
    p.add_argument("--steps", type=int, default=None, help="number of optimisation steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=FluxTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=FluxTrainConfig.lr, help="AdamW peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=FluxTrainConfig.warmup_steps)
    p.add_argument("--checkpoint-every", type=float, default=FluxTrainConfig.checkpoint_every_s,
                   help="seconds between checkpoints")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: Debian's)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--resume", action="store_true", help="continue from OUT/flux_train_state.pt")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/flux_train_state.pt after finishing")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    if not (args.lr > 0 and math.isfinite(args.lr)) or args.batch_size < 1 or args.warmup_steps < 0:
        print("error: --lr must be > 0, --batch-size >= 1 and --warmup-steps >= 0", file=sys.stderr)
        return 2
    cfg = FluxTrainConfig(seed=args.seed, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                          checkpoint_every_s=args.checkpoint_every)
    command = "python -m dqar.embedded.flux_train " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        log = train_flux(args.out, minutes=args.minutes, steps=args.steps, train_config=cfg, data_dir=args.data,
                         limit=args.limit, progress=not args.no_progress, resume=args.resume,
                         keep_checkpoint=args.keep_checkpoint, command=command, device=resolve_device(args.device))
    except DqarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"trained {log['steps']} steps in {log['minutes']} min, final loss {log['final_loss']:.4f} → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
