"""Int8Linear: semantics against the float64 oracle, shapes, dtypes, memory, copies."""
import pickle

import numpy as np
import pytest

import llmint8
from conftest import ref_llm_int8

# Layer output vs the independent float64 oracle (same algorithm; differences come from
# fp32 arithmetic and rounding ties), and fp16 outputs add one fp16 rounding.
ORACLE_REL_TOL = 1e-4
FP16_OUT_REL_TOL = 1e-3
LLM_INT8_MAX_REL_ERROR = 1.5e-2


def make(m, k, n, seed=0, dtype=np.float32, bias=True):
    x, w, cols = llmint8.paper_like(m, k, n, dtype=dtype, seed=seed)
    b = (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(dtype) if bias else None
    return x, w, b, cols


@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (5, 300, 70), (33, 1024, 129), (2, 1, 3)])
@pytest.mark.parametrize("known", ["none", "calibrated", "partial"])
def test_forward_matches_oracle(device, m, k, n, known):
    x, w, b, cols = make(m, k, n, seed=m + k)
    known_cols = {"none": [], "calibrated": cols, "partial": cols[:1]}[known]
    layer = llmint8.Int8Linear.from_float(w, bias=b, threshold=6.0, outlier_columns=known_cols, device=device)
    y = layer(x)
    ref = ref_llm_int8(x, w, b, 6.0, known_cols)
    assert y.dtype == np.float32 and y.shape == (m, n)
    assert llmint8.relative_error(y, ref) <= ORACLE_REL_TOL


@pytest.mark.parametrize("in_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("w_dtype", [np.float16, np.float32])
def test_dtypes_and_accuracy(device, in_dtype, w_dtype):
    x, w, b, cols = make(32, 1024, 256, seed=1)
    x, w, b = x.astype(in_dtype), w.astype(w_dtype), b.astype(w_dtype)
    layer = llmint8.Int8Linear.from_float(w, b, 6.0, cols, device=device)
    y = layer(x)
    assert y.dtype == in_dtype
    exact = x.astype(np.float64) @ w.astype(np.float64).T + b.astype(np.float64)
    assert llmint8.relative_error(y, exact) <= LLM_INT8_MAX_REL_ERROR
    ref = ref_llm_int8(x, w, b, 6.0, cols)
    assert llmint8.relative_error(y, ref) <= (FP16_OUT_REL_TOL if in_dtype == np.float16 else ORACLE_REL_TOL)


def test_fp16_output_is_fp32_output_rounded(device):
    x, w, b, cols = make(8, 256, 64, seed=2, dtype=np.float16)
    layer = llmint8.Int8Linear.from_float(w, b, 6.0, cols, device=device)
    np.testing.assert_array_equal(layer.forward(x, out_dtype=np.float16),
                                  layer.forward(x, out_dtype=np.float32).astype(np.float16))


def test_leading_dimensions(device):
    x, w, b, cols = make(24, 128, 32, seed=3)
    layer = llmint8.Int8Linear.from_float(w, b, device=device)
    y = layer(x.reshape(2, 3, 4, 128))
    assert y.shape == (2, 3, 4, 32)
    np.testing.assert_array_equal(y.reshape(24, 32), layer(x))
    assert layer(x[0]).shape == (32,)
    assert layer(x[:0]).shape == (0, 32)


def test_dynamic_outliers_use_dequantized_int8_weights(device):
    """A column found only at run time is multiplied in fp16 with the layer's int8 weight."""
    k, n = 64, 8
    rng = np.random.default_rng(7)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((3, k)).astype(np.float32)
    x[:, 10] = 40.0
    layer = llmint8.Int8Linear.from_float(w, threshold=6.0, device=device)
    ref = ref_llm_int8(x, w, None, 6.0, [])
    assert llmint8.relative_error(layer(x), ref) <= ORACLE_REL_TOL
    # and known columns use the exact fp16 weights, which is more accurate
    known = llmint8.Int8Linear.from_float(w, threshold=6.0, outlier_columns=[10], device=device)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert llmint8.relative_error(known(x), exact) < llmint8.relative_error(layer(x), exact)


def test_threshold_zero_turns_decomposition_off(device):
    x, w, _, _ = make(16, 256, 32, seed=4)
    y = llmint8.Int8Linear.from_float(w, threshold=0.0, device=device)(x)
    ref = ref_llm_int8(x, w, None, 0.0, [])
    assert llmint8.relative_error(y, ref) <= ORACLE_REL_TOL
    np.testing.assert_array_equal(y, llmint8.matmul(x, w, "vectorwise"))


def test_all_zero_rows_are_exact(device):
    x, w, b, cols = make(4, 64, 16, seed=5)
    x[1] = 0
    layer = llmint8.Int8Linear.from_float(w, b, 6.0, device=device)
    y = layer(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[1], b)
    z = llmint8.Int8Linear.from_float(np.zeros((3, 5), np.float32), device=device)
    assert np.all(z(np.ones((2, 5), np.float32)) == 0)
    np.testing.assert_array_equal(z.weight_scale, [0, 0, 0])


def test_held_weights(device):
    x, w, b, cols = make(4, 256, 48, seed=6)
    layer = llmint8.Int8Linear.from_float(w, b, 6.0, cols[::-1].tolist() + [int(cols[0])], device=device)
    np.testing.assert_array_equal(layer.outlier_columns, cols)  # sorted, deduplicated
    assert layer.outlier_columns.dtype == np.int32
    wq, ws = layer.weight_int8, layer.weight_scale
    assert wq.dtype == np.int8 and wq.shape == (48, 256) and ws.dtype == np.float32 and ws.shape == (48,)
    keep = np.ones(256, bool)
    keep[cols] = False
    np.testing.assert_array_equal(ws, np.abs(w[:, keep]).max(axis=1))  # absmax, outliers excluded
    assert np.all(wq[:, cols] == 0)
    np.testing.assert_array_equal(layer.outlier_weight, w[:, cols].astype(np.float16))
    np.testing.assert_array_equal(layer.bias, b)
    assert (layer.in_features, layer.out_features, layer.threshold) == (256, 48, 6.0)
    assert layer.device.startswith(device)
    wq[:] = 0  # copies: changing them leaves the layer alone
    assert np.any(layer.weight_int8 != 0)
    r = repr(layer)
    assert "in_features=256" in r and "out_features=48" in r and "outlier_columns=" in r


def test_memory_of_a_4096_layer(device):
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float16)
    layer = llmint8.Int8Linear.from_float(w, outlier_columns=np.arange(8) * 100, device=device)
    fp16_bytes = w.nbytes
    assert layer.nbytes <= 0.52 * fp16_bytes
    assert layer.nbytes >= 4096 * 4096 + 4096 * 4 + 4096 * 8 * 2  # int8 + scales + outlier columns


def test_pickle_and_to(device):
    x, w, b, cols = make(6, 128, 20, seed=8)
    layer = llmint8.Int8Linear.from_float(w, b, 6.0, cols, device=device)
    clone = pickle.loads(pickle.dumps(layer))
    assert type(clone) is llmint8.Int8Linear
    np.testing.assert_array_equal(clone(x), layer(x))
    cpu = layer.to("cpu")
    assert cpu.device == "cpu"
    np.testing.assert_allclose(cpu(x), layer(x), rtol=1e-5, atol=1e-5)


def test_default_device_is_best_available():
    layer = llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32))
    assert layer.device == ("cuda:0" if llmint8.cuda_available() else "cpu")


def test_subclassing_keeps_working():
    class Mine(llmint8.Int8Linear):
        pass

    layer = Mine.from_float(np.eye(4, dtype=np.float32), device="cpu")
    assert type(layer) is Mine
    np.testing.assert_allclose(layer(np.eye(4, dtype=np.float32)), np.eye(4), atol=1e-6)
