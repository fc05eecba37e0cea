"""Every error path once, odd memory layouts, and inputs left unchanged."""
import numpy as np
import pytest

import llmint8
from llmint8 import _C


@pytest.fixture
def layer(device):
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    return llmint8.Int8Linear.from_float(w, bias=np.zeros(8, np.float32), device=device)


# ---- dtypes: TypeError naming the argument and the expected dtypes
@pytest.mark.parametrize("fn", [llmint8.quantize_absmax, llmint8.quantize_rowwise, llmint8.quantize_zeropoint,
                                llmint8.find_outlier_columns])
@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int8, np.bool_, np.complex64])
def test_primitives_reject_dtypes(fn, dtype):
    with pytest.raises(TypeError, match=r"x must be float16 or float32, got"):
        fn(np.ones((2, 3), dtype))


def test_layer_rejects_dtypes(layer):
    with pytest.raises(TypeError, match="x must be float16 or float32, got float64"):
        layer(np.ones((2, 16)))
    with pytest.raises(TypeError, match="out_dtype must be float16 or float32"):
        layer.forward(np.ones((2, 16), np.float32), out_dtype=np.int32)
    with pytest.raises(TypeError, match="weight must be float16 or float32"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.int64))
    with pytest.raises(TypeError, match="bias must be float16 or float32"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), bias=np.ones(2, np.int32))
    with pytest.raises(TypeError, match="outlier_columns must hold integers"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), outlier_columns=[0.5])
    with pytest.raises(TypeError, match="a must be int8"):
        llmint8.int8_matmul(np.ones((2, 3), np.int16), np.ones((2, 3), np.int8))
    with pytest.raises(TypeError, match="q must be int8"):
        llmint8.dequantize(np.ones(3, np.int32), 1.0)
    with pytest.raises(TypeError, match="device must be a str"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), device=0)


# ---- shapes and values: ValueError with expected vs actual
def test_shape_errors(layer):
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\).*\(2, 15\)"):
        layer(np.ones((2, 15), np.float32))
    with pytest.raises(ValueError, match=r"x must be \(m, 16\).*got \(2, 15\)"):
        layer.forward(np.ones((2, 15), np.float32))
    with pytest.raises(ValueError, match="scalar"):
        layer(np.float32(1.0))
    with pytest.raises(ValueError, match=r"x must be 1-D to 2-D, got shape \(2,2,2\)"):
        llmint8.quantize_rowwise(np.ones((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"weight must be 2-D, got shape \(3,\)"):
        llmint8.Int8Linear.from_float(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="at least one row and column"):
        llmint8.Int8Linear.from_float(np.ones((0, 3), np.float32))
    with pytest.raises(ValueError, match=r"bias must be \(2,\) to match the weight, got \(3,\)"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), bias=np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"outlier_columns holds column 3; expected indices in \[0, 3\)"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), outlier_columns=[3])
    with pytest.raises(ValueError, match="outlier_columns holds column -1"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), outlier_columns=[-1])
    with pytest.raises(ValueError, match=r"b must be \(n, 3\)"):
        llmint8.int8_matmul(np.ones((2, 3), np.int8), np.ones((2, 4), np.int8))
    with pytest.raises(ValueError, match="do not match"):
        llmint8.dequantize(np.ones((2, 3), np.int8), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="too large for exact int32"):
        llmint8.int8_matmul(np.ones((1, 200000), np.int8), np.ones((1, 200000), np.int8))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_array(layer, bad):
    x = np.ones((3, 16), np.float32)
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or Inf at (row 2, column 5|\[2, 5\])"):
        layer(x)
    with pytest.raises(ValueError, match=r"x contains NaN or Inf at row 2, column 5"):
        layer(x.astype(np.float16))
    for fn in (llmint8.quantize_absmax, llmint8.quantize_rowwise, llmint8.quantize_zeropoint,
               llmint8.find_outlier_columns):
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            fn(x)
    w = np.ones((4, 16), np.float32)
    w[1, 1] = bad
    with pytest.raises(ValueError, match=r"weight contains NaN or Inf at \[1, 1\]"):
        llmint8.Int8Linear.from_float(w)
    with pytest.raises(ValueError, match="bias contains NaN or Inf"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), bias=np.array([0, bad], np.float32))


@pytest.mark.parametrize("thr", [-1.0, np.nan, np.inf])
def test_bad_threshold(thr):
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), threshold=thr)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        llmint8.find_outlier_columns(np.ones((2, 3), np.float32), thr)


@pytest.mark.parametrize("dev", ["gpu", "cuda:", "cuda:x", "cuda:-1", ""])
def test_bad_device_names(dev):
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), device=dev)


def test_cuda_request_without_cuda_is_clear():
    if llmint8.cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="cuda"):
        llmint8.Int8Linear.from_float(np.ones((2, 3), np.float32), device="cuda")


def test_c_constructor_validates_components():
    wq, ws, wo = _C.quantize_weight(np.ones((2, 3), np.float32), [1])
    with pytest.raises(ValueError, match="outlier_weight is required"):
        _C.Int8Linear(wq, ws, [1])
    with pytest.raises(ValueError, match=r"outlier_weight must be \(2, 1\)"):
        _C.Int8Linear(wq, ws, [1], np.ones((2, 2), np.float16))
    with pytest.raises(ValueError, match=r"weight_scale must be \(2,\)"):
        _C.Int8Linear(wq, ws[:1], [1], wo)
    with pytest.raises(ValueError, match="weight_scale\\[0\\] is negative"):
        _C.Int8Linear(wq, -ws, [1], wo)


# ---- odd memory layouts all work and give the contiguous result
def layouts(x):
    yield "contiguous", x
    f = np.asfortranarray(x)
    yield "fortran", f
    big = np.zeros((x.shape[0] * 2, x.shape[1] * 3), x.dtype)
    big[::2, ::3] = x
    yield "strided", big[::2, ::3]
    buf = np.zeros(x.nbytes + 1, np.uint8)
    un = np.frombuffer(buf[1:].data, dtype=x.dtype).reshape(x.shape)
    un[...] = x
    assert not un.flags.aligned or x.itemsize == 1
    yield "unaligned", un
    yield "byteswapped", x.astype(x.dtype.newbyteorder(">"))
    ro = x.copy()
    ro.flags.writeable = False
    yield "readonly", ro


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_odd_layouts(layer, dtype):
    x = np.random.default_rng(1).standard_normal((5, 16)).clip(-3, 3).astype(dtype)
    x[:, 4] = 9.0
    expect = layer(x)
    for name, v in layouts(x):
        before = v.copy()
        np.testing.assert_array_equal(layer(v), expect, err_msg=name)
        np.testing.assert_array_equal(llmint8.quantize_rowwise(v)[0], llmint8.quantize_rowwise(x)[0], err_msg=name)
        np.testing.assert_array_equal(llmint8.find_outlier_columns(v), [4], err_msg=name)
        np.testing.assert_array_equal(v, before, err_msg=name)  # never modified


def test_inputs_unchanged_by_every_call():
    x, w, cols = llmint8.paper_like(4, 64, 8, dtype=np.float32)
    xs, ws = x.copy(), w.copy()
    for meth in llmint8.METHODS:
        llmint8.matmul(x, w, meth)
    llmint8.Int8Linear.from_float(w, outlier_columns=cols)(x)
    llmint8.quantize_absmax(x), llmint8.quantize_zeropoint(x), llmint8.quantize_rowwise(x)
    np.testing.assert_array_equal(x, xs)
    np.testing.assert_array_equal(w, ws)


def test_num_threads_setting():
    old = llmint8.get_num_threads()
    try:
        llmint8.set_num_threads(1)
        assert llmint8.get_num_threads() == 1
        with pytest.raises(ValueError, match="number of threads"):
            llmint8.set_num_threads(-2)
    finally:
        llmint8.set_num_threads(0)
    assert llmint8.get_num_threads() == old
