"""Regression tests for hostile or extreme use of the public API: long column lists,
values beyond fp16's range, unsorted raw-constructor input, errors that name the
argument the caller passed, and the held bytes of a layer on every CPU kernel."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import llmint8
from llmint8 import _C
from conftest import int8linear_nbytes, ref_llm_int8

# same meaning as in test_linear.py: layer vs the float64 oracle of the same algorithm
ORACLE_REL_TOL = 1e-4
FP16_MAX = 65504.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- outlier_columns: long lists, out-of-range values, scalars
def test_a_million_outlier_columns_do_not_hang():
    """10**6 entries were sorted by insertion: about an hour with the GIL held. Run in a
    child process so that a regression fails this test instead of hanging the suite; the
    limit is a hang guard (the work takes well under a second), not a speed target."""
    code = ("import numpy as np, llmint8\n"
            "cols = np.random.default_rng(0).integers(0, 4096, 10**6)\n"
            "layer = llmint8.Int8Linear.from_float(np.ones((16, 4096), np.float16), outlier_columns=cols,"
            " device='cpu')\n"
            "assert np.array_equal(layer.outlier_columns, np.unique(cols)), 'columns'\n"
            "q, s = llmint8.quantize_rowwise(np.ones((2, 4096), np.float32), skip_columns=cols[::-1])\n"
            "assert not q[:, np.unique(cols)].any()\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("Int8Linear.from_float with 10**6 outlier columns did not finish in 120 s")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("bad,shown", [([2**63], "9223372036854775808"), ([2**64 + 5], "18446744073709551621"),
                                       ([2**70], "1180591620717411303424"), ([-1], "-1"),
                                       (np.array([3], np.uint8), "3"), (np.array([2**63], np.uint64),
                                                                        "9223372036854775808")])
def test_out_of_range_columns_are_reported_as_given(bad, shown):
    with pytest.raises(ValueError, match=rf"outlier_columns holds column {shown}; expected indices in \[0, 3\)"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), outlier_columns=bad)
    with pytest.raises(ValueError, match=rf"skip_columns holds column {shown}"):
        llmint8.quantize_rowwise(np.ones((2, 3), np.float32), skip_columns=bad)


@pytest.mark.parametrize("scalar", [5, np.int64(1), 0])
def test_scalar_outlier_columns_are_rejected(scalar):
    with pytest.raises(TypeError, match="outlier_columns must be a 1-D sequence of column indices, got a scalar"):
        llmint8.Int8Linear.from_float(np.ones((2, 8), np.float32), outlier_columns=scalar)
    with pytest.raises(TypeError, match="skip_columns must be a 1-D sequence"):
        llmint8.quantize_rowwise(np.ones((2, 8), np.float32), skip_columns=scalar)


# ---- the raw constructor pairs outlier_columns[i] with outlier_weight[:, i]
def test_raw_constructor_sorts_columns_with_their_weights():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 10)).astype(np.float32)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    cols = [5, 3, 8]
    wq, ws, wo = _C.quantize_weight(w, cols)  # wo's columns follow sorted(cols) = [3, 5, 8]
    order = np.argsort(cols)
    wo_given = np.empty_like(wo)
    wo_given[:, order] = wo  # the weight columns in the order of `cols`
    raw = llmint8.Int8Linear(wq, ws, cols, wo_given, None, 6.0, "cpu")
    ref = llmint8.Int8Linear.from_float(w, threshold=6.0, outlier_columns=cols, device="cpu")
    np.testing.assert_array_equal(raw.outlier_columns, [3, 5, 8])
    np.testing.assert_array_equal(raw.outlier_weight, wo)
    np.testing.assert_array_equal(raw(x), ref(x))
    assert llmint8.relative_error(raw(x), ref_llm_int8(x, w, None, 6.0, cols)) <= ORACLE_REL_TOL
    with pytest.raises(ValueError, match="outlier_columns holds column 3 twice"):
        llmint8.Int8Linear(wq, ws, [3, 5, 3], np.zeros((6, 3), np.float16))


# ---- float32 values beyond fp16's range
def big_case(seed, big, known):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((12, 32)).astype(np.float32)
    x = rng.standard_normal((5, 32)).astype(np.float32)
    x[1, 7] = big
    x[3, 7] = -big / 3
    layer = llmint8.Int8Linear.from_float(w, threshold=6.0, outlier_columns=[7] if known else None, device="cpu")
    return x, w, layer


@pytest.mark.parametrize("big", [7e4, 1e9, 1e30])
@pytest.mark.parametrize("known", [False, True])
def test_float32_inputs_beyond_fp16_stay_finite(big, known):
    x, w, layer = big_case(1, big, known)
    y = layer(x)
    assert np.all(np.isfinite(y)), "the outlier product must not overflow for float32 x"
    ref = ref_llm_int8(x, w, None, 6.0, [7] if known else [])
    assert llmint8.relative_error(y, ref) <= ORACLE_REL_TOL
    if known:  # fp16 weight column, x unrounded: the big term dominates row 1
        exact = x.astype(np.float64) @ w.astype(np.float64).T
        np.testing.assert_allclose(y[1], exact[1], rtol=1e-3)


def test_float32_weight_beyond_fp16_in_a_dynamic_column():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    w[2] *= 1e4
    w[2, 4] = 1.5e5  # the row's scale, and its dequantized value in column 4 exceeds fp16
    x = rng.standard_normal((3, 16)).astype(np.float32)
    x[:, 4] = 20.0  # column 4 is found at run time
    layer = llmint8.Int8Linear.from_float(w, threshold=6.0, device="cpu")
    y = layer(x)
    assert np.all(np.isfinite(y))
    assert llmint8.relative_error(y, ref_llm_int8(x, w, None, 6.0, [])) <= ORACLE_REL_TOL
    # float16 x keeps fp16 operands: that weight cannot be one, and the error says which
    with pytest.raises(ValueError, match=r"x is float16, but the layer's weight\[2, 4\] = .* beyond float16's range"):
        layer.forward(x.astype(np.float16), out_dtype=np.float32)


def test_float32_weight_beyond_fp16_in_a_known_column_names_weight():
    w = np.ones((4, 6), np.float32)
    w[1, 2] = 1e5
    with pytest.raises(ValueError, match=r"weight\[1, 2\] = 100000 is beyond float16's range") as e:
        llmint8.Int8Linear.from_float(w, outlier_columns=[2], device="cpu")
    assert "outlier_weight" not in str(e.value)
    layer = llmint8.Int8Linear.from_float(w, outlier_columns=[3], device="cpu")  # elsewhere it is fine
    x = np.ones((2, 6), np.float32)
    np.testing.assert_allclose(layer(x), x.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-2)


# ---- errors that name what the caller passed
def test_empty_weight_names_weight():
    with pytest.raises(ValueError, match=r"^weight must have at least one row and column, got \(0, 64\)"):
        llmint8.Int8Linear.from_float(np.ones((0, 64), np.float32))
    with pytest.raises(ValueError, match=r"^weight must have at least one row and column, got \(4, 0\)"):
        llmint8.Int8Linear.from_float(np.ones((4, 0), np.float32))


@pytest.mark.parametrize("bad,name", [(None, "NoneType"), ("abc", "str"), ({"a": 1}, "dict"), (object(), "object")])
def test_non_arrays_are_type_errors(bad, name):
    layer = llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), device="cpu")
    with pytest.raises(TypeError, match=rf"x must be a float16 or float32 array of shape \(\.\.\., 3\), got {name}"):
        layer(bad)
    with pytest.raises(TypeError):
        layer.forward(bad)


def test_threshold_zero_finds_no_columns_as_documented():
    """threshold 0 means "no decomposition" everywhere; the docs must say so next to |x| >= threshold."""
    x = np.ones((2, 4), np.float32)
    assert len(llmint8.find_outlier_columns(x, 0)) == 0
    assert list(llmint8.find_outlier_columns(x, 1.0)) == [0, 1, 2, 3]
    for doc in (llmint8.find_outlier_columns.__doc__, _C.find_outlier_columns.__doc__):
        assert "threshold" in doc and re.search(r"0 .*empty", doc.replace("\n", " ")), doc
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    row = next(line for line in readme.splitlines() if line.startswith("| `find_outlier_columns"))
    assert "threshold=0" in row or "threshold 0" in row, row


# ---- held bytes follow the packed layout of each kernel (gemm.h)
@pytest.mark.parametrize("kernel", llmint8.cpu_kernels())
def test_nbytes_is_the_held_layout(kernel):
    rng = np.random.default_rng(0)
    try:
        llmint8.set_cpu_kernel(kernel)
        for n, k, cols, bias in [(1, 1, [], False), (17, 30, [2, 9], True), (64, 64, [], False), (48, 256, [0], True)]:
            w = rng.standard_normal((n, k)).astype(np.float32)
            b = np.zeros(n, np.float32) if bias else None
            layer = llmint8.Int8Linear.from_float(w, b, outlier_columns=cols, device="cpu")
            assert layer.nbytes == int8linear_nbytes(kernel, n, k, len(cols), bias), (kernel, n, k)
    finally:
        llmint8.set_cpu_kernel(None)
