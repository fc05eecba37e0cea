"""Property tests over the C entry points (hypothesis): any dtype, shape, memory layout,
NaN / Inf / huge value or column list gives either a documented exception (TypeError
for a dtype or a non-array, ValueError for a shape or value) or a result equal to the
float64 reference within the stated tolerance. Never a crash, never inf/NaN for finite
inputs whose true result is finite.

Kept to a few hundred small examples in total so that it runs in seconds in CI.
"""
import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import llmint8  # noqa: E402
from llmint8 import _C  # noqa: E402
from conftest import ref_llm_int8, ref_quantize_rows  # noqa: E402

# Quantized values may differ from the float64 reference by one step where fp32 and
# float64 round 127 * x / scale to different sides of a tie.
MAX_Q_DIFF = 1
# Layer outputs: each such step moves y[i, j] by at most sx[i] * sw[j] / 127 in the int8
# part (x side or weight side) and |x[i, o]| * sw[j] / 127 in a dynamic outlier column
# (weight side); allow this many, plus fp32 accumulation error relative to |x| @ |w|.T.
TIE_STEPS = 4
FP32_ACCUM_REL = 1e-5
FP16_REL = 2.0 ** -10  # one fp16 rounding of the output, with margin
FP16_ABS = 2.0 ** -24  # fp16's smallest subnormal: what rounding near 0 may lose
FP16_MAX = 65504.0
DOCUMENTED = (TypeError, ValueError)

# LLMINT8_FUZZ_SCALE=10 runs ten times as many examples (a longer local search).
SCALE = max(1, int(os.environ.get("LLMINT8_FUZZ_SCALE", "1")))
FUZZ = settings(max_examples=60 * SCALE, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

FLOAT_DTYPES = [np.float16, np.float32]
OTHER_DTYPES = [np.float64, np.int8, np.int32, np.bool_, np.complex64]


@st.composite
def float_arrays(draw, min_rows=0, max_rows=6, max_cols=24, special=True, ndim=2):
    """A float array of shape (rows, cols) (or (cols,)), with a random memory layout
    (C, Fortran, strided, big-endian) and optionally NaN, Inf and values near the dtype's limit."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    rows = draw(st.integers(min_rows, max_rows))
    cols = draw(st.integers(1, max_cols))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 5.0, 50.0]))
    x = rng.standard_normal((rows, cols)) * scale
    if special and rows and draw(st.booleans()):
        big = 6.0e4 if dtype == np.float16 else draw(st.sampled_from([7e4, 1e9, 1e30]))
        x[rng.integers(rows), rng.integers(cols)] = big * draw(st.sampled_from([1, -1]))
    if special and rows and draw(st.integers(0, 9)) == 0:
        x[rng.integers(rows), rng.integers(cols)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    x = x.astype(dtype)
    layout = draw(st.sampled_from(["C", "F", "strided", "swapped"]))
    if layout == "F":
        x = np.asfortranarray(x)
    elif layout == "strided":
        wide = np.zeros((rows, 2 * cols), dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    elif layout == "swapped":
        x = x.astype(x.dtype.newbyteorder(">"))
    if ndim == 1:
        x = x[0] if rows else x.reshape(-1)[:0]
    return x


def finite(a):
    return bool(np.all(np.isfinite(np.asarray(a, dtype=np.float64))))


def column_lists(k):
    """Column lists as users write them: unsorted, duplicated, out of range, scalars, odd dtypes."""
    good = st.lists(st.integers(0, max(k - 1, 0)), max_size=8)
    bad = st.one_of(st.lists(st.integers(-2**70, 2**70), min_size=1, max_size=3),
                    st.integers(0, 5), st.just([0.5]), st.just([[0, 1]]))
    return st.one_of(st.none(), good, good.map(lambda c: np.array(c, np.uint16)), bad)


# ------------------------------------------------------------------ primitives
@FUZZ
@given(x=float_arrays(ndim=2) | float_arrays(ndim=1))
def test_quantize_absmax(x):
    if not finite(x):
        with pytest.raises(ValueError, match="x contains NaN or Inf"):
            llmint8.quantize_absmax(x)
        return
    q, s = llmint8.quantize_absmax(x)
    x64 = x.astype(np.float64)
    assert s == np.float32(np.abs(x64).max() if x.size else 0.0)
    q_ref = np.rint(127 * x64 / s) if s > 0 else np.zeros_like(x64)
    assert q.shape == x.shape and (x.size == 0 or np.abs(q - q_ref).max() <= MAX_Q_DIFF)


@FUZZ
@given(data=st.data())
def test_quantize_rowwise_with_skip_columns(data):
    x = data.draw(float_arrays())
    k = x.shape[-1]
    skip = data.draw(column_lists(k))
    try:
        q, s = llmint8.quantize_rowwise(x, skip)
    except DOCUMENTED as e:
        expected_reason = (not finite(x) or isinstance(skip, int) or
                           (skip is not None and np.asarray(skip).ndim != 1) or
                           (skip is not None and len(skip) and not all(isinstance(c, (int, np.integer))
                                                                      and 0 <= c < k for c in np.asarray(skip, dtype=object).ravel())))
        assert expected_reason, f"unexpected {type(e).__name__}: {e}"
        return
    q_ref, s_ref = ref_quantize_rows(x, None if skip is None else np.asarray(skip, dtype=np.int64))
    np.testing.assert_array_equal(s, s_ref.astype(np.float32))
    assert q.shape == x.shape and (x.size == 0 or np.abs(q - q_ref).max() <= MAX_Q_DIFF)


@FUZZ
@given(x=float_arrays(), threshold=st.sampled_from([0.0, 0.5, 6.0, 1e4, -1.0, float("nan")]))
def test_find_outlier_columns(x, threshold):
    if not finite(x) or not threshold >= 0:
        with pytest.raises(ValueError):
            llmint8.find_outlier_columns(x, threshold)
        return
    cols = llmint8.find_outlier_columns(x, threshold)
    if threshold == 0 or x.shape[0] == 0:
        ref = np.array([], np.int64)
    else:
        ref = np.nonzero(np.abs(x.astype(np.float64)).max(axis=0) >= np.float32(threshold))[0]
    np.testing.assert_array_equal(cols, ref)


@FUZZ
@given(x=float_arrays(min_rows=1))
def test_quantize_zeropoint(x):
    if not finite(x):
        with pytest.raises(ValueError):
            llmint8.quantize_zeropoint(x)
        return
    q, scale, zp = llmint8.quantize_zeropoint(x)
    x64 = x.astype(np.float64)
    assert -128 <= zp <= 127 and scale >= 0 and np.isfinite(scale)
    err = np.abs((q.astype(np.float64) - zp) * scale - x64)
    assert err.max() <= scale * (0.5 + MAX_Q_DIFF) + 1e-6 * np.abs(x64).max()


@FUZZ
@given(m=st.integers(0, 5), n=st.integers(0, 40), k=st.integers(0, 70), seed=st.integers(0, 2**32 - 1),
       kernel=st.sampled_from(llmint8.cpu_kernels()))
def test_int8_matmul_is_exact(m, n, k, seed, kernel):
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (m, k), dtype=np.int8)
    b = rng.integers(-128, 128, (n, k), dtype=np.int8)
    c = llmint8.int8_matmul(a, b[:, ::-1].copy()[:, ::-1], kernel=kernel)  # a non-trivial copy path
    np.testing.assert_array_equal(c, a.astype(np.int64) @ b.astype(np.int64).T)


@FUZZ
@given(dtype=st.sampled_from(OTHER_DTYPES), shape=st.sampled_from([(2, 3), (3,), ()]))
def test_other_dtypes_are_type_errors(dtype, shape):
    x = np.ones(shape, dtype)
    for fn in (llmint8.quantize_absmax, llmint8.quantize_rowwise, llmint8.quantize_zeropoint,
               llmint8.find_outlier_columns):
        with pytest.raises(TypeError):
            fn(x)


# ------------------------------------------------------------------ Int8Linear
def layer_tolerance(x, w, known, threshold):
    """Per-element bound on |layer(x) - ref_llm_int8(...)|: TIE_STEPS quantization steps
    plus fp32 accumulation error (see the constants above)."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    known = np.unique(np.asarray(known, dtype=np.int64))
    _, sw = ref_quantize_rows(w64, known)
    dyn = np.nonzero(np.abs(x64).max(axis=0) >= threshold)[0] if threshold > 0 and x.size else np.array([], int)
    _, sx = ref_quantize_rows(x64, np.union1d(known, dyn))
    # a weight-side step in a dynamic outlier column moves y by |x[i, o]| * sw[j] / 127
    xdyn = np.abs(x64[:, np.setdiff1d(dyn, known)]).max(axis=1, initial=0.0)
    return (TIE_STEPS * (sx + xdyn)[:, None] * sw[None, :] / 127.0
            + FP32_ACCUM_REL * (np.abs(x64) @ np.abs(w64).T))


@settings(FUZZ, max_examples=120 * SCALE)
@given(data=st.data())
def test_layer_forward(data):
    w = data.draw(float_arrays(min_rows=1, max_rows=20, special=False))
    if data.draw(st.booleans()):  # weights beyond fp16's range, in some row
        w = w.astype(np.float32)
        w[data.draw(st.integers(0, w.shape[0] - 1))] *= 1e5
    k = w.shape[1]
    x = data.draw(float_arrays(max_cols=k))
    if x.shape[1] != k:
        x = np.resize(x, (x.shape[0], k)).astype(x.dtype)
    known = data.draw(column_lists(k))
    threshold = data.draw(st.sampled_from([0.0, 2.0, 6.0]))
    kernel = data.draw(st.sampled_from(llmint8.cpu_kernels()))
    out_dtype = data.draw(st.sampled_from([None, np.float32, np.float16]))
    llmint8.set_cpu_kernel(kernel)
    try:
        layer = llmint8.Int8Linear.from_float(w, threshold=threshold, outlier_columns=known, device="cpu")
    except DOCUMENTED as e:
        cols_ok = known is None or (not isinstance(known, int) and np.asarray(known).ndim == 1 and all(
            isinstance(c, (int, np.integer)) and 0 <= c < k for c in np.asarray(known, dtype=object)))
        beyond = cols_ok and known is not None and len(known) and np.abs(
            w.astype(np.float64)[:, np.asarray(known, dtype=np.int64)]).max() > FP16_MAX
        assert not cols_ok or beyond, f"unexpected {type(e).__name__}: {e}"
        return
    finally:
        llmint8.set_cpu_kernel(None)
    known = [] if known is None else known
    try:
        y = layer.forward(x, out_dtype=out_dtype)
    except ValueError as e:
        assert not finite(x) or (x.dtype.type is np.float16 and "beyond float16's range" in str(e)), str(e)
        return
    assert finite(x)
    ref = ref_llm_int8(x, w, None, threshold, known)
    tol = layer_tolerance(x, w, known, threshold)
    ydt = np.dtype(out_dtype or x.dtype.type)  # native byte order
    assert y.dtype == ydt and y.shape == (x.shape[0], w.shape[0])
    if ydt == np.float16:
        fits = np.abs(ref) + tol < FP16_MAX
        tol = tol + FP16_REL * np.abs(ref) + FP16_ABS
        y, ref, tol = y[fits], ref[fits], tol[fits]
    assert finite(y), "inf/NaN for finite inputs whose true result is finite"
    assert np.all(np.abs(y.astype(np.float64) - ref) <= tol + 1e-30)


@FUZZ
@given(n=st.integers(1, 6), k=st.integers(1, 12), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_raw_constructor(n, k, seed, data):
    """Int8Linear(weight_int8, weight_scale, outlier_columns, outlier_weight): bad scales and
    column lists raise; a good one equals from_float on the weight it describes."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    cols = data.draw(st.lists(st.integers(0, k - 1), max_size=k, unique=True))
    wq, ws, wo = _C.quantize_weight(w, cols)
    scale_case = data.draw(st.sampled_from(["ok", "negative", "nan", "short"]))
    if scale_case == "negative":
        ws[0] = -1.0
    elif scale_case == "nan":
        ws[-1] = np.nan
    elif scale_case == "short":
        ws = ws[:-1]
    order = np.argsort(cols, kind="stable")
    wo_given = np.empty_like(wo)
    wo_given[:, order] = wo
    dup = data.draw(st.booleans()) and len(cols) > 0
    given_cols = cols + cols[:1] if dup else cols
    given_wo = np.concatenate([wo_given, wo_given[:, :1]], axis=1) if dup else wo_given
    try:
        layer = llmint8.Int8Linear(wq, ws, given_cols, given_wo, None, 6.0, "cpu")
    except ValueError:
        assert scale_case != "ok" or dup
        return
    assert scale_case == "ok" and not dup
    x = rng.standard_normal((3, k)).astype(np.float32)
    ref = llmint8.Int8Linear.from_float(w, threshold=6.0, outlier_columns=cols, device="cpu")
    np.testing.assert_array_equal(layer(x), ref(x))
