"""Faults: a `dqar` process killed with SIGKILL mid-run resumes to exactly what an uninterrupted run gives.

Each test starts the real CLI in a subprocess, polls its output folder until a first unit of work is on disk
(an ablation configuration, a sample part), kills it with SIGKILL (no handler runs), checks that what it left
is either complete or ignorable, resumes in this process and compares with an uninterrupted run.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import dqar.reporting.plots

from dqar.studies.ablation.runner import REPORT_FILE, RESULTS_FILE
from dqar.cli import main as cli_main
from dqar.studies.scale.distributed import part_path, rank_parts, read_part, shard_dir
from dqar.models import save_pipeline_folder

from conftest import make_tiny_transformer, make_tiny_vae

pytestmark = pytest.mark.usefixtures("single_thread")  # the subprocess runs one thread too: same bits

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
GRID = """
[study]
main = ["baseline", "scheduling_only", "quant_cache_only", "full_dqar"]
[sample]
steps = 8
[[sweep]]
name = "warmup"
base = "scheduling_only"
vary = { warmup_frac = [0.1, 0.3] }
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny latent DiT + VAE (16×16×3 images, not saturated: bitwise checks mean something), 4 classes, 4 layers."""
    t = make_tiny_transformer(num_layers=4, heads=2, head_dim=8, num_classes=4)
    return save_pipeline_folder(tmp_path_factory.mktemp("m") / "tiny", t, make_tiny_vae())


def start(args: list[str]) -> subprocess.Popen:
    """`python -m dqar.cli ARGS` as a single process with one CPU thread."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "dqar.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, text=True)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 180.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before the kill point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


# ----- dqar ablate -------------------------------------------------------------------------------------
def _results(out: Path) -> dict | None:
    path = out / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _stable(data: dict) -> dict:
    """Per configuration, what must not depend on interruptions: config, reuse statistics, fidelity."""
    return {r["name"]: {k: r[k] for k in ("config", "config_hash", "slug", "role", "baseline", "same_as", "reuse", "fidelity")}
            for r in data["records"]}


def _pngs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").glob("*/*.png"))}


def _check_left_behind(out: Path) -> int:
    """After the kill: the results file parses and is partial; every image on disk is a whole PNG. Returns k."""
    data = _results(out)
    assert data is not None and data["status"] == "partial"
    k = data["completed"]
    assert 1 <= k < data["total"] and len(data["records"]) == k, f"{k} of {data['total']} configurations on disk"
    assert all(r["fidelity"] is not None and r["measurements"]["times_s"] for r in data["records"])
    for png in (out / "images").glob("*/*.png"):
        Image.open(png).load()  # a truncated PNG raises
    return k


def test_ablate_killed_then_resumed_equals_uninterrupted(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.setattr(dqar.reporting.plots, "write_all", lambda results, out: None)  # figures: seconds, and not compared here
    (tmp_path / "grid.toml").write_text(GRID)
    args = ["ablate", "--model", str(model_dir), "--config", str(tmp_path / "grid.toml"), "--repeats", "1", "--quiet",
            "--executor", "patch"]
    killed = tmp_path / "killed"
    kill_when(start(args + ["--out", str(killed)]), lambda: (_results(killed) or {}).get("completed", 0) >= 1)
    k = _check_left_behind(killed)
    # what a kill during an atomic write leaves: hidden temp files, never read as results
    (killed / f".{RESULTS_FILE}.x1.tmp").write_text('{"format": "dqar-ablation/1", "records": [')
    (killed / "images" / "full_dqar").mkdir(parents=True, exist_ok=True)
    (killed / "images" / "full_dqar" / ".sample_000_class0.png.x2.tmp").write_bytes(b"\x89PNG")

    assert cli_main(args + ["--out", str(killed), "--resume"]) == 0
    total = _results(killed)["total"]
    assert f"({total - k} this run)" in capsys.readouterr().out  # the k finished configurations were not rerun
    straight = tmp_path / "straight"
    assert cli_main(args + ["--out", str(straight)]) == 0
    resumed, fresh = _results(killed), _results(straight)
    assert resumed["status"] == fresh["status"] == "complete"
    assert [r["name"] for r in resumed["records"]] == [r["name"] for r in fresh["records"]]
    assert _stable(resumed) == _stable(fresh)
    assert _pngs(killed) == _pngs(straight)
    assert "This report is partial" not in (killed / REPORT_FILE).read_text()


# ----- dqar fid-sample ---------------------------------------------------------------------------------
N, BATCH = 16, 2


def _fid_args(model_dir: Path, out: Path) -> list[str]:
    return ["fid-sample", "--model", str(model_dir), "--num-samples", str(N), "--batch-size", str(BATCH), "--steps", "8",
            "--preset", "quant_cache_only", "--device", "cpu", "--out", str(out), "--quiet"]


def test_fid_sample_killed_then_resumed_is_bitwise_equal(tmp_path, model_dir, capsys):
    killed = tmp_path / "killed.npz"
    kill_when(start(_fid_args(model_dir, killed)), lambda: part_path(killed, 0, 0).is_file())
    assert not killed.exists()
    parts = rank_parts(N, 0, 1, BATCH)
    done = [k for k in range(len(parts)) if part_path(killed, 0, k).is_file()]
    assert 1 <= len(done) < len(parts), f"parts on disk after the kill: {done}"
    assert all(read_part(part_path(killed, 0, k), parts[k]) is not None for k in done)  # parts on disk are whole
    (shard_dir(killed) / f".rank0_part{len(parts) - 1}.npz.x1.tmp").write_bytes(b"PK\x03\x04")  # a cut-off write

    assert cli_main(_fid_args(model_dir, killed)) == 0
    said = capsys.readouterr().out
    assert f"({len(done)} of rank 0's {len(parts)} batches resumed, drawn on the patch executor)" in said, said
    straight = tmp_path / "straight.npz"
    assert cli_main(_fid_args(model_dir, straight)) == 0
    with np.load(killed) as a, np.load(straight) as b:
        assert a.files == b.files and a["arr_0"].shape == (N, 16, 16, 3)
        differ = [i for i in range(N) if not np.array_equal(a["arr_0"][i], b["arr_0"][i])]
        assert not differ and np.array_equal(a["labels"], b["labels"]), f"samples {differ} differ; parts resumed: {done}"
    assert killed.read_bytes() == straight.read_bytes()
    assert not shard_dir(killed).exists()
