"""Sharded sample generation for FID under torchrun: each rank draws a strided share, rank 0 merges.

Sample i has class label `classes[i % len(classes)]` (default: all classes, so 50,000 ImageNet samples
give exactly 50 per class) and its own noise generator seeded `seed + i`. Rank r of W draws the indices
i ≡ r (mod W) in batches; each sample's noise and label therefore do not depend on the number of
ranks or the batch size. The pixels match bit for bit too when nothing couples the rows of a batch
(the baseline, fixed plans, model-dtype or per-token INT8 caches; tested on the CPU with gloo; on GPUs
kernels chosen by batch shape may change low-order bits, so keep the batch size fixed). Batch-
level decisions — the online gate, INT8 scales per tensor, channel or head — make a sample depend on its
batch-mates: the output is then deterministic for a given rank count and batch size only. Resuming is
always exact: a part is reused only when it holds exactly the indices the rerun would put in it.

After each batch, rank r writes `<out>.shards/rank{r}_part{k}.npz` (`arr_0`, `labels`, `indices`)
atomically; a rerun with the same settings skips the parts already on disk, so a killed run resumes
from its finished batches. After a barrier, rank 0 merges every part into `<out>`: `arr_0` uint8
(N, H, W, C) in index order and `labels` int64 (N,), the layout ADM's evaluator reads.

    torchrun --standalone --nproc_per_node=8 -m dqar.cli fid-sample --model facebook/DiT-XL-2-256 \\
        --num-samples 50000 --batch-size 64 --out samples.npz

Flow models (Flux, SD3: `loaded.family`) shard the same way: index i's label is its prompt id and its noise comes from
seed + i (`dqar.generate`), so 2 gloo ranks match one process bit for bit (tested on embedded-flux). A flow model
without a VAE (the random-weight shapes) has latents, not images, and is refused in one line after loading.

Process group: initialised from torchrun's environment when WORLD_SIZE > 1 (NCCL on GPUs, gloo on
the CPU); a plain `python -m dqar.cli fid-sample` or `dqar fid-sample` is one process. On several
nodes, `--out` must be on a filesystem every node sees.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from dqar.engine.config import RunConfig
from dqar.errors import DqarError
from dqar.io import atomic_write_json, atomic_write_npz
from dqar.labels import cycle_labels

MANIFEST = "job.json"
BARRIER_TIMEOUT = timedelta(hours=12)  # a resumed rank may wait long for the others at the merge barrier


@dataclass(frozen=True)
class FidSampleJob:
    """What to generate and where."""

    out: Path  # merged .npz; parts go to `<out>.shards/`
    num_samples: int  # N, indices 0..N-1
    batch_size: int  # samples per forward batch on each rank
    run: RunConfig  # reuse + sampling settings; sample i uses seed run.sample.seed + i
    model: str | None = None  # as dqar.models.load_model takes it
    classes: tuple[str, ...] | None = None  # class ids or names cycled over indices; None: all classes
    device: str = "auto"  # auto | cpu | cuda; with several ranks on GPUs each uses cuda:LOCAL_RANK
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16
    keep_shards: bool = False  # keep `<out>.shards/` after a successful merge
    progress: bool = True  # progress bar on rank 0
    executor: str = "auto"  # as dqar.enable takes it; "auto": graph on CUDA where it runs the config, else patch


@dataclass(frozen=True)
class Rank:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int


@dataclass(frozen=True)
class ShardReport:
    """What one rank did."""

    batches: int  # parts this rank owns
    resumed: int  # parts found on disk and reused
    seconds: float
    executor: str | None = None  # the executor that drew this rank's new parts ("auto" resolved; None: none drawn or no reuse)


def check_job(job: FidSampleJob) -> None:
    """Reject bad sizes, an unknown executor and unwritable outputs before any model is loaded."""
    from dqar.engine.api import EXECUTOR_CHOICES

    if job.executor not in EXECUTOR_CHOICES:
        raise DqarError(f"unknown executor '{job.executor}'", f"choose one of: {', '.join(EXECUTOR_CHOICES)}")
    for name, value in (("num-samples", job.num_samples), ("batch-size", job.batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DqarError(f"--{name} = {value!r} is invalid", "use an integer >= 1")
    out = Path(job.out)
    if out.suffix != ".npz":
        raise DqarError(f"--out '{out}' does not end in .npz", "name the merged sample file like samples.npz")
    if out.is_dir():
        raise DqarError(f"--out '{out}' is a folder", "pass a file path like results/samples.npz")
    try:
        shard_dir(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DqarError(f"cannot write next to '{out}' ({exc.strerror})", "choose a writable output path") from None
    if not os.access(shard_dir(out), os.W_OK) or not os.access(out.parent, os.W_OK):
        raise DqarError(f"cannot write next to '{out}' (permission denied)", "choose a writable output path")


def check_model(job: FidSampleJob, loaded) -> None:
    """After loading, before any work: a model that yields images, and the plan file the run names made for it."""
    from dqar.tuning.calibrate import check_plan_file

    if loaded.vae is None and not loaded.pixel_space:
        raise DqarError(f"fid-sample writes images, and {loaded.name} has no VAE to decode its latents",
                        "use a model with a VAE or a pixel-space one (embedded, embedded-flux)")
    check_plan_file(loaded, job.run)


def labels_for(num_samples: int, classes: list[int]) -> np.ndarray:
    """Label of index i = classes[i % len(classes)], int64 (N,)."""
    return np.asarray(cycle_labels(classes, num_samples), dtype=np.int64)


def rank_indices(num_samples: int, rank: int, world: int) -> np.ndarray:
    """The indices i ≡ rank (mod world), ascending, int64."""
    return np.arange(rank, num_samples, world, dtype=np.int64)


def rank_parts(num_samples: int, rank: int, world: int, batch_size: int) -> list[np.ndarray]:
    """This rank's indices split into consecutive batches; part k is batch k."""
    idx = rank_indices(num_samples, rank, world)
    return [idx[k : k + batch_size] for k in range(0, len(idx), batch_size)]


def shard_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".shards")


def part_path(out: Path, rank: int, part: int) -> Path:
    return shard_dir(out) / f"rank{rank}_part{part}.npz"


def read_part(path: Path, indices: np.ndarray) -> dict | None:
    """A finished part holding exactly `indices`, or None (absent, unreadable or for other indices)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            part = {k: z[k] for k in ("arr_0", "labels", "indices")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if not np.array_equal(part["indices"], indices) or part["arr_0"].dtype != np.uint8 or len(part["arr_0"]) != len(indices):
        return None
    return part


def _manifest(job: FidSampleJob, loaded, classes: list[int]) -> dict:
    """Everything that decides the pixels of sample i (not the rank count or the batch size)."""
    return {"model": loaded.name, "num_samples": job.num_samples, "classes": classes,
            "dtype": str(loaded.transformer.dtype), "executor": job.executor, "config": job.run.to_dict()}


def check_manifest(job: FidSampleJob, manifest: dict, rank: Rank) -> None:
    """Refuse to mix parts made with other settings; rank 0 records the settings of a new job."""
    path = shard_dir(job.out) / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old != json.loads(json.dumps(manifest)):
            raise DqarError(f"{shard_dir(job.out)} holds parts made with other settings",
                            "rerun with the same settings, delete that folder, or choose another --out")
    elif rank.rank == 0:
        atomic_write_json(path, manifest)


def _generators(indices: np.ndarray, seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + int(i)) for i in indices]


def generate_shard(job: FidSampleJob, loaded, labels: np.ndarray, rank: Rank) -> ShardReport:
    """Draw this rank's parts that are not on disk yet and write each one atomically."""
    from tqdm.auto import tqdm

    from dqar.generate import generate
    from dqar.images import to_uint8

    parts = rank_parts(job.num_samples, rank.rank, rank.world, job.batch_size)
    start, resumed, executor = time.perf_counter(), 0, None
    bar = tqdm(total=len(parts), disable=not (job.progress and rank.rank == 0), desc=f"rank 0 of {rank.world}", unit="batch")
    for k, idx in enumerate(parts):
        path = part_path(job.out, rank.rank, k)
        if read_part(path, idx) is not None:
            resumed += 1
        else:
            gen = generate(loaded, labels[idx].tolist(), job.run, executor=job.executor, generator=_generators(idx, job.run.sample.seed))
            executor = gen.executor
            images = to_uint8(gen.output.images)  # (B, H, W, C) uint8
            atomic_write_npz(path, arr_0=images, labels=labels[idx], indices=idx)
        bar.update(1)
    bar.close()
    return ShardReport(batches=len(parts), resumed=resumed, seconds=time.perf_counter() - start, executor=executor)


def merge_shards(job: FidSampleJob, labels: np.ndarray, world: int) -> np.ndarray:
    """Assemble every rank's parts into `job.out` (arr_0 (N, H, W, C) uint8, labels (N,)); returns arr_0."""
    images = None
    for r in range(world):
        for k, idx in enumerate(rank_parts(job.num_samples, r, world, job.batch_size)):
            part = read_part(part_path(job.out, r, k), idx)
            if part is None:
                raise DqarError(f"part {part_path(job.out, r, k)} is missing or incomplete",
                                "rerun the same command to finish it; on several nodes --out must be on a shared filesystem")
            if images is None:
                images = np.empty((job.num_samples, *part["arr_0"].shape[1:]), dtype=np.uint8)  # (N, H, W, C)
            images[idx] = part["arr_0"]
    atomic_write_npz(job.out, arr_0=images, labels=labels)
    return images


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_from_env() -> Rank:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or a single process."""
    env = os.environ
    return Rank(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def _device(name: str, rank: Rank) -> torch.device:
    from dqar.device import resolve_device

    device = resolve_device(name)
    if device.type == "cuda" and rank.world > 1:
        if rank.local_rank >= torch.cuda.device_count():
            raise DqarError(f"local rank {rank.local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                            "set --nproc_per_node to at most the number of GPUs per node")
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    return device


def _barrier(rank: Rank, device: torch.device) -> None:
    import torch.distributed as dist

    if rank.world > 1:
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


def run_job(job: FidSampleJob) -> dict:
    """Generate (this rank's share), wait for all ranks, merge on rank 0. Returns rank 0's record."""
    import torch.distributed as dist

    from dqar.device import resolve_dtype
    from dqar.labels import parse_labels
    from dqar.models import load_model

    check_job(job)
    rank = rank_from_env()
    device = _device(job.device, rank)
    started = rank.world > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group(_backend(device), timeout=BARRIER_TIMEOUT)
    try:
        loaded = load_model(job.model, device=device, dtype=resolve_dtype(job.dtype, device))
        check_model(job, loaded)
        classes = parse_labels(job.classes, loaded.num_classes, loaded.class_names) if job.classes else list(range(loaded.num_classes))
        labels = labels_for(job.num_samples, classes)  # (N,)
        check_manifest(job, _manifest(job, loaded, classes), rank)
        report = generate_shard(job, loaded, labels, rank)
        _barrier(rank, device)
        record = {}
        if rank.rank == 0:
            images = merge_shards(job, labels, rank.world)
            record = {"out": str(job.out), "num_samples": job.num_samples, "image_shape": list(images.shape[1:]),
                      "world_size": rank.world, "batch_size": job.batch_size, "rank0_batches": report.batches,
                      "rank0_resumed": report.resumed, "rank0_seconds": round(report.seconds, 3), "rank0_executor": report.executor,
                      **_manifest(job, loaded, classes), "labels": "classes[i % len(classes)]", "seeds": "seed + i"}
            atomic_write_json(Path(job.out).with_suffix(".json"), record)
            if not job.keep_shards:
                shutil.rmtree(shard_dir(job.out), ignore_errors=True)
        _barrier(rank, device)  # nobody exits (and tears the group down) before the merge is done
        return record
    finally:
        if started:
            dist.destroy_process_group()
