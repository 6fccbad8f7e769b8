
"""int8 feature vectors (cache/quant.py) against the bound their docstring states, computed naively."""

import warnings

import numpy as np
import pytest
import torch

from cache.quant import QMAX, dequantize, error_bound, quantize


def _features(seed: int, shape=(6, 5, 384)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 7] *= 12.0  # a few outlier channels, as ViT features have
    return x


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_within_half_a_scale_and_scale_tight(seed):
    x = _features(seed)
    q, scale = quantize(x)
    assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == x.shape[:-1]
    assert np.abs(q.astype(np.int32)).max() <= QMAX
    peak = np.abs(x).max(axis=-1).astype(np.float64)
    s = scale.astype(np.float64)
    assert (s * QMAX >= peak).all()  # nothing clips
    assert (s <= peak / QMAX * (1 + 2.0**-10)).all()  # at most one float16 step above the exact scale
    x_hat = q.astype(np.float64) * s[..., None]
    assert (np.abs(x_hat - x) <= s[..., None] / 2 * (1 + 1e-6)).all()
    assert np.allclose(dequantize(q, scale).numpy(), x_hat, rtol=0, atol=1e-6)
    assert np.allclose(error_bound(scale), s / 2)


def test_cosine_and_its_documented_bound():
    x = _features(3)
    q, scale = quantize(x)
    x_hat = dequantize(q, scale).numpy().astype(np.float64)
    cos = (x * x_hat).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(x_hat, axis=-1)
    d = x.shape[-1]
    bound = np.sqrt(1 - d * scale.astype(np.float64) ** 2 / (4 * (x.astype(np.float64) ** 2).sum(-1)))
    assert (cos >= bound - 1e-9).all()
    assert cos.min() >= 0.999


def test_round_trip_is_a_fixed_point_and_zeros_stay_zero():
    x = _features(4, (3, 64))
    x[1] = 0.0
    q, scale = quantize(x)
    assert scale[1] == 0 and (q[1] == 0).all() and (dequantize(q, scale)[1] == 0).all()
    q2, scale2 = quantize(dequantize(q, scale).numpy())
    assert np.array_equal(q2, q) and np.array_equal(scale2, scale)


def test_tensors_decode_like_arrays():
    q, scale = quantize(_features(5, (2, 4, 16)))
    assert torch.equal(dequantize(torch.from_numpy(q), torch.from_numpy(scale)), dequantize(q, scale))


def test_out_of_range_refused():
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([[1.0, np.inf]]))


def test_float64_input_is_quantized_as_its_float32_values():
    """The store holds float32 features' codes: a float64 array (numpy's default) is taken at float32 first, so
    its codes and scales are exactly those of its float32 copy (computing in float64 rounds some x / scale the
    other way)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        x = rng.standard_normal((64, 16)) * rng.uniform(0.01, 100)
        q64, s64 = quantize(x)
        q32, s32 = quantize(x.astype(np.float32))
        assert np.array_equal(q64, q32) and np.array_equal(s64, s32)


def test_dequantize_is_float32_codes_times_float32_scales():
    """The reader's features are float32: codes times scales in float32 (a float16 product would round the feature
    to 11 bits)."""
    rng = np.random.default_rng(1)
    q, scale = quantize((rng.standard_normal((32, 64)) * 3).astype(np.float32))
    out = dequantize(torch.from_numpy(q), torch.from_numpy(scale))
    assert out.dtype == torch.float32
    expected = q.astype(np.float32) * scale.astype(np.float32)[:, None]
    assert np.array_equal(out.numpy(), expected)


def test_a_zero_vector_quantizes_to_zero_codes_without_dividing_by_zero():
    """A zero feature vector (e.g. padding) has scale 0: its codes are 0, computed without a 0/0 (numpy's invalid
    value warning is an error here)."""
    x = np.zeros((3, 8), dtype=np.float32)
    x[1] = np.linspace(-1, 1, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q, scale = quantize(x)
    assert scale[0] == 0 and scale[2] == 0 and not q[0].any() and not q[2].any() and q[1].any()
