"""Shared test helpers: tiny seeded random models, a stand-in denoising loop, host-sync guards, the data slice.

Test modules import these with `from conftest import ...` (tests/ is on sys.path under pytest's rootdir
conftest); no test module imports another.
"""
import contextlib
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

E = 12  # evaluations of `drive`
TAU_HUGE = ((0.0, 1e9), (1.0, 1e9))  # verify_tau knots: every error passes
TAU_ZERO = ((0.0, 0.0), (1.0, 0.0))  # verify_tau knots: every error refreshes
FASHION_MNIST = Path(__file__).parent / "data" / "fashion-mnist"  # 256 training and 500 test images (README.md there)


def make_tiny_transformer(
    seed: int = 0,
    num_layers: int = 4,
    heads: int = 2,
    head_dim: int = 16,
    sample_size: int = 8,
    patch_size: int = 2,
    in_channels: int = 4,
    learned_sigma: bool = True,
    num_classes: int = 1000,
) -> DiTTransformer2DModel:
    """A random DiT shaped like DiT-XL/2 (ada_norm_zero, learned sigma), small enough for CPU tests."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=2 * in_channels if learned_sigma else in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
        norm_num_groups=1,
    )
    # ada_norm_zero initialises gates to zero in training code only; random weights here are already non-zero.
    return model.eval()


@pytest.fixture
def tiny_transformer():
    return make_tiny_transformer()


TINY_ADAPTIVE = dict(samples=2, probe_samples=2, calib_samples=1, calib_steps=1, targets=(0.5,), steps=6, kinds=("taylor",),
                     gate_kinds=())  # the smallest adaptive comparison on the embedded DiT


@pytest.fixture(scope="session")
def tiny_adaptive():
    """One `run_adaptive` result at `TINY_ADAPTIVE` (one thread), shared by the tests that extend a saved result;
    each test deep-copies what it changes (the extensions never modify their input)."""
    from dqar.studies.fidelity import adaptive as A

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return A.run_adaptive(A.AdaptiveSettings(**TINY_ADAPTIVE), progress=False)
    finally:
        torch.set_num_threads(before)


def constant_checkpoint(log_error: float, names, meta: dict, hidden: int = 8):
    """A policy checkpoint over the feature set `names` predicting exp(log_error) everywhere (`meta` joins its metadata)."""
    from dqar.engine.policy_net import PolicyCheckpoint, PolicyNet

    net = PolicyNet(len(names), (hidden,))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.layers[-1].bias.fill_(log_error)
    f = len(names)
    return PolicyCheckpoint(net.eval(), torch.zeros(f), torch.ones(f), 0.0, 1.0,
                            {"features": list(names), "hidden": [hidden], **meta})


@pytest.fixture(scope="module")
def flux(single_thread):
    """The shipped embedded-flux (modules that need another Flux define their own `flux`)."""
    from dqar.models import load_model

    return load_model("embedded-flux")


@pytest.fixture(scope="module")
def dit(single_thread):
    """The shipped embedded DiT (modules that need another DiT define their own `dit`)."""
    from dqar.models import load_model

    return load_model("embedded")


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module (restored after): small tensors on a shared machine run faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random KL autoencoder: 16x16 RGB <-> 4x8x8 latents (one downsampling)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


def tiny_loaded(num_layers: int = 3):
    """A random pixel-space DiT (3 layers by default) as `dqar.models.load_model` returns it (1000 classes, no VAE)."""
    from dqar.models import DIT_SCHEDULER_CONFIG, LoadedModel

    return LoadedModel(transformer=make_tiny_transformer(num_layers=num_layers), vae=None, scheduler_config=dict(DIT_SCHEDULER_CONFIG),
                       num_classes=1000, null_class=1000, name="tiny", pixel_space=True, class_names=None)


def make_pipe() -> DiTPipeline:
    """A stock diffusers DiTPipeline around a tiny DiT and VAE (16x16 RGB images)."""
    from dqar.models import DIT_SCHEDULER_CONFIG

    scheduler = DDIMScheduler.from_config(DIT_SCHEDULER_CONFIG)
    return DiTPipeline(transformer=make_tiny_transformer(), vae=make_tiny_vae(), scheduler=scheduler)


def pipe_images(pipe, steps=10, seed=0):
    """Images (N, H, W, C) of classes 1 and 2 from `pipe`, CFG 4, seeded."""
    out = pipe([1, 2], num_inference_steps=steps, guidance_scale=4.0, generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images


def drive(model, handle=None, evaluations=E, seed=0, guard=None):
    """A stand-in denoising loop: E evaluations on slowly drifting inputs; returns the outputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, 8, 8, generator=g)  # (2N, C, H, W) with CFG
    labels = torch.tensor([3, 7, 1000, 1000])
    if handle is not None:
        handle.begin_generation(evaluations)
    outs = []
    with torch.no_grad(), (guard or contextlib.nullcontext()):
        for e in range(evaluations):
            t = torch.full((4,), 999 - 80 * e)
            out = model(x, timestep=t, class_labels=labels).sample  # (2N, 2C, H, W)
            outs.append(out)
            x = x - 0.05 * out[:, :4]
    if handle is not None:
        handle.end_generation()
    return outs


HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


class CountSyncs(TorchDispatchMode):
    """Counts device→host scalar reads."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.on_sync(func)
        return func(*args, **(kwargs or {}))

    def on_sync(self, func) -> None:
        self.count += 1


class NoSync(CountSyncs):
    """Fails on the first device→host scalar read."""

    def on_sync(self, func) -> None:
        raise AssertionError(f"host sync: {func}")
