"""The embedded model package: data reader, training/classifier scripts on tiny slices, offline loaders."""
import json

import numpy as np
import pytest
import torch

import dqar.embedded as emb
from dqar.embedded import classifier as clf_mod
from dqar.embedded import data
from dqar.embedded.train import STATE_FILE, EmbeddedModelConfig, train_embedded
from dqar.errors import DqarError

from conftest import FASHION_MNIST

TINY = EmbeddedModelConfig(num_layers=2, heads=2, head_dim=16)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------- data ----------

def test_load_split_shapes_and_range():
    x, y = data.load_split("test", data_dir=FASHION_MNIST, limit=100)
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.int64
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert y[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the test split's first labels: ankle boot, pullover, ...
    assert set(y.tolist()) == set(range(data.NUM_CLASSES))
    assert json.loads((emb.EMBEDDED_DIR / "class_names.json").read_text()) == list(data.CLASS_NAMES)
    with torch.no_grad():  # images and labels line up: the shipped classifier reads them as the labels say
        assert (emb.load_classifier()(x).argmax(1) == y).float().mean() >= 0.85


def test_missing_dataset_names_the_fix(tmp_path):
    with pytest.raises(DqarError) as err:
        data.load_split("train", data_dir=tmp_path / "nowhere")
    assert "Fashion-MNIST not found at" in err.value.problem
    assert "apt-get install dataset-fashion-mnist" in err.value.fix and "--data" in err.value.fix
    with pytest.raises(DqarError):
        data.load_split("train", data_dir=tmp_path)  # folder exists, files do not


# ---------- DiT training ----------

def test_train_embedded_saves_loadable_diffusers_layout(tmp_path):
    log = train_embedded(tmp_path, steps=3, limit=256, batch_size=4, progress=False, data_dir=FASHION_MNIST)
    assert log["steps"] == 3 and log["finished"] and np.isfinite(log["final_loss"])
    assert log["device"] == "cpu"
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (tmp_path / STATE_FILE).exists()  # checkpoint removed after a finished run
    assert json.loads((tmp_path / "class_names.json").read_text()) == list(emb.CLASS_NAMES)
    model = emb.load_embedded_transformer(folder=tmp_path)
    assert not model.training
    cfg = model.config
    assert (cfg.sample_size, cfg.patch_size, cfg.in_channels, cfg.out_channels) == (28, 4, 1, 1)
    assert cfg.num_layers == 8 and cfg.num_embeds_ada_norm == 10 and cfg.norm_type == "ada_norm_zero"
    sched = emb.load_embedded_scheduler_config(folder=tmp_path)
    assert sched["_class_name"] == "DDIMScheduler" and sched["clip_sample"] is False
    assert sched["beta_schedule"] == "linear" and sched["num_train_timesteps"] == 1000
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 28, 28), timestep=torch.tensor([10, 999]),
                    class_labels=torch.tensor([3, emb.NULL_CLASS_ID])).sample
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


def test_training_is_seeded_and_resumable(tmp_path):
    kw = dict(limit=64, batch_size=4, progress=False, model_config=TINY, data_dir=FASHION_MNIST)
    straight = train_embedded(tmp_path / "a", steps=4, **kw)
    train_embedded(tmp_path / "b", steps=2, keep_checkpoint=True, **kw)
    assert (tmp_path / "b" / STATE_FILE).is_file()
    resumed = train_embedded(tmp_path / "b", steps=4, resume=True, **kw)
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], rel=1e-6)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "transformer" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_training_cli_refuses_an_unknown_device(tmp_path, capsys):
    from dqar.embedded.train import main

    assert main(["--out", str(tmp_path), "--steps", "1", "--device", "tpu9"]) == 2
    assert "unknown device 'tpu9'" in capsys.readouterr().err


def test_training_needs_a_stopping_rule_and_a_checkpoint_to_resume(tmp_path):
    with pytest.raises(DqarError):
        train_embedded(tmp_path, progress=False)
    with pytest.raises(DqarError):
        train_embedded(tmp_path, steps=1, limit=8, resume=True, progress=False, model_config=TINY, data_dir=FASHION_MNIST)


def test_labels_are_dropped_outside_the_model():
    """Eval-mode label embeddings never drop labels; the null id is the last embedding row."""
    model = TINY.build()
    assert not model.training
    embedder = model.transformer_blocks[0].norm1.emb.class_embedder
    table = embedder.embedding_table
    assert table.num_embeddings == 11  # 10 classes + null id 10
    labels = torch.arange(10).repeat(40)  # (400,)
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.equal(embedder(labels), table.weight[labels])  # no label became the null id
        embedder.train()  # what the model would do in train mode: drop some labels itself
        assert not torch.equal(embedder(labels), table.weight[labels])


# ---------- classifier ----------

def test_train_classifier_writes_weights_config_and_stats(tmp_path):
    info = clf_mod.train_classifier(tmp_path, steps=4, limit=256, test_limit=64, batch_size=32, progress=False,
                                    data_dir=FASHION_MNIST)
    assert info["test_images"] == 64
    model = emb.load_classifier(folder=tmp_path)
    assert not model.training
    xt, yt = data.load_split("test", data_dir=FASHION_MNIST, limit=64)
    with torch.no_grad():  # the saved weights give the accuracy the run reported
        assert float((model(xt).argmax(1) == yt).float().mean()) == pytest.approx(info["test_accuracy"], abs=1e-4)
    x = torch.zeros(3, 1, 28, 28)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, info["config"]["feature_dim"])
    stats = emb.load_reference_stats(folder=tmp_path)
    d = info["config"]["feature_dim"]
    assert stats["mu"].shape == (d,) and stats["sigma"].shape == (d, d) and stats["n"] == 64
    assert json.loads((tmp_path / "classifier.json").read_text())["config"]["channels"] == [32, 64]


# ---------- loaders ----------

def test_loaders_on_missing_folder_name_the_training_command(tmp_path):
    for load, word in [
        (emb.load_embedded_transformer, "dqar.embedded.train"),
        (emb.load_embedded_scheduler_config, "dqar.embedded.train"),
        (emb.load_classifier, "dqar.embedded.classifier"),
        (emb.load_reference_stats, "dqar.embedded.classifier"),
    ]:
        with pytest.raises(DqarError) as err:
            load(folder=tmp_path)
        assert str(tmp_path) in err.value.problem and word in err.value.fix


# ---------- shipped weights ----------

def test_shipped_files_load_offline_and_fit_the_size_budget():
    files = [p for p in emb.EMBEDDED_DIR.rglob("*") if p.is_file() and not p.name.endswith(STATE_FILE)]  # a training run's checkpoints
    assert sum(p.stat().st_size for p in files) <= 25 * 1024 * 1024
    model = emb.load_embedded_transformer()
    assert model.config.num_layers >= 6 and model.config.num_embeds_ada_norm == 10
    log = json.loads((emb.EMBEDDED_DIR / "train_log.json").read_text())
    assert log["finished"] and log["steps"] > 0


def test_shipped_classifier_and_reference_stats():
    info = json.loads((emb.EMBEDDED_DIR / "classifier.json").read_text())
    assert info["test_accuracy"] >= 0.90
    model = emb.load_classifier()
    stats = emb.load_reference_stats()
    d = model.fc.out_features
    assert stats["mu"].shape == (d,) and stats["sigma"].shape == (d, d)
    assert np.allclose(stats["sigma"], stats["sigma"].T)


# Checksum of a short generation with the shipped weights (dqar.sampling, DDIM 5 steps, CFG 4,
# classes [0, 7], seed 0), recorded on CPU float32; the tolerance absorbs BLAS/thread differences.
CHECKSUM_LATENT_SUM = -446.5667838919908
CHECKSUM_LATENT_ABS_SUM = 1380.0714655872434
CHECKSUM_IMAGE_SUM = 566.532494276762
CHECKSUM_LATENT_EVERY_157TH = [-1.012635, 0.936168, 0.368776, -1.006173, 0.968043,
                               -0.986822, -1.054634, -0.904939, 0.639042, -1.066557]


def test_shipped_model_reproduces_stored_generation_checksum():
    from dqar.sampling import make_scheduler, sample

    model = emb.load_embedded_transformer()
    scheduler = make_scheduler("ddim", emb.load_embedded_scheduler_config())
    out = sample(model, [0, 7], scheduler=scheduler, steps=5, cfg=4.0, seed=0)
    lat = out.latents.double()  # (2, 1, 28, 28), before clamping
    assert out.images.shape == (2, 1, 28, 28)
    assert float(lat.sum()) == pytest.approx(CHECKSUM_LATENT_SUM, rel=1e-3)
    assert float(lat.abs().sum()) == pytest.approx(CHECKSUM_LATENT_ABS_SUM, rel=1e-3)
    assert float(out.images.double().sum()) == pytest.approx(CHECKSUM_IMAGE_SUM, rel=1e-3)
    assert lat.flatten()[::157][:10].tolist() == pytest.approx(CHECKSUM_LATENT_EVERY_157TH, abs=2e-3)


# ---------- quality check ----------

def test_quality_check_cli_scores_samples_and_draws_one_column_per_class(tmp_path, capsys):
    from PIL import Image

    from dqar.embedded.check import main

    assert main(["--per-class", "2", "--steps", "3", "--grid", str(tmp_path / "g.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 20 and report["weights"] == "trained" and 0 <= report["class_accuracy"] <= 1
    img = Image.open(tmp_path / "g.png")
    assert img.size == (2 * (10 * 30 + 2), 2 * (2 * 30 + 2))  # 10 columns, 2 rows of 28 px + 2 px padding, ×2
    assert main(["--per-class", "1", "--device", "tpu9"]) == 2


def test_quality_check_random_weights_sample_a_different_model():
    from dqar.embedded.check import check_samples

    trained = check_samples(per_class=1, steps=3)
    rand = check_samples(per_class=1, steps=3, random_weights=True)
    assert rand["weights"] == "random"
    assert not torch.allclose(trained["images"], rand["images"], atol=1e-2)


def test_quality_check_scores_a_training_folder_with_the_shipped_classifier(tmp_path):
    """A training run writes only the DiT; the check judges it with the shipped classifier and says so."""
    import shutil

    from dqar.embedded.check import check_samples

    for sub in ("transformer", "scheduler"):
        shutil.copytree(emb.EMBEDDED_DIR / sub, tmp_path / sub)
    copied = check_samples(per_class=1, steps=3, folder=tmp_path)
    shipped = check_samples(per_class=1, steps=3)
    assert copied["scored_by"] == shipped["scored_by"] == str(emb.EMBEDDED_DIR)
    assert torch.equal(copied["images"], shipped["images"])
    assert copied["fd_to_test_split"] == shipped["fd_to_test_split"]


def test_training_cli_learning_rate_acts_and_is_logged(tmp_path):
    from safetensors.torch import load_file

    from dqar.embedded.train import main

    def run(name, lr):
        out = tmp_path / name
        args = ["--out", str(out), "--data", str(FASHION_MNIST), "--steps", "3", "--batch-size", "4", "--limit", "64", "--lr", lr,
                "--warmup-steps", "1", "--device", "cpu", "--no-progress"]
        assert main(args) == 0
        log = json.loads((out / "train_log.json").read_text())
        return log, load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))

    log_lo, w_lo = run("lo", "1e-4")
    log_hi, w_hi = run("hi", "1e-3")
    assert log_lo["train_config"]["lr"] == 1e-4 and log_hi["train_config"]["lr"] == 1e-3
    assert log_hi["train_config"]["warmup_steps"] == 1 and "--lr 1e-3" in log_hi["command"]
    assert any(not torch.allclose(w_lo[k], w_hi[k]) for k in w_lo)


@pytest.mark.parametrize("flag", [["--lr", "0"], ["--lr", "nan"], ["--warmup-steps", "-1"], ["--batch-size", "0"]])
def test_training_cli_refuses_bad_optimiser_settings(tmp_path, capsys, flag):
    from dqar.embedded.train import main

    assert main(["--out", str(tmp_path), "--steps", "1", *flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag[0]} ") and "; pass " in err and len(err.strip().splitlines()) == 1
