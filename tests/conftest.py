"""Shared fixtures: tiny seeded random DiT models for fast CPU tests."""
import pytest
import torch
from diffusers import DiTTransformer2DModel


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


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for the module (restored after): small tensors on a shared machine run faster so."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
