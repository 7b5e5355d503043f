"""dqar.studies.scale.distributed: 2 gloo ranks under torchrun match one process bit for bit; resume; bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dqar.generate
from dqar.cli import main as cli_main
from dqar.engine.config import RunConfig, SampleConfig
from dqar.studies.scale.distributed import (FidSampleJob, Rank, generate_shard, labels_for, merge_shards, part_path, rank_indices,
                              rank_parts, run_job, shard_dir)
from dqar.errors import DqarError
from dqar.models import load_model, save_pipeline_folder

from conftest import make_tiny_transformer, make_tiny_vae

N, BATCH, STEPS = 7, 2, 3  # 7 samples: both ranks end on a short batch
RUN = RunConfig(sample=SampleConfig(steps=STEPS, cfg=4.0, seed=5))
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny latent DiT + VAE folder (DiTPipeline layout): 10 classes, 16×16×3 images."""
    dit = make_tiny_transformer(num_layers=2, heads=2, head_dim=8, num_classes=10)
    return save_pipeline_folder(tmp_path_factory.mktemp("m") / "tiny", dit, make_tiny_vae())


def job(model_dir, out, **kw):
    return FidSampleJob(out=out, num_samples=N, batch_size=BATCH, run=RUN, model=str(model_dir), device="cpu",
                        progress=False, **kw)


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """The merged output of one process."""
    out = tmp_path_factory.mktemp("single") / "s.npz"
    saved = {k: os.environ.pop(k) for k in TORCHRUN_ENV if k in os.environ}
    try:
        record = run_job(job(model_dir, out))
    finally:
        os.environ.update(saved)
    assert record["world_size"] == 1 and record["rank0_batches"] == 4 and not shard_dir(out).exists()
    with np.load(out) as z:
        return z["arr_0"], z["labels"]


def test_index_split():
    assert labels_for(5, [3, 7]).tolist() == [3, 7, 3, 7, 3]
    assert rank_indices(7, 1, 2).tolist() == [1, 3, 5]
    assert [p.tolist() for p in rank_parts(7, 0, 2, 3)] == [[0, 2, 4], [6]]
    together = np.sort(np.concatenate([rank_indices(10, r, 3) for r in range(3)]))
    assert together.tolist() == list(range(10))


def test_single_process_output_format(single):
    images, labels = single
    assert images.dtype == np.uint8 and images.shape == (N, 16, 16, 3)
    assert labels.tolist() == [i % 10 for i in range(N)]
    assert len({images[i].tobytes() for i in range(N)}) == N  # every index has its own noise
    assert ((images > 0) & (images < 255)).mean() > 0.5  # not saturated: bitwise comparisons mean something


def test_torchrun_two_ranks_then_resume_match_one_process(model_dir, single, tmp_path):
    out = tmp_path / "d.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dqar.cli", "fid-sample",
           "--model", str(model_dir), "--num-samples", str(N), "--batch-size", str(BATCH), "--steps", str(STEPS),
           "--cfg", "4", "--seed", "5", "--out", str(out), "--device", "cpu", "--keep-shards", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with 2 rank(s)" in proc.stdout
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], single[0]) and np.array_equal(z["labels"], single[1])
    parts = sorted(p.name for p in shard_dir(out).glob("rank*_part*.npz"))
    assert parts == ["rank0_part0.npz", "rank0_part1.npz", "rank1_part0.npz", "rank1_part1.npz"]

    # Resume: drop one part and redo the job as the two ranks would (in this process, no process group).
    part_path(out, 1, 0).unlink()
    out.unlink()
    j = job(model_dir, out)
    loaded = load_model(str(model_dir))
    labels = labels_for(N, list(range(10)))
    reports = [generate_shard(j, loaded, labels, Rank(r, 2, r)) for r in range(2)]
    assert [(r.batches, r.resumed) for r in reports] == [(2, 2), (2, 1)]
    merge_shards(j, labels, 2)
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], single[0]) and np.array_equal(z["labels"], single[1])


def test_killed_run_resumes_from_finished_batches(model_dir, single, tmp_path, monkeypatch):
    out = tmp_path / "k.npz"
    real, calls = dqar.generate.generate, []

    def dies_on_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dqar.generate, "generate", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        run_job(job(model_dir, out))
    assert not out.exists() and len(list(shard_dir(out).glob("rank0_part*.npz"))) == 2
    monkeypatch.setattr(dqar.generate, "generate", real)
    record = run_job(job(model_dir, out))
    assert (record["rank0_batches"], record["rank0_resumed"]) == (4, 2)
    with np.load(out) as z:
        assert np.array_equal(z["arr_0"], single[0])


def test_parts_of_other_settings_are_refused(model_dir, tmp_path):
    out = tmp_path / "m.npz"
    run_job(job(model_dir, out, keep_shards=True))
    other = FidSampleJob(out=out, num_samples=N, batch_size=BATCH, run=RunConfig(sample=SampleConfig(steps=STEPS, seed=6)),
                         model=str(model_dir), device="cpu", progress=False)
    with pytest.raises(DqarError, match="other settings"):
        run_job(other)


@pytest.mark.parametrize("args,match", [
    (["--num-samples", "0"], "--num-samples = 0"),
    (["--num-samples", "4", "--batch-size", "-1"], "--batch-size = -1"),
    (["--num-samples", "4", "--out-name", "x.png"], "does not end in .npz"),
    (["--num-samples", "4", "--out-name", "blocker/x.npz"], "cannot write"),
])
def test_bad_input_is_one_line(args, match, tmp_path, capsys):
    (tmp_path / "blocker").write_text("a file, not a folder")
    out = str(tmp_path / "s.npz")
    if "--out-name" in args:
        i = args.index("--out-name")
        out, args = str(tmp_path / args[i + 1]), args[:i] + args[i + 2:]
    assert cli_main(["fid-sample", "--device", "cpu", "--out", out, *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


REUSE_TOML = """[reuse]
schedule = "constant"
warmup_frac = 0.0
granularity = "attention"
forecast_order = 2
refresh_interval = 3
max_staleness = 2
cfg_share = "cond_to_uncond"
cfg_share_from = 0.5
"""


def test_fid_sample_on_the_graph_executor_equals_patch(model_dir, tmp_path, monkeypatch, capsys):
    """fid-sample --executor graph (world size 1, torchrun's environment): the patch executor's images within 1e-5; the
    default on the CPU is patch; under torchrun itself the merged uint8 samples are the graph run's."""
    config = tmp_path / "reuse.toml"
    config.write_text(REUSE_TOML)
    real, drawn = dqar.generate.generate, {}

    def recording(*args, **kwargs):
        gen = real(*args, **kwargs)
        drawn.setdefault(kwargs["executor"], []).append(gen)
        return gen

    monkeypatch.setattr(dqar.generate, "generate", recording)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    args = ["fid-sample", "--model", str(model_dir), "--num-samples", "4", "--batch-size", "2", "--steps", "6", "--cfg", "4",
            "--seed", "5", "--config", str(config), "--device", "cpu", "--quiet"]
    out = {}
    for executor in ("graph", "patch", None):
        out[executor] = tmp_path / f"{executor}.npz"
        capsys.readouterr()
        assert cli_main([*args, "--out", str(out[executor]), *(["--executor", executor] if executor else [])]) == 0
        assert f"drawn on the {executor or 'patch'} executor" in capsys.readouterr().out
    graph, patch = drawn["graph"], drawn["patch"]
    assert [g.executor for g in graph] == ["graph"] * 2 and [g.executor for g in drawn["auto"]] == ["patch"] * 2
    assert all(g.stats.graphs > 0 and g.stats.reused > 0 and g.stats.cfg_shared > 0 and g.stats.forecasts > 0 for g in graph)
    for g, p in zip(graph, patch):
        torch.testing.assert_close(g.output.images, p.output.images, atol=1e-5, rtol=0)
        assert g.stats.reuse_mask == p.stats.reuse_mask and g.stats.cfg_shared == p.stats.cfg_shared
    with np.load(out["graph"]) as g, np.load(out["patch"]) as p, np.load(out[None]) as a:
        assert np.abs(g["arr_0"].astype(int) - p["arr_0"]).max() <= 1  # uint8 rounding of values 1e-5 apart
        assert np.array_equal(a["arr_0"], p["arr_0"])

    # the same job under torchrun, one rank, on the graph executor
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "dqar.cli", *args,
           "--executor", "graph", "--out", str(tmp_path / "torchrun.npz")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with 1 rank(s)" in proc.stdout and "drawn on the graph executor" in proc.stdout
    with np.load(tmp_path / "torchrun.npz") as t, np.load(out["graph"]) as g:
        assert np.abs(t["arr_0"].astype(int) - g["arr_0"]).max() <= 1


def test_fid_sample_refuses_an_unknown_executor(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line error
        cli_main(["fid-sample", "--model", str(model_dir), "--num-samples", "2", "--out", str(tmp_path / "s.npz"),
                  "--device", "cpu", "--executor", "jit"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'jit'" in err and "auto" in err and err.count("\n") == 1
    with pytest.raises(DqarError, match="unknown executor 'jit'"):
        run_job(job(model_dir, tmp_path / "j.npz", executor="jit"))


FLOW_N, FLOW_STEPS = 3, 2  # embedded-flux, true CFG 4 (two forwards a step), 2 steps: both ranks draw; rank 0 a short batch


def test_torchrun_two_ranks_match_one_process_on_embedded_flux(tmp_path):
    """Flow models shard as the DiT does: prompt id i % classes and noise seed + i, so 2 gloo ranks equal one process."""
    run = RunConfig(sample=SampleConfig(steps=FLOW_STEPS, cfg=4.0, seed=5))  # the default reuse (attention, linear schedule)
    single = tmp_path / "one.npz"
    record = run_job(FidSampleJob(out=single, num_samples=FLOW_N, batch_size=BATCH, run=run, model="embedded-flux", device="cpu",
                                  progress=False))
    assert record["model"] == "embedded-flux" and record["rank0_executor"] == "patch" and record["image_shape"] == [28, 28, 1]
    out = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dqar.cli", "fid-sample",
           "--model", "embedded-flux", "--num-samples", str(FLOW_N), "--batch-size", str(BATCH), "--steps", str(FLOW_STEPS),
           "--cfg", "4", "--seed", "5", "--out", str(out), "--device", "cpu", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with 2 rank(s)" in proc.stdout
    with np.load(out) as two, np.load(single) as one:
        assert np.array_equal(two["arr_0"], one["arr_0"]) and two["labels"].tolist() == [0, 1, 2]
        assert len({one["arr_0"][i].tobytes() for i in range(FLOW_N)}) == FLOW_N


def test_fid_sample_refuses_a_flow_model_without_images_in_one_line(tmp_path, capsys):
    """random-flux-tiny has no VAE: its latents are not images. Refused after loading, before any sample is drawn."""
    out = tmp_path / "r.npz"
    assert cli_main(["fid-sample", "--model", "random-flux-tiny", "--num-samples", "2", "--steps", "2", "--device", "cpu",
                     "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "random-flux-tiny has no VAE" in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists() and not list(shard_dir(out).glob("rank*_part*.npz"))


def test_fid_sample_refuses_a_plan_for_another_layout(model_dir, tmp_path, capsys):
    """A plan file checked against the loaded model before any work: here one of 2 dual-stream layers, on the 2-layer DiT."""
    import json

    (tmp_path / "p.json").write_text(json.dumps({"format": "dqar-plan/1", "key": {"streams": [2, 2]}, "rows": [".."] * STEPS}))
    (tmp_path / "c.toml").write_text(f"[reuse]\nplan_file = '{tmp_path / 'p.json'}'\n")
    out = tmp_path / "p.npz"
    assert cli_main(["fid-sample", "--model", str(model_dir), "--num-samples", "2", "--steps", str(STEPS), "--device", "cpu",
                     "--config", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "streams 2 x2" in err and "streams 1 x2" in err and err.count("\n") == 1, err
    assert not list(shard_dir(out).glob("rank*_part*.npz"))
