"""INT8 quantization: round-trip bounds, byte accounting, edge values."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dqar.errors import DqarError
from dqar.engine.quant import dequantize, error_bound, is_finite, nbytes, quantize

MODES = ["tensor", "channel", "head", "token"]


@st.composite
def tensors(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 9))
    heads = draw(st.sampled_from([1, 2, 4]))
    c = heads * draw(st.integers(1, 8))
    magnitude = draw(st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4, 1e30]))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    if dtype != torch.float32:
        magnitude = min(magnitude, 1e4)
    x = torch.randn(b, t, c, generator=torch.Generator().manual_seed(seed)) * magnitude
    if draw(st.booleans()):
        x[..., 0] = magnitude  # a constant column
    return x.to(dtype), heads


@settings(max_examples=60, deadline=None)
@given(tensors(), st.sampled_from(MODES))
def test_round_trip_within_half_scale(data, mode):
    x, heads = data
    q = quantize(x, mode, heads)
    back = dequantize(q)
    assert back.shape == x.shape and back.dtype == x.dtype
    assert q.values.dtype == torch.int8
    err = (back.float() - x.float()).abs()
    # half a quantization step per group, plus the rounding of the dequantized value to x's dtype
    slack = back.float().abs() * (torch.finfo(x.dtype).eps if x.dtype != torch.float32 else 1e-6)
    assert bool((err <= error_bound(q) * (1 + 1e-5) + slack + 1e-37).all())
    assert bool(is_finite(q))


@pytest.mark.parametrize("mode", MODES)
def test_zeros_quantize_without_division_by_zero(mode):
    x = torch.zeros(2, 5, 8)
    q = quantize(x, mode, num_heads=2)
    assert torch.equal(dequantize(q), x)
    assert bool(torch.isfinite(q.scale).all())


@pytest.mark.parametrize("mode", MODES)
def test_int8_bytes_at_most_052_of_fp16(mode):
    x = torch.randn(4, 256, 128, dtype=torch.float16)  # width 128; per-token scales cost 4/(2*128) of fp16
    q = quantize(x, mode, num_heads=4)
    assert q.nbytes <= 0.52 * nbytes(x)
    assert q.nbytes == x.numel() + q.scale.numel() * 4  # values + float32 scales, nothing hidden


def test_nonfinite_is_flagged_or_refused():
    x = torch.randn(2, 4, 8)
    x[0, 1, 2] = math.inf
    q = quantize(x, "token")
    assert not bool(is_finite(q))
    x[0, 1, 2] = math.nan
    with pytest.raises(DqarError, match="NaN or Inf"):
        quantize(x, "tensor", check=True)


def test_finer_scales_are_more_accurate_on_uneven_channels():
    x = torch.randn(2, 16, 32) * torch.logspace(-3, 2, 32)  # channel magnitudes over 5 decades
    errs = {m: (dequantize(quantize(x, m, 4)) - x).norm().item() for m in MODES}
    assert errs["channel"] < errs["tensor"]
    assert errs["head"] < errs["tensor"]


def test_unknown_mode_and_bad_heads():
    with pytest.raises(DqarError, match="unknown quant mode"):
        quantize(torch.ones(2, 3), "row")
    with pytest.raises(DqarError, match="heads"):
        quantize(torch.ones(2, 6), "head", num_heads=4)


def _group_mask(shape, mode: str, heads: int, pick: torch.Tensor) -> torch.Tensor:
    """(B, T, C) bool: the elements of the groups `pick` selects (one flag per group of `mode`)."""
    b, t, c = shape
    if mode == "tensor":
        return pick[:1].reshape(1, 1, 1).expand(shape)
    if mode == "channel":
        return pick[:c].reshape(1, 1, c).expand(shape)
    if mode == "token":
        return pick[: b * t].reshape(b, t, 1).expand(shape)
    return pick[:heads].repeat_interleave(c // heads).reshape(1, 1, c).expand(shape)  # head


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(MODES), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.integers(0, 2**16),
       st.sampled_from([1e-3, 1.0, 1e4]))
def test_all_zero_groups_dequantize_to_exact_zeros_in_every_mode_and_dtype(mode, dtype, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, 5, 8, generator=g) * magnitude).to(dtype)
    zero = _group_mask(x.shape, mode, 2, torch.rand(64, generator=g) < 0.5)
    x = x.masked_fill(zero, 0.0)
    q = quantize(x, mode, num_heads=2)
    back = dequantize(q)
    assert bool(torch.isfinite(q.scale).all()) and bool(is_finite(q))
    assert bool((back[zero] == 0).all())
    assert bool((dequantize(quantize(torch.zeros_like(x), mode, num_heads=2)) == 0).all())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_values_are_flagged_refused_and_stay_in_their_group(mode, bad):
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    x[1, 3, 5] = bad  # token (1, 3), channel 5, head 1 of 2
    q = quantize(x, mode, num_heads=2)
    assert not bool(is_finite(q))
    with pytest.raises(DqarError, match="NaN or Inf"):
        quantize(x, mode, num_heads=2, check=True)
    hit = torch.zeros(64, dtype=torch.bool)
    hit[{"tensor": 0, "channel": 5, "token": 1 * 5 + 3, "head": 1}[mode]] = True
    clean = ~_group_mask(x.shape, mode, 2, hit)  # elements of the other groups
    back = dequantize(q)
    assert bool(torch.isfinite(back[clean]).all())
    assert bool(((back - x).abs()[clean] <= error_bound(q)[clean] * (1 + 1e-6)).all())
