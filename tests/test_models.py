"""dqar.models: offline loading of folders, clear one-line errors, the DiT-XL/2 config."""
import json
import time

import pytest
import torch
from diffusers import DiTPipeline

from dqar import models
from dqar.errors import DqarError
from dqar.models import DIT_SCHEDULER_CONFIG, RANDOM_DIT_XL2, LoadedModel, load_model, random_dit_xl2, save_pipeline_folder

from conftest import make_tiny_transformer, make_tiny_vae


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def dit():
    return make_tiny_transformer(num_layers=1)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pipeline_folder_roundtrip(tmp_path, dit):
    vae = make_tiny_vae()
    sched = {**DIT_SCHEDULER_CONFIG, "beta_end": 0.03}
    folder = save_pipeline_folder(tmp_path / "pipe", dit, vae, sched, class_names=[f"c{i}" for i in range(1000)])
    loaded = load_model(str(folder))
    assert isinstance(loaded, LoadedModel)
    assert same_weights(loaded.transformer, dit) and same_weights(loaded.vae, vae)
    assert loaded.scheduler_config["beta_end"] == 0.03
    assert (loaded.num_classes, loaded.null_class, loaded.pixel_space) == (1000, 1000, False)
    assert loaded.name == str(folder) and loaded.class_names[7] == "c7"
    assert not list(tmp_path.glob(".pipe.*"))  # the temporary folder was renamed away
    DiTPipeline.from_pretrained(folder, local_files_only=True)  # also a valid DiTPipeline folder


def test_transformer_only_folder_uses_dit_scheduler_defaults(tmp_path):
    small = make_tiny_transformer(num_layers=1, num_classes=10)
    folder = save_pipeline_folder(tmp_path / "m", small)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    loaded = load_model(folder, dtype=torch.float16)
    assert loaded.vae is None and loaded.pixel_space and loaded.class_names is None
    assert (loaded.num_classes, loaded.null_class) == (10, 10)
    assert loaded.transformer.dtype == torch.float16
    assert loaded.scheduler_config == DIT_SCHEDULER_CONFIG and loaded.scheduler_config["clip_sample"] is False


def test_bare_transformer_folder(tmp_path, dit):
    dit.save_pretrained(tmp_path / "bare", safe_serialization=True)
    loaded = load_model(tmp_path / "bare")
    assert same_weights(loaded.transformer, dit) and loaded.vae is None


def test_save_refuses_to_overwrite_unless_asked(tmp_path, dit):
    save_pipeline_folder(tmp_path / "m", dit)
    with pytest.raises(DqarError, match="already exists"):
        save_pipeline_folder(tmp_path / "m", dit)
    save_pipeline_folder(tmp_path / "m", dit, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_unknown_hub_id_offline_fails_fast_on_one_line():
    start = time.monotonic()
    with pytest.raises(DqarError) as err:
        load_model("dqar-nobody/no-such-dit")
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "\n" not in message and "dqar-nobody/no-such-dit" in message
    assert "hf download" in message and "--model" in message
    assert err.value.__suppress_context__  # no chained traceback


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DqarError, match="neither an existing folder nor a hub id"):
        load_model(str(tmp_path / "nope" / "deeper"))


def test_folder_without_model(tmp_path):
    with pytest.raises(DqarError, match="no DiT model"):
        load_model(tmp_path)


def test_non_safetensors_weights_are_refused(tmp_path, dit):
    folder = save_pipeline_folder(tmp_path / "m", dit)
    (folder / "transformer" / models.WEIGHTS).unlink()
    torch.save(dit.state_dict(), folder / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(DqarError, match=r"diffusion_pytorch_model\.bin is not safetensors"):
        load_model(folder)


def test_corrupt_weights_name_the_file(tmp_path, dit):
    folder = save_pipeline_folder(tmp_path / "m", dit)
    weights = folder / "transformer" / models.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DqarError, match=r"diffusion_pytorch_model\.safetensors") as err:
        load_model(folder)
    assert "\n" not in str(err.value)


def test_wrong_model_class_is_refused(tmp_path, dit):
    folder = save_pipeline_folder(tmp_path / "m", dit)
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "UNet2DModel"}))
    with pytest.raises(DqarError, match="not a class-conditional DiT"):
        load_model(folder)


def test_embedded_model_loads_from_its_folder(tmp_path, monkeypatch):
    import dqar.embedded as embedded

    small = make_tiny_transformer(num_layers=1, num_classes=3)
    folder = save_pipeline_folder(tmp_path / "emb", small)
    monkeypatch.setattr(embedded, "EMBEDDED_DIR", folder, raising=False)
    monkeypatch.setattr(embedded, "CLASS_NAMES", ("a", "b", "c"), raising=False)
    for spec in (None, "embedded"):
        loaded = load_model(spec)
        assert loaded.name == "embedded" and loaded.class_names == ("a", "b", "c") and loaded.pixel_space


def test_random_dit_xl2_has_the_exact_config():
    loaded = random_dit_xl2(device="meta", dtype=torch.float16, with_vae=True)
    cfg = loaded.transformer.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_layers) == (16, 72, 28)
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size, cfg.patch_size) == (4, 8, 32, 2)
    assert cfg.num_embeds_ada_norm == 1000 and loaded.null_class == 1000 and not loaded.pixel_space
    params = sum(p.numel() for p in loaded.transformer.parameters())
    # the paper's 675M plus ~75M: diffusers gives every block its own timestep and class embedders
    assert 745e6 < params < 755e6
    assert loaded.transformer.dtype == torch.float16 and loaded.transformer.device.type == "meta"
    assert loaded.vae.config.scaling_factor == 0.18215 and len(loaded.vae.config.block_out_channels) == 4
    assert loaded.scheduler_config == DIT_SCHEDULER_CONFIG


def test_random_dit_xl2_512_has_64x64_latents_and_the_same_blocks():
    """The 512 variant (config only, on the meta device): 64x64 latents = 32x32 tokens, the same blocks, a 512 VAE."""
    loaded = random_dit_xl2(device="meta", dtype=torch.float16, with_vae=True, resolution=512)
    cfg = loaded.transformer.config
    assert loaded.name == "random-dit-xl2-512" and RANDOM_DIT_XL2[loaded.name] == 512
    assert (cfg.sample_size, cfg.patch_size, cfg.num_layers, cfg.num_attention_heads, cfg.attention_head_dim) == (64, 2, 28, 16, 72)
    assert loaded.transformer.pos_embed.height == 32 and loaded.vae.config.sample_size == 512
    assert random_dit_xl2(device="meta").name == "random-dit-xl2"
    with pytest.raises(DqarError, match="resolution"):
        random_dit_xl2(device="meta", resolution=384)
