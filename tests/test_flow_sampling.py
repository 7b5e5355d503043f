"""dqar.sampling.sample_flow: bit-for-bit parity with FluxPipeline and StableDiffusion3Pipeline, schedules, the reuse contract.

Tiny random components built from configs (no hub); the pipelines get `prompt_embeds` directly, text encoders None.
"""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline

from dqar.errors import DqarError
from dqar.sampling import (FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG, FlowOutput, calculate_shift, evaluation_sigmas,
                           make_scheduler, sample_flow, set_flow_timesteps)

from conftest import make_tiny_transformer

STEPS = 3
SIZE = 64  # pixels: latents 8x8 (no VAE: scale factor 8), Flux packs them into 16 tokens


def tiny_flux(guidance_embeds: bool) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8)).eval()


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=64, out_channels=4).eval()


def tiny_vae() -> AutoencoderKL:
    """A random KL autoencoder with one downsampling (scale factor 2), the shift factor Flux and SD3 VAEs have."""
    torch.manual_seed(1)
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                         sample_size=16, scaling_factor=1.5, shift_factor=0.1).eval()


def embeds(transformer, seed: int, n: int = 2, tokens: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = transformer.config
    return {"prompt_embeds": torch.randn(n, tokens, c.joint_attention_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(n, c.pooled_projection_dim, generator=g)}


def negatives(transformer, seed: int) -> dict:
    return {f"negative_{k}": v for k, v in embeds(transformer, seed).items()}


def flux_pipeline(transformer, vae=None):
    pipe = FluxPipeline(scheduler=make_scheduler("flow", FLUX_SCHEDULER_CONFIG), vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline(transformer, vae=None):
    pipe = StableDiffusion3Pipeline(scheduler=make_scheduler("flow", SD3_SCHEDULER_CONFIG), vae=vae, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Recorder:
    """A reuse engine that records begin/end and counts the forwards between them."""

    def __init__(self, transformer):
        self.events, self.forwards = [], 0
        self.hook = transformer.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.forwards += 1

    def begin_generation(self, *, scheduler, num_evaluations, guided=None):
        self.events.append(("begin", num_evaluations, len(scheduler.timesteps), guided, self.forwards))

    def end_generation(self):
        self.events.append(("end", self.forwards))


@pytest.fixture(scope="module")
def flux_dev():
    return tiny_flux(guidance_embeds=True)


@pytest.fixture(scope="module")
def flux_plain():
    return tiny_flux(guidance_embeds=False)


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3()


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_flux_guidance_distilled_is_bit_identical(flux_dev, guidance):
    """FluxPipeline with a guidance-distilled transformer: one forward per step, the guidance embedding, no CFG."""
    e = embeds(flux_dev, seed=1)
    expected = flux_pipeline(flux_dev)(**e, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=guidance,
                                       generator=torch.Generator().manual_seed(5), output_type="latent").images
    out = sample_flow(flux_dev, make_scheduler("flow", FLUX_SCHEDULER_CONFIG), **e, height=SIZE, width=SIZE, steps=STEPS,
                      guidance=guidance, generator=torch.Generator().manual_seed(5))
    assert isinstance(out, FlowOutput) and out.images is None
    assert out.latents.shape == (2, 16, 16) and out.num_evaluations == STEPS and out.forwards_per_step == 1
    assert torch.equal(out.latents, expected)


def test_flux_true_cfg_is_bit_identical_with_two_forwards_per_step(flux_plain):
    e, neg = embeds(flux_plain, seed=2), negatives(flux_plain, seed=3)
    expected = flux_pipeline(flux_plain)(**e, **neg, true_cfg_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                                         generator=torch.Generator().manual_seed(6), output_type="latent").images
    out = sample_flow(flux_plain, make_scheduler("flow", FLUX_SCHEDULER_CONFIG), **e, **neg, cfg=4.0, height=SIZE,
                      width=SIZE, steps=STEPS, generator=torch.Generator().manual_seed(6))
    assert torch.equal(out.latents, expected)
    assert out.num_evaluations == STEPS and out.forwards_per_step == 2
    unguided = sample_flow(flux_plain, make_scheduler("flow", FLUX_SCHEDULER_CONFIG), **e, height=SIZE, width=SIZE,
                           steps=STEPS, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(unguided.latents, out.latents)  # the guidance did something


def test_given_latents_and_a_reused_scheduler(flux_dev):
    """Initial latents in the pipeline's packed layout give the pipeline's result; a second call on one scheduler repeats."""
    e = embeds(flux_dev, seed=1)
    noise = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(9))  # (N, h/2 * w/2, 4 C)
    expected = flux_pipeline(flux_dev)(**e, latents=noise, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                                       output_type="latent").images
    scheduler = make_scheduler("flow", FLUX_SCHEDULER_CONFIG)
    first = sample_flow(flux_dev, scheduler, **e, latents=noise, height=SIZE, width=SIZE, steps=STEPS)
    second = sample_flow(flux_dev, scheduler, **e, latents=noise, height=SIZE, width=SIZE, steps=STEPS)
    assert torch.equal(first.latents, expected) and torch.equal(second.latents, expected)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_sd3_is_bit_identical(sd3, cfg):
    e, neg = embeds(sd3, seed=4), negatives(sd3, seed=5)
    expected = sd3_pipeline(sd3)(**e, **neg, guidance_scale=cfg, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                                 generator=torch.Generator().manual_seed(7), output_type="latent").images
    out = sample_flow(sd3, make_scheduler("flow", SD3_SCHEDULER_CONFIG), **e, **neg, cfg=cfg, height=SIZE, width=SIZE,
                      steps=STEPS, generator=torch.Generator().manual_seed(7))
    assert out.latents.shape == (2, 4, 8, 8) and out.num_evaluations == STEPS
    assert torch.equal(out.latents, expected)


def test_sd3_dynamic_shift_is_bit_identical(sd3):
    e, neg = embeds(sd3, seed=4), negatives(sd3, seed=5)
    config = {**SD3_SCHEDULER_CONFIG, "use_dynamic_shifting": True}
    pipe = sd3_pipeline(sd3)
    pipe.scheduler = make_scheduler("flow", config)
    expected = pipe(**e, **neg, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(7), output_type="latent").images
    out = sample_flow(sd3, make_scheduler("flow", config), **e, **neg, height=SIZE, width=SIZE, steps=STEPS,
                      generator=torch.Generator().manual_seed(7))
    assert torch.equal(out.latents, expected)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_decoded_images_are_bit_identical(flux_dev, sd3, family):
    vae = tiny_vae()  # scale factor 2: 32 px is 16x16 latents
    transformer, pipe = (flux_dev, flux_pipeline(flux_dev, vae)) if family == "flux" else (sd3, sd3_pipeline(sd3, vae))
    e, neg = embeds(transformer, seed=8), negatives(transformer, seed=9)
    neg = neg if family == "sd3" else {}
    expected = pipe(**e, **neg, height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                    output_type="pt").images
    scheduler = make_scheduler("flow", FLUX_SCHEDULER_CONFIG if family == "flux" else SD3_SCHEDULER_CONFIG)
    out = sample_flow(transformer, scheduler, **e, **neg, height=32, width=32, steps=2, vae=vae,
                      generator=torch.Generator().manual_seed(3))
    assert out.images.shape == (2, 3, 32, 32) and out.images.dtype == torch.float32
    assert ((out.images > 0) & (out.images < 1)).float().mean() > 0.9  # not saturated: the comparison means something
    assert torch.equal(out.images, expected)


@pytest.mark.parametrize("size,steps", [(64, 3), (256, 28), (1024, 28), (512, 4)])
def test_flux_schedule_matches_the_pipeline(size, steps):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_shift, retrieve_timesteps

    seq_len = (size // 16) ** 2  # packed tokens: VAE factor 8, then 2x2 patches
    c = FLUX_SCHEDULER_CONFIG
    mu = diffusers_shift(seq_len, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
    assert calculate_shift(seq_len) == mu
    ref = make_scheduler("flow", c)
    expected, _ = retrieve_timesteps(ref, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    scheduler = make_scheduler("flow", c)
    timesteps = set_flow_timesteps(scheduler, steps, family="flux", image_seq_len=seq_len, device="cpu")
    assert torch.equal(timesteps, expected) and torch.equal(scheduler.sigmas, ref.sigmas)
    assert timesteps.shape == (steps,) and 0 < float(timesteps.min()) and float(timesteps.max()) == 1000.0
    assert float(scheduler.sigmas[-1]) == 0.0 and torch.equal(timesteps, scheduler.sigmas[:-1] * 1000)
    gaps = (scheduler.sigmas[:-2] - scheduler.sigmas[1:-1]).tolist()
    assert steps < 4 or max(gaps) / min(gaps) > 1.05  # shifted: not evenly spaced
    assert evaluation_sigmas(scheduler) == tuple(float(s) for s in scheduler.sigmas[:-1])


def test_dynamic_mu_grows_with_resolution():
    sigmas = []
    for size in (256, 1024):
        scheduler = make_scheduler("flow", FLUX_SCHEDULER_CONFIG)
        set_flow_timesteps(scheduler, 10, family="flux", image_seq_len=(size // 16) ** 2)
        sigmas.append(scheduler.sigmas)
    assert (sigmas[1][1:-1] > sigmas[0][1:-1]).all()  # a longer sequence shifts towards noise


def test_sd3_static_shift_schedule():
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

    ref = make_scheduler("flow", SD3_SCHEDULER_CONFIG)
    expected, _ = retrieve_timesteps(ref, 28, "cpu")
    scheduler = make_scheduler("flow", SD3_SCHEDULER_CONFIG)
    timesteps = set_flow_timesteps(scheduler, 28, family="sd3", image_seq_len=4096)  # seq len unused: static shift
    assert torch.equal(timesteps, expected)
    shift = lambda s: 3 * s / (1 + 2 * s)  # noqa: E731  (the static shift of 3)
    s = torch.linspace(1, shift(1 / 1000), 28, dtype=torch.float64)  # the scheduler spaces its (shifted) range evenly ...
    assert torch.allclose(scheduler.sigmas[:-1].double(), shift(s), atol=1e-6)  # ... and shifts again, as SD3 samples


def test_reuse_contract_separate_forward_cfg(monkeypatch):
    flux = tiny_flux(guidance_embeds=False)
    rec, names = Recorder(flux), []
    original = flux.cache_context

    def spy(name, **kw):  # the context of each forward: "cond" then "uncond" per step, as FluxPipeline
        names.append(name)
        return original(name, **kw)

    monkeypatch.setattr(flux, "cache_context", spy)
    out = sample_flow(flux, make_scheduler("flow", FLUX_SCHEDULER_CONFIG), **embeds(flux, 1), **negatives(flux, 2),
                      cfg=3.0, height=SIZE, width=SIZE, steps=STEPS, reuse=rec)
    assert rec.events == [("begin", STEPS, STEPS, False, 0), ("end", 2 * STEPS)]  # plans count steps; 2 forwards each
    assert names == ["cond", "uncond"] * STEPS and out.num_evaluations == STEPS


def test_reuse_contract_batched_cfg_and_end_on_error():
    sd3 = tiny_sd3()
    rec = Recorder(sd3)
    sample_flow(sd3, make_scheduler("flow", SD3_SCHEDULER_CONFIG), **embeds(sd3, 1), **negatives(sd3, 2), steps=STEPS,
                height=SIZE, width=SIZE, reuse=rec)
    assert rec.events == [("begin", STEPS, STEPS, True, 0), ("end", STEPS)]

    def boom(module, args):
        raise RuntimeError("boom")

    sd3.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError):
        sample_flow(sd3, make_scheduler("flow", SD3_SCHEDULER_CONFIG), **embeds(sd3, 1), cfg=1.0, steps=STEPS,
                    height=SIZE, width=SIZE, reuse=rec)
    assert rec.events[-2][:4] == ("begin", STEPS, STEPS, False) and rec.events[-1][0] == "end"


@pytest.mark.parametrize("family,cfg", [("flux", 1.0), ("flux", 3.0), ("sd3", 5.0)])
def test_loop_reads_nothing_back_from_the_device(family, cfg):
    """On the meta device any host read (.item(), bool(), nonzero) raises, so the loop running proves there is none."""
    transformer = tiny_flux(guidance_embeds=cfg == 1.0) if family == "flux" else tiny_sd3()
    e = {k: v.to("meta") for k, v in {**embeds(transformer, 1), **negatives(transformer, 2)}.items()}
    config = FLUX_SCHEDULER_CONFIG if family == "flux" else SD3_SCHEDULER_CONFIG
    out = sample_flow(transformer.to("meta"), make_scheduler("flow", config), **e, cfg=cfg, height=SIZE, width=SIZE,
                      steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert out.latents.device.type == "meta" and out.sigmas.device.type == "meta"


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"steps": 0}, "steps"),
        ({"cfg": -1.0}, "cfg"),
        ({"cfg": 3.0}, "needs negative_prompt_embeds"),
        ({"height": 60}, "multiple of 16"),
        ({"prompt_embeds": torch.zeros(2, 5, 7)}, r"\(N, T, 32\)"),
        ({"pooled_prompt_embeds": torch.zeros(3, 32)}, r"\(2, 32\)"),
        ({"cfg": 3.0, "negative_prompt_embeds": torch.zeros(2, 6, 32), "negative_pooled_prompt_embeds": torch.zeros(2, 32)},
         "same shapes"),
        ({"generator": [torch.Generator()]}, "one generator per prompt"),
        ({"latents": torch.zeros(2, 4, 8, 8)}, r"shape \(2, 16, 16\)"),
        ({"scheduler": make_scheduler("ddim", {})}, "FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_invalid_inputs_raise(flux_plain, kw, match):
    scheduler = kw.pop("scheduler", None) or make_scheduler("flow", FLUX_SCHEDULER_CONFIG)
    args = {**embeds(flux_plain, 1), "height": SIZE, "width": SIZE, "steps": 2, **kw}
    with pytest.raises(DqarError, match=match):
        sample_flow(flux_plain, scheduler, **args)


def test_schedule_inputs_are_checked():
    with pytest.raises(DqarError, match="unknown flow family 'wan'"):
        set_flow_timesteps(make_scheduler("flow", FLUX_SCHEDULER_CONFIG), 4, family="wan", image_seq_len=16)
    with pytest.raises(DqarError, match="steps"):
        set_flow_timesteps(make_scheduler("flow", FLUX_SCHEDULER_CONFIG), 0, family="flux", image_seq_len=16)


def test_a_dit_is_refused_both_ways():
    dit = make_tiny_transformer(num_layers=1)
    with pytest.raises(DqarError, match="flow-matching transformer"):
        sample_flow(dit, make_scheduler("flow", FLUX_SCHEDULER_CONFIG), prompt_embeds=torch.zeros(1, 2, 3),
                    pooled_prompt_embeds=torch.zeros(1, 3))
    from dqar.sampling import sample

    with pytest.raises(DqarError, match="flow-matching transformer"):
        sample(dit, [1], scheduler=make_scheduler("flow", FLUX_SCHEDULER_CONFIG), steps=2, seed=0)


@pytest.mark.parametrize("argv", [["sample", "--sampler", "flow"], ["sample", "--config", "{config}"],
                                  ["fid-sample", "--num-samples", "2", "--sampler", "flow"]])
def test_cli_refuses_flow_on_a_dit(capsys, tmp_path, argv):
    from dqar.cli.app import main

    config = tmp_path / "run.toml"
    config.write_text('[sample]\nsampler = "flow"\n')
    out = tmp_path / "out"
    argv = [a.format(config=config) for a in argv] + ["--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flow-matching transformer (Flux, SD3)" in err
    assert not out.exists()
