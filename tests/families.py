"""Tiny random diffusers transformers and their stock pipelines, built from configs (no hub, no text encoders).

Each `FAMILIES` entry builds (pipeline, call kwargs) for one family: the pipeline gets `prompt_embeds` directly and
returns latents, so nothing is downloaded and no text encoder runs.
"""
from __future__ import annotations

import torch
from diffusers import (AutoencoderKLWan, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel,
                       QwenImagePipeline, QwenImageTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)

from dqar.sampling import FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pixart(alpha: bool = False):
    """PixArt-Σ's pipeline, or PixArt-α's (`alpha`) around the same kind of transformer."""
    torch.manual_seed(0)
    t = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                                 in_channels=4, out_channels=8, cross_attention_dim=16, caption_channels=16,
                                 norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
                                 use_additional_conditions=False).eval()
    cls = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = cls(tokenizer=None, text_encoder=None, vae=None, transformer=t, scheduler=DPMSolverMultistepScheduler())
    pipe.vae_scale_factor = 8
    e = torch.randn(1, 6, 16, generator=_g(1))
    kwargs = dict(prompt=None, negative_prompt=None, prompt_embeds=e, prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                  negative_prompt_embeds=torch.zeros_like(e), negative_prompt_attention_mask=torch.ones(1, 6, dtype=torch.long),
                  height=64, width=64, guidance_scale=4.0, use_resolution_binning=False)
    return pipe, kwargs


def sd3(dual_attention: bool = False):
    """SD3; `dual_attention`: SD3.5-medium's blocks (a second self-attention on the first layers, q/k RMS norms)."""
    torch.manual_seed(0)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if dual_attention else {}
    t = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                              pooled_projection_dim=64, out_channels=4, **extra).eval()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None, transformer=t)
    g = _g(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 64, generator=g),
                  negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 64, generator=g), height=64, width=64, guidance_scale=4.0)
    return pipe, kwargs


def flux(true_cfg: bool = False):
    torch.manual_seed(0)
    t = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               guidance_embeds=not true_cfg, axes_dims_rope=(4, 4, 8)).eval()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=t)
    g = _g(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                  height=64, width=64)
    if true_cfg:
        kwargs.update(negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g), true_cfg_scale=4.0)
    else:
        kwargs.update(guidance_scale=3.5)
    return pipe, kwargs


def wan():
    torch.manual_seed(0)
    t = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                              text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32).eval()
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False]).eval()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=t, vae=vae,
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    g = _g(1)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                  height=16, width=16, num_frames=1, guidance_scale=4.0)
    return pipe, kwargs


QWEN_SCHEDULER_CONFIG = dict(base_image_seq_len=256, max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift=1.0,
                             shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def qwen_image():
    """Qwen-Image: dual-stream joint-attention blocks, true CFG as separate forwards ("cond" / "uncond")."""
    torch.manual_seed(0)
    t = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(QWEN_SCHEDULER_CONFIG), vae=None,
                             text_encoder=None, tokenizer=None, transformer=t)
    g, mask = _g(1), torch.ones(1, 5, dtype=torch.long)
    kwargs = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), prompt_embeds_mask=mask,
                  negative_prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds_mask=mask,
                  height=64, width=64, true_cfg_scale=4.0)
    return pipe, kwargs


FAMILIES = {"pixart_sigma": pixart, "pixart_alpha": lambda: pixart(alpha=True), "sd3": sd3, "sd35": lambda: sd3(dual_attention=True),
            "flux": flux, "flux_true_cfg": lambda: flux(true_cfg=True), "wan": wan, "qwen_image": qwen_image}


def run(pipe, kwargs, steps: int, seed: int = 0) -> torch.Tensor:
    """The pipeline's latents after `steps` steps from a fixed noise seed."""
    pipe.set_progress_bar_config(disable=True)
    out = pipe(num_inference_steps=steps, generator=_g(seed), output_type="latent", **kwargs)
    return (out.images if hasattr(out, "images") else out.frames)
