"""The training loop both embedded models share: steps under a wall-clock or step budget, EMA, resumable checkpoints.

A model's own module supplies what differs (its loss on one drawn batch, its weights and log writer); this module
owns the rest, so the DiT (`dqar.embedded.train`) and the Flux (`dqar.embedded.flux_train`) train, log, checkpoint
and resume the same way. All random draws come from one seeded CPU generator, so a resumed run continues bit for bit.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dqar.errors import DqarError


def lr_at(step: int, cfg) -> float:
    """Linear warmup to the peak rate `cfg.lr` over `cfg.warmup_steps`, then constant."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """ema ← d·ema + (1-d)·model with a short warmup of d."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - d)


def save_state(path: Path, model, ema, opt, gen, progress: dict) -> None:
    """The resumable checkpoint, written atomically (tensors and plain containers only)."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "generator": gen.get_state(), "progress": json.dumps(progress)}, tmp)  # generator: CPU state (uint8)
    os.replace(tmp, path)


def load_state(path: Path, model, ema, opt, gen, device) -> dict:
    """Restore a checkpoint into model, EMA, optimizer and generator; its progress dict."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)  # tensors and plain containers: no code runs
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].cpu())
        return json.loads(state["progress"])
    except Exception as exc:  # a pickle that would run code, a truncated or foreign file, another model's shapes
        raise DqarError(f"{path} is not a checkpoint of this model that can be loaded safely ({type(exc).__name__})",
                        "delete it and train without --resume") from None


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def start_progress(state_path: Path, model, ema, opt, gen, device: torch.device, command: str | None, resume: bool) -> dict:
    """A new run's progress dict, or a resumed one's (its command history extended)."""
    prog = {"step": 0, "elapsed_s": 0.0, "cpu_s": 0.0, "ema_loss": None, "curve": [], "command": command or "",
            "device": device_label(device)}
    if not resume:
        return prog
    if not state_path.is_file():
        raise DqarError(f"no checkpoint to resume at {state_path}", "start without --resume")
    prog = load_state(state_path, model, ema, opt, gen, device)
    prog.setdefault("cpu_s", None)  # checkpoints written before CPU time was tracked
    if command:  # keep the history: first run, then each resume
        prog["command"] = f'{prog["command"]} ; then {command}' if prog["command"] else command
    return prog


def _progress_bar(total, initial, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def train_loop(model, ema, opt, gen, cfg, prog: dict, state_path: Path, *, loss_at: Callable[[], torch.Tensor],
               write: Callable[[bool], None], minutes: float | None, steps: int | None, progress: bool,
               keep_checkpoint: bool) -> None:
    """Optimise until `minutes` of wall-clock or `steps` steps, then write the outputs.

    `loss_at()`: the loss of one freshly drawn batch; `write(done)`: the model's weights and log. `cfg` holds
    lr / warmup_steps, grad_clip, ema_decay, log_every and checkpoint_every_s. Every `checkpoint_every_s` seconds
    the checkpoint and the outputs are written; at the end the outputs, and the checkpoint only if kept.
    """
    budget_s = None if minutes is None else 60.0 * minutes
    bar = _progress_bar(steps, prog["step"], progress)
    start, base = time.perf_counter(), prog["elapsed_s"]
    cpu_start, cpu_base = time.process_time(), prog["cpu_s"]
    last_ckpt, window = start, []
    while True:
        elapsed = base + time.perf_counter() - start
        if (steps is not None and prog["step"] >= steps) or (budget_s is not None and elapsed >= budget_s):
            break
        step = prog["step"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = loss_at()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update_(ema, model, step, cfg.ema_decay)

        value = float(loss.detach())
        window.append(value)
        prog["ema_loss"] = value if prog["ema_loss"] is None else 0.99 * prog["ema_loss"] + 0.01 * value
        prog["step"] = step + 1
        prog["elapsed_s"] = base + time.perf_counter() - start
        if cpu_base is not None:
            prog["cpu_s"] = cpu_base + time.process_time() - cpu_start
        bar.update(1)
        if prog["step"] % cfg.log_every == 0:
            prog["curve"].append({"step": prog["step"], "elapsed_s": round(prog["elapsed_s"], 1),
                                  "loss": round(sum(window) / len(window), 5), "ema_loss": round(prog["ema_loss"], 5)})
            window = []
            bar.set_postfix(loss=f"{prog['ema_loss']:.4f}")
            if not progress:
                print(f"step {prog['step']} loss {prog['ema_loss']:.4f} {prog['elapsed_s'] / 60:.1f} min", flush=True)
        if time.perf_counter() - last_ckpt >= cfg.checkpoint_every_s:
            save_state(state_path, model, ema, opt, gen, prog)
            write(False)
            last_ckpt = time.perf_counter()
    bar.close()

    if keep_checkpoint:
        save_state(state_path, model, ema, opt, gen, prog)
    write(True)
    if not keep_checkpoint:
        state_path.unlink(missing_ok=True)
