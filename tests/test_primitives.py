"""Quantization primitives against float64 NumPy references."""
import numpy as np
import pytest

import llmint8
from conftest import ref_quantize_rows

# One quantization step is absmax/127; float32 vs float64 arithmetic can move a value
# sitting on a rounding tie by one step, never more.
MAX_Q_DIFF = 1
# Share of elements allowed to differ by that one step (ties are rare in random data).
MAX_TIE_SHARE = 1e-3


def rand(shape, dtype, seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(7,), (5, 33), (1, 1), (64, 300)])
def test_absmax_matches_reference(dtype, shape):
    x = rand(shape, dtype)
    q, s = llmint8.quantize_absmax(x)
    x64 = x.astype(np.float64)
    s_ref = np.abs(x64).max()
    q_ref = np.rint(127 * x64 / s_ref)
    assert q.dtype == np.int8 and q.shape == x.shape and s.dtype == np.float32
    assert s == np.float32(s_ref)
    d = np.abs(q.astype(np.int64) - q_ref)
    assert d.max() <= MAX_Q_DIFF and np.mean(d > 0) <= MAX_TIE_SHARE
    assert np.abs(q).max() == 127
    x_hat = llmint8.dequantize(q, s)
    assert x_hat.dtype == np.float32
    # dequantization error is at most half a step, plus the tie slack
    assert np.abs(x_hat - x64).max() <= s_ref / 127 * (0.5 + MAX_Q_DIFF) + 1e-6


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", [(5, 33), (1, 300), (64, 1), (9,)])
def test_rowwise_matches_reference(dtype, shape):
    x = rand(shape, dtype, seed=1)
    q, s = llmint8.quantize_rowwise(x)
    x2 = x.reshape(-1, shape[-1])
    q_ref, s_ref = ref_quantize_rows(x2)
    assert s.dtype == np.float32 and s.shape == (x2.shape[0],)
    np.testing.assert_array_equal(s, s_ref.astype(np.float32))
    d = np.abs(q.reshape(x2.shape).astype(np.int64) - q_ref)
    assert d.max() <= MAX_Q_DIFF and np.mean(d > 0) <= MAX_TIE_SHARE
    x_hat = llmint8.dequantize(q, s)
    assert x_hat.shape == x.shape
    err = np.abs(x_hat.reshape(x2.shape) - x2.astype(np.float64))
    assert np.all(err <= s_ref[:, None] / 127 * (0.5 + MAX_Q_DIFF) + 1e-6)


def test_rowwise_skip_columns_and_zero_rows():
    x = rand((4, 10), np.float32, seed=2)
    x[2] = 0
    x[:, 3] = 50.0
    q, s = llmint8.quantize_rowwise(x, skip_columns=[3])
    q_ref, s_ref = ref_quantize_rows(x, [3])
    np.testing.assert_array_equal(s, s_ref.astype(np.float32))
    assert np.all(q[:, 3] == 0) and s[2] == 0 and np.all(q[2] == 0)
    assert np.all(np.isfinite(llmint8.dequantize(q, s)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("offset", [0.0, 5.0, -5.0])
def test_zeropoint_matches_reference(dtype, offset):
    x = (rand((6, 50), np.float32, seed=3) + offset).astype(dtype)
    q, scale, zp = llmint8.quantize_zeropoint(x)
    x64 = x.astype(np.float64)
    lo, hi = min(x64.min(), 0.0), max(x64.max(), 0.0)
    s_ref = (hi - lo) / 255
    zp_ref = int(np.clip(np.rint(-128 - lo / s_ref), -128, 127))
    q_ref = np.clip(np.rint(x64 / s_ref) + zp_ref, -128, 127)
    assert abs(zp - zp_ref) <= 1 and np.isclose(scale, s_ref, rtol=1e-6)
    d = np.abs(q.astype(np.int64) - q_ref)
    assert d.max() <= MAX_Q_DIFF
    # the full range is used: one end of it is hit
    assert q.min() == -128 or q.max() == 127
    x_hat = llmint8.dequantize(q, scale, zp)
    assert np.abs(x_hat - x64).max() <= s_ref * (0.5 + MAX_Q_DIFF) + 1e-6
    assert np.all(llmint8.dequantize(llmint8.quantize_zeropoint(np.zeros(3, dtype))[0], 0.0, 0) == 0)


def test_all_zero_gives_zero_scale_and_exact_zeros():
    for dt in (np.float16, np.float32):
        z = np.zeros((3, 8), dt)
        q, s = llmint8.quantize_absmax(z)
        assert s == 0 and np.all(q == 0) and np.all(llmint8.dequantize(q, s) == 0)
        q, s = llmint8.quantize_rowwise(z)
        assert np.all(s == 0) and np.all(q == 0) and np.all(llmint8.dequantize(q, s) == 0)
        q, s, zp = llmint8.quantize_zeropoint(z)
        assert s == 0 and zp == 0 and np.all(q == 0)


def test_fp16_conversion_of_every_finite_half():
    # rowwise scales are max |x| computed after the C fp16 -> fp32 conversion: exact
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    h = bits.view(np.float16)
    h = h[np.isfinite(h)].reshape(-1, 2)  # 63490 finite values, one per row pair
    q, s = llmint8.quantize_rowwise(h)
    np.testing.assert_array_equal(s, np.abs(h.astype(np.float32)).max(axis=1))


def test_subnormal_scale_does_not_overflow():
    x = np.array([1e-45, -1e-45, 0.0], np.float32)
    q, s = llmint8.quantize_absmax(x)
    assert list(q) == [127, -127, 0]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_find_outlier_columns(dtype):
    x = rand((20, 40), np.float32, seed=4).clip(-5, 5)
    x[3, 7] = 6.0          # exactly the threshold counts
    x[0, 30] = -9.0        # sign does not matter
    x[5, 12] = 5.99        # just below does not
    x = x.astype(dtype)
    cols = llmint8.find_outlier_columns(x, 6.0)
    ref = np.nonzero(np.abs(x.astype(np.float64)).max(axis=0) >= 6.0)[0]
    assert cols.dtype == np.int32
    np.testing.assert_array_equal(cols, ref)
    np.testing.assert_array_equal(cols, [7, 30])
    assert llmint8.find_outlier_columns(x, 0.0).size == 0       # 0 = decomposition off
    np.testing.assert_array_equal(llmint8.find_outlier_columns(x[3], 6.0), [7])  # 1-D: one row
    assert llmint8.find_outlier_columns(x, 100.0).size == 0

