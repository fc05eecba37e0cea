"""y = x @ w.T by each of the paper's methods, on paper-like data."""
import numpy as np
import pytest

import llmint8
from conftest import ref_llm_int8

# The paper-level accuracy target for LLM.int8() (relative error vs the float64 product).
LLM_INT8_MAX_REL_ERROR = 1.5e-2
# fp16 operands with fp32 accumulation: a few fp16 ulps of relative error.
FP16_MAX_REL_ERROR = 2e-3
# llmint8.matmul("llm.int8") vs the independent float64 oracle (differences: fp32 vs
# float64 rounding at quantization ties, fp32 accumulation of the outlier product).
ORACLE_REL_TOL = 1e-4


def data(m, k=1024, n=512, seed=0, dtype=np.float32):
    return llmint8.paper_like(m, k, n, dtype=dtype, seed=seed)


@pytest.mark.parametrize("m", [1, 32, 256])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_error_ordering_on_paper_like_data(m, dtype):
    # 2048 outputs: enough that the small gain of per-row weight scales shows at 1 token
    x, w, _ = data(m, n=2048, dtype=dtype, seed=m)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    err = {meth: llmint8.relative_error(llmint8.matmul(x, w, meth), ref) for meth in llmint8.METHODS}
    # with one token the whole tensor is one row: absmax and rowwise coincide
    assert err["absmax"] > err["rowwise"] if m > 1 else err["absmax"] == err["rowwise"], err
    assert err["rowwise"] > err["vectorwise"] > err["llm.int8"], err
    assert err["llm.int8"] <= LLM_INT8_MAX_REL_ERROR, err
    assert err["fp16"] <= FP16_MAX_REL_ERROR, err


@pytest.mark.parametrize("m", [1, 7, 64])
def test_llm_int8_matches_float64_oracle(m):
    x, w, _ = data(m, k=300, n=70, seed=10 + m)
    cols = llmint8.find_outlier_columns(x, 6.0)
    y = llmint8.matmul(x, w, "llm.int8", threshold=6.0)
    ref = ref_llm_int8(x, w, threshold=6.0, known=cols)
    assert y.dtype == np.float32 and y.shape == (m, 70)
    assert llmint8.relative_error(y, ref) <= ORACLE_REL_TOL


def test_vectorwise_is_llm_int8_without_outliers():
    x, w, _ = data(16, k=256, n=40, seed=3)
    y = llmint8.matmul(x, w, "vectorwise")
    ref = ref_llm_int8(x, w, threshold=0.0)
    assert llmint8.relative_error(y, ref) <= ORACLE_REL_TOL


def test_zeropoint_equals_product_of_dequantized_operands():
    x, w, _ = data(9, k=200, n=30, seed=4)
    qx, sx, zx = llmint8.quantize_zeropoint(x)
    qw, sw, zw = llmint8.quantize_zeropoint(w)
    xd = (qx.astype(np.float64) - zx) * np.float64(sx)
    wd = (qw.astype(np.float64) - zw) * np.float64(sw)
    y = llmint8.matmul(x, w, "zeropoint")
    np.testing.assert_allclose(y, xd @ wd.T, rtol=1e-5, atol=1e-5 * np.abs(xd @ wd.T).max())


@pytest.mark.parametrize("method", ["absmax", "rowwise"])
def test_symmetric_methods_equal_product_of_dequantized_operands(method):
    x, w, _ = data(9, k=200, n=30, seed=5)
    if method == "absmax":
        qx, sx = llmint8.quantize_absmax(x)
        xd = qx * np.float64(sx) / 127
    else:
        qx, sx = llmint8.quantize_rowwise(x)
        xd = qx * sx.astype(np.float64)[:, None] / 127
    qw, sw = llmint8.quantize_absmax(w)
    wd = qw * np.float64(sw) / 127
    np.testing.assert_allclose(llmint8.matmul(x, w, method), xd @ wd.T, rtol=1e-5,
                               atol=1e-5 * np.abs(xd @ wd.T).max())


def test_fp16_method_rounds_operands():
    x, w, _ = data(5, k=64, n=8, seed=6)
    ref = x.astype(np.float16).astype(np.float64) @ w.astype(np.float16).astype(np.float64).T
    np.testing.assert_allclose(llmint8.matmul(x, w, "fp16"), ref, rtol=1e-5, atol=1e-5)


def test_matmul_errors():
    x, w, _ = data(2, k=16, n=4)
    with pytest.raises(ValueError, match="unknown method"):
        llmint8.matmul(x, w, "int4")
    with pytest.raises(ValueError, match="same k"):
        llmint8.matmul(x, w[:, :8])
    with pytest.raises(TypeError, match="float16 or float32"):
        llmint8.matmul(x.astype(np.float64), w)
    bad = w.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="w contains NaN"):
        llmint8.matmul(x, bad)
