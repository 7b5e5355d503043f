"""Determinism: same seed, config, device and thread count → identical samples and identical reuse decisions.

Across processes (`dqar sample` in a fresh interpreter with its own hash seed vs in this one) and within one
process (the Python API twice on one handle, and on a fresh handle).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dqar
from dqar.cli import main as cli_main
from dqar.engine.config import RunConfig, SampleConfig, preset, with_overrides
from dqar.generate import generate
from dqar.models import load_model, save_pipeline_folder
from dqar.engine.plan import build_plan
from dqar.sampling import make_scheduler, sample

from conftest import make_tiny_transformer, make_tiny_vae

pytestmark = pytest.mark.usefixtures("single_thread")  # the subprocess runs one thread too

PRESETS = ("gate", "quant_cache_only", "full_dqar")  # the online gate; a fixed schedule with an INT8 cache; forecasting
STEPS, SEED = 8, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny latent DiT + VAE (16×16×3); layers 1 and 3 attend sharply, so the gate reuses some cells, not all."""
    t = make_tiny_transformer(num_layers=4, heads=2, head_dim=8, num_classes=4)
    with torch.no_grad():
        for block, s in zip(t.transformer_blocks, (1.0, 3.0, 1.0, 3.0)):
            block.attn1.to_q.weight.mul_(s)
            block.attn1.to_k.weight.mul_(s)
    return save_pipeline_folder(tmp_path_factory.mktemp("m") / "tiny", t, make_tiny_vae())


def _args(model_dir: Path, name: str, out: Path) -> list[str]:
    return ["sample", "--model", str(model_dir), "--preset", name, "--steps", str(STEPS), "--seed", str(SEED),
            "--device", "cpu", "--out", str(out), "--quiet"]


@pytest.fixture(scope="module")
def other_process(model_dir, tmp_path_factory):
    """Output folders of `dqar sample` for each preset, run by another Python process (another hash seed)."""
    root = tmp_path_factory.mktemp("other")
    runs = [_args(model_dir, name, root / name) for name in PRESETS]
    code = "import sys\nfrom dqar.cli import main\nsys.exit(max(main(a) for a in %r))" % (runs,)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _record(out: Path) -> dict:
    record = json.loads((out / "stats.json").read_text())
    record.pop("seconds")
    return record


@pytest.mark.parametrize("name", PRESETS)
def test_dqar_sample_in_two_processes_gives_identical_files_and_decisions(name, model_dir, other_process, tmp_path):
    here = tmp_path / name
    assert cli_main(_args(model_dir, name, here)) == 0
    there = other_process / name
    assert len(_files(here)) == 5 and _files(here) == _files(there)  # 4 samples + grid, byte for byte
    mine, theirs = _record(here), _record(there)
    mask = np.array(mine["stats"]["reuse_mask"])  # (E, L)
    assert mine == theirs  # reuse mask, counts, cache bytes, INT8 error, host syncs
    assert 0 < mask.sum() < mask.size
    if name == "gate":  # the gate held back some cells its schedule allows
        allowed = build_plan(with_overrides(preset(name), gate=False), STEPS, 4).mask
        assert (mask <= allowed).all() and mask.sum() < allowed.sum()


@pytest.mark.parametrize("name", PRESETS)
def test_python_api_twice_in_one_process(name, model_dir):
    loaded = load_model(model_dir)
    labels = [0, 1, 2, 3]

    def draw(handle):
        out = sample(loaded.transformer, labels, scheduler=make_scheduler("ddim", loaded.scheduler_config), steps=STEPS,
                     seed=SEED, vae=loaded.vae, null_class=loaded.null_class, reuse=handle)
        return out.images, np.array(handle.stats.reuse_mask)

    with dqar.enable(loaded.transformer, name) as handle:  # one handle, two generations: state resets in between
        first, second = draw(handle), draw(handle)
    fresh = generate(loaded, labels, RunConfig(reuse=preset(name), sample=SampleConfig(steps=STEPS, seed=SEED)))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert torch.equal(first[0], fresh.output.images) and np.array_equal(first[1], np.array(fresh.stats.reuse_mask))
    assert 0 < first[1].sum() < first[1].size
