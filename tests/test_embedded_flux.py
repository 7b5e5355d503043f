"""The embedded Flux: shipped weights (safetensors only, size, blocks, RoPE), sampling, FluxPipeline parity, bad files,
and the training loop (2 steps, then a resume equal to an uninterrupted run) on the tests' Fashion-MNIST slice."""
import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline

from dqar.embedded import flux
from dqar.embedded.flux_train import STATE_FILE, FluxTrainConfig, main as train_main, train_flux
from dqar.errors import DqarError
from dqar.sampling import calculate_shift, sample_flow

from conftest import FASHION_MNIST

TINY = flux.FluxModelConfig(num_layers=1, num_single_layers=1, heads=1, head_dim=16, axes_dims_rope=(4, 6, 6),
                            joint_attention_dim=8, pooled_projection_dim=8, prompt_tokens=2)
TINY_TRAIN = FluxTrainConfig(batch_size=4, warmup_steps=2, checkpoint_every_s=1e9)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def shipped(single_thread):
    return flux.load_embedded_flux()


# ---------- shipped weights ----------

def test_shipped_files_are_safetensors_and_json_within_15_mb():
    files = [p for p in flux.FLUX_DIR.rglob("*") if p.is_file() and p.name != STATE_FILE]
    assert {p.suffix for p in files} <= {".safetensors", ".json"}
    assert sum(p.stat().st_size for p in files) <= 15 * 1024 * 1024
    log = json.loads((flux.FLUX_DIR / "train_log.json").read_text())
    assert log["steps"] > 0 and log["command"].startswith("python -m dqar.embedded.flux_train")


def test_shipped_model_has_dual_and_single_blocks_and_rope(shipped):
    transformer, prompts, sched = shipped
    c = transformer.config
    assert type(transformer).__name__ == "FluxTransformer2DModel"
    assert len(transformer.transformer_blocks) >= 1 and len(transformer.single_transformer_blocks) >= 1
    assert sum(c.axes_dims_rope) == c.attention_head_dim and c.in_channels == 4 and not c.guidance_embeds
    assert prompts["prompt_embeds"].shape[0] == prompts["pooled_prompt_embeds"].shape[0] == 11  # 10 classes + null
    assert prompts["prompt_embeds"].shape[2] == c.joint_attention_dim
    assert sched["use_dynamic_shifting"] and not transformer.training
    assert not any(p.requires_grad for p in transformer.parameters())


def test_shipped_model_samples_finite_images(shipped):
    transformer, prompts, sched = shipped
    images = flux.sample_embedded_flux(transformer, prompts, [0, 7, 9], steps=3,
                                       scheduler=flux.make_flux_scheduler(sched))
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_stock_flux_pipeline_samples_it_like_the_loader(shipped):
    """FluxPipeline without VAE / text encoders, the class prompts given, height=width=224, output_type="latent"."""
    transformer, prompts, sched = shipped
    labels, steps = [1, 5], 3
    ours = flux.sample_embedded_flux(transformer, prompts, labels, steps=steps, seed=11)
    noise = torch.stack([torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(11 + i)) for i in range(2)])
    pipe = FluxPipeline(scheduler=flux.make_flux_scheduler(sched), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(**flux.class_prompts(prompts, labels), true_cfg_scale=flux.DEFAULT_CFG, height=flux.SAMPLE_PX,
                   width=flux.SAMPLE_PX, num_inference_steps=steps, latents=flux.pack_images(noise),
                   output_type="latent").images  # (2, 196, 4)
    assert latents.shape == (2, 196, 4)
    theirs = ((flux.unpack_latents(latents) + 1) * 0.5).clamp(0, 1)
    assert torch.equal(ours, theirs)
    # sample_flow with the pipeline's own generator draws the same too
    out = sample_flow(transformer, flux.make_flux_scheduler(sched), **flux.class_prompts(prompts, labels), cfg=4.0,
                      height=224, width=224, steps=steps, generator=torch.Generator().manual_seed(3))
    ref = pipe(**flux.class_prompts(prompts, labels), true_cfg_scale=4.0, height=224, width=224,
               num_inference_steps=steps, generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert torch.equal(out.latents, ref)


def test_default_schedule_is_fluxs_dynamic_shift_for_196_tokens():
    sched = flux.make_flux_scheduler()
    from dqar.sampling import set_flow_timesteps

    set_flow_timesteps(sched, flux.DEFAULT_STEPS, family="flux", image_seq_len=196)
    mu = calculate_shift(196)
    s = torch.linspace(1.0, 1 / 28, 28, dtype=torch.float64)
    shifted = torch.exp(torch.tensor(mu, dtype=torch.float64)) / (torch.exp(torch.tensor(mu, dtype=torch.float64))
                                                                  + (1 / s - 1))
    assert torch.allclose(sched.sigmas[:-1].double(), shifted, atol=1e-6)


def test_pack_and_unpack_are_inverse():
    x = torch.randn(3, 1, 28, 28)
    assert flux.pack_images(x).shape == (3, 196, 4) and torch.equal(flux.unpack_latents(flux.pack_images(x)), x)


def test_bad_class_label_is_one_line_error(shipped):
    with pytest.raises(DqarError, match="class labels"):
        flux.class_prompts(shipped[1], [3, 10])


# ---------- bad files ----------

def _copy_shipped(tmp_path):
    dst = tmp_path / "flux"
    shutil.copytree(flux.FLUX_DIR, dst, ignore=shutil.ignore_patterns(STATE_FILE, ".*"))
    return dst


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "config.json", "prompts.safetensors",
                                  "scheduler_config.json"])
def test_missing_file_names_the_training_command(tmp_path, name):
    folder = _copy_shipped(tmp_path)
    (folder / name).unlink()
    with pytest.raises(DqarError) as err:
        flux.load_embedded_flux(folder=folder)
    assert str(folder) in err.value.problem and "dqar.embedded.flux_train" in err.value.fix
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "prompts.safetensors", "config.json"])
def test_corrupt_file_is_one_line_error(tmp_path, name):
    folder = _copy_shipped(tmp_path)
    path = folder / name
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(DqarError) as err:
        flux.load_embedded_flux(folder=folder)
    assert "cannot load the embedded Flux" in err.value.problem and "\n" not in str(err.value)


def test_config_rejects_unknown_keys_and_bad_rope():
    with pytest.raises(DqarError, match="unknown FluxModelConfig keys: bogus"):
        flux.FluxModelConfig.from_dict({"heads": 2, "bogus": 1})
    with pytest.raises(DqarError, match="axes_dims_rope"):
        flux.FluxModelConfig(head_dim=32, axes_dims_rope=(8, 8, 8))
    with pytest.raises(DqarError, match="dual-stream"):
        flux.FluxModelConfig(num_single_layers=0)
    assert flux.FluxModelConfig.from_dict({"axes_dims_rope": [8, 20, 20]}) == flux.FluxModelConfig()


# ---------- training ----------

def _train(out, steps, **kw):
    return train_flux(out, steps=steps, limit=64, progress=False, model_config=TINY, train_config=TINY_TRAIN,
                      data_dir=FASHION_MNIST, **kw)


def test_training_runs_two_steps_and_resumes_like_an_uninterrupted_run(tmp_path, single_thread):
    log = _train(tmp_path / "a", 2, keep_checkpoint=True, command="first")
    assert log["steps"] == 2 and (tmp_path / "a" / STATE_FILE).is_file()
    log = _train(tmp_path / "a", 4, resume=True, command="second")
    assert log["steps"] == 4 and log["finished"] and log["command"] == "first ; then second"
    assert not (tmp_path / "a" / STATE_FILE).exists()
    _train(tmp_path / "b", 4)
    a, pa, _ = flux.load_embedded_flux(folder=tmp_path / "a")
    b, pb, _ = flux.load_embedded_flux(folder=tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(pa["prompt_embeds"], pb["prompt_embeds"])
    images = flux.sample_embedded_flux(a, pa, [2], steps=2)
    assert images.shape == (1, 1, 28, 28) and torch.isfinite(images).all()


def test_training_refuses_a_foreign_checkpoint_and_a_missing_stopping_rule(tmp_path):
    with pytest.raises(DqarError, match="stopping rule"):
        train_flux(tmp_path, data_dir=FASHION_MNIST)
    (tmp_path / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(DqarError, match="loaded safely"):
        _train(tmp_path, 1, resume=True)


def test_training_cli_logs_its_command(tmp_path, single_thread, capsys):
    rc = train_main(["--out", str(tmp_path), "--steps", "1", "--batch-size", "2", "--limit", "8", "--data",
                     str(FASHION_MNIST), "--device", "cpu", "--no-progress"])
    assert rc == 0
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["command"].startswith("python -m dqar.embedded.flux_train --out") and log["steps"] == 1
    assert train_main(["--out", str(tmp_path), "--steps", "1", "--lr", "-1"]) == 2


# ---------- load_model("embedded-flux"): the one generation workflow, the CLI, the study core ----------

@pytest.fixture(scope="module")
def loaded(single_thread):
    from dqar.models import load_model

    return load_model("embedded-flux")


def test_load_model_names_the_embedded_flux(loaded):
    assert (loaded.name, loaded.family, loaded.num_classes, loaded.null_class) == ("embedded-flux", "flux", 10, 10)
    assert loaded.pixel_space and loaded.vae is None and loaded.resolution == flux.SAMPLE_PX and loaded.guidance is None
    assert loaded.class_names[0] == "T-shirt/top" and loaded.prompts["prompt_embeds"].shape[0] == 11


def test_generate_samples_it_as_sample_embedded_flux_does(loaded):
    from dqar.engine.config import RunConfig, SampleConfig, preset
    from dqar.generate import generate

    run = RunConfig(reuse=preset("baseline"), sample=SampleConfig(steps=3, cfg=4.0, seed=5))
    gen = generate(loaded, [0, 7, 9], run)
    ref = flux.sample_embedded_flux(loaded.transformer, loaded.prompts, [0, 7, 9], steps=3, cfg=4.0, seed=5,
                                    scheduler=flux.make_flux_scheduler(loaded.scheduler_config))
    assert gen.output.images.shape == (3, 1, 28, 28) and torch.equal(gen.output.images, ref)
    other = generate(loaded, [0, 7, 9], RunConfig(reuse=preset("baseline"), sample=SampleConfig(steps=3, cfg=1.0, seed=5)))
    assert not torch.equal(other.output.images, ref)  # cfg acts: <= 1 runs the conditional forward only


def test_generate_with_reuse_changes_the_images_and_counts_both_branches(loaded):
    from dqar.engine.config import RunConfig, SampleConfig, preset
    from dqar.generate import generate

    run = RunConfig(reuse=preset("full_dqar"), sample=SampleConfig(steps=6, cfg=4.0))
    gen = generate(loaded, [1, 2], run)
    base = generate(loaded, [1, 2], RunConfig(reuse=preset("baseline"), sample=run.sample))
    assert gen.stats.reuse_fraction > 0 and not torch.equal(gen.output.images, base.output.images)
    assert gen.stats.evaluations == 6


def test_the_study_core_scores_it_with_the_embedded_classifier(loaded):
    from dqar.studies.core import embedded_evaluator

    ev = embedded_evaluator(loaded)
    assert ev is not None and "Fashion-MNIST" in ev.description


def test_cli_sample_writes_the_classes_with_fluxs_defaults(tmp_path, single_thread):
    from dqar.cli.app import main

    assert main(["sample", "--model", "embedded-flux", "--classes", "0", "7", "9", "--steps", "2", "--out",
                 str(tmp_path), "--quiet"]) == 0
    record = json.loads((tmp_path / "stats.json").read_text())
    assert record["model"] == "embedded-flux" and record["labels"] == [0, 7, 9] and record["family"] == "flux"
    assert record["config"]["sample"]["cfg"] == 4.0 and record["config"]["sample"]["steps"] == 2
    assert len(list(tmp_path.glob("sample_*_class*.png"))) == 3


def test_run_config_takes_the_models_sampling_defaults():
    import argparse

    from dqar.cli.common import run_config

    args = argparse.Namespace(model="embedded-flux", config=None, preset=None, steps=None, cfg=None, sampler=None,
                              seed=None, eta=None)
    assert run_config(args).sample.steps == 28
    assert run_config(argparse.Namespace(**{**vars(args), "model": None})).sample.steps == 50
    assert run_config(argparse.Namespace(**{**vars(args), "steps": 7})).sample.steps == 7


def test_cli_sample_refuses_an_unknown_class_in_one_line(tmp_path, capsys):
    from dqar.cli.app import main

    assert main(["sample", "--model", "embedded-flux", "--classes", "10", "--out", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10" in err[0]
