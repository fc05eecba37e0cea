"""CPU GEMM kernels (portable, avx2, avxvnni, avx512vnni): every kernel this machine can run
against the reference loop and NumPy int64, the layer forward with each kernel against the
portable one, and kernel selection (names, errors, LLMINT8_CPU_KERNEL).

Tolerance: none. int8 GEMM results must be identical. The layer forward with a SIMD kernel
must give the same bits as the portable forward (fp16 and fp32 output): the SIMD quantize,
dequantize and outlier passes keep the reference's operation order and rounding."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmint8 import _C

KERNELS = _C.cpu_kernels()
SIMD_KERNELS = [k for k in KERNELS if k != "portable"]
ALL_NAMES = ["portable", "avx2", "avxvnni", "avx512vnni"]
MAX_K = 2**31 // (128 * 128) - 1  # largest k with exact int32 accumulation (L8_GEMM_MAX_K)


def ref64(a, b):
    return a.astype(np.int64) @ b.astype(np.int64).T


def check_all_kernels(a, b):
    want = ref64(a, b)
    got_ref = _C.int8_matmul(a, b, reference=True)
    assert got_ref.dtype == np.int32
    np.testing.assert_array_equal(got_ref, want)
    for kern in KERNELS:
        got = _C.int8_matmul(a, b, kernel=kern)
        assert got.dtype == np.int32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"kernel {kern}, m, n, k = {a.shape[0]}, {b.shape[0]}, {a.shape[1]}")


# ------------------------------------------------------------------ GEMM exactness

def test_kernel_listing():
    assert KERNELS[0] == "portable" and set(KERNELS) <= set(ALL_NAMES)
    info = _C.build_info()
    assert info["cpu_kernel"] in KERNELS and info["cpu_kernels"] == KERNELS


# k around every multiple the kernels care about (pairs, quads, 16, 32, 64) and the 1024 k slice
EDGE_K = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 1023, 1024, 1025, 2049]


@pytest.mark.parametrize("k", EDGE_K)
def test_edge_k(k):
    rng = np.random.default_rng(k)
    for m, n in [(1, 1), (1, 17), (1, 64), (1, 131), (5, 16), (33, 65)]:
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (n, k), dtype=np.int8)
        check_all_kernels(a, b)


@st.composite
def gemm_inputs(draw):
    m = draw(st.integers(1, 40))
    n = draw(st.integers(1, 70))
    k = draw(st.one_of(st.integers(1, 80), st.integers(80, 1200)))
    mode = draw(st.sampled_from(["random", "symmetric", "extremes", "min"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if mode == "random":  # full int8 range, -128 included
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (n, k), dtype=np.int8)
    elif mode == "symmetric":  # what the absmax quantizers produce
        a = rng.integers(-127, 128, (m, k), dtype=np.int8)
        b = rng.integers(-127, 128, (n, k), dtype=np.int8)
    elif mode == "extremes":  # only -127 / 127 (and 0), the largest symmetric products
        a = rng.choice(np.array([-127, 0, 127], np.int8), (m, k))
        b = rng.choice(np.array([-127, 127], np.int8), (n, k))
    else:  # -128 against everything
        a = rng.choice(np.array([-128, 127, -127], np.int8), (m, k))
        b = rng.choice(np.array([-128, 127], np.int8), (n, k))
    return a, b


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gemm_inputs())
def test_kernels_match_reference(ab):
    check_all_kernels(*ab)


@pytest.mark.parametrize("av,bv", [(127, 127), (-127, 127), (-127, -127), (-128, -128), (-128, 127), (127, -128)])
def test_constant_extremes(av, bv):
    for m, n, k in [(1, 1, 1), (3, 17, 33), (4, 16, 1024), (5, 33, 3001)]:
        check_all_kernels(np.full((m, k), av, np.int8), np.full((n, k), bv, np.int8))


def test_largest_k_int32_bound():
    # 128 * 128 * MAX_K is within a hair of INT32_MAX: the offset (vnni) kernels pass it midway
    k = MAX_K
    a = np.full((2, k), -128, np.int8)
    b = np.full((17, k), -128, np.int8)
    b[1] = 127
    b[2, ::2] = -128
    b[2, 1::2] = 127
    check_all_kernels(a, b)
    with pytest.raises(ValueError, match="too large"):
        _C.int8_matmul(np.zeros((1, k + 1), np.int8), np.zeros((1, k + 1), np.int8))


def test_empty_shapes():
    for kern in KERNELS:
        assert _C.int8_matmul(np.zeros((0, 5), np.int8), np.zeros((3, 5), np.int8), kernel=kern).shape == (0, 3)
        assert _C.int8_matmul(np.zeros((2, 5), np.int8), np.zeros((0, 5), np.int8), kernel=kern).shape == (2, 0)
        np.testing.assert_array_equal(
            _C.int8_matmul(np.zeros((2, 0), np.int8), np.zeros((3, 0), np.int8), kernel=kern), np.zeros((2, 3))
        )


def test_thread_counts_agree():
    rng = np.random.default_rng(1)
    a = rng.integers(-128, 128, (70, 600), dtype=np.int8)
    b = rng.integers(-128, 128, (300, 600), dtype=np.int8)
    want = ref64(a, b)
    old = _C.get_num_threads()
    try:
        for nt in (1, 2, 3):
            _C.set_num_threads(nt)
            for kern in KERNELS:
                np.testing.assert_array_equal(_C.int8_matmul(a, b, kernel=kern), want)
    finally:
        _C.set_num_threads(0 if old == 0 else old)


# ------------------------------------------------------------------ the layer with each kernel

def layer(kernel, *args, **kw):
    _C.set_cpu_kernel(kernel)
    try:
        return _C.Int8Linear(*args, **kw)
    finally:
        _C.set_cpu_kernel(None)


def same_bits(x, y):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


LAYER_SHAPES = [(1, 1, 1), (1, 5, 3), (3, 17, 33), (7, 130, 47), (33, 1027, 65), (70, 64, 16), (2, 2100, 20)]


@pytest.mark.skipif(not SIMD_KERNELS, reason="no SIMD kernel on this CPU")
@pytest.mark.parametrize("kern", SIMD_KERNELS)
@pytest.mark.parametrize("m,k,n", LAYER_SHAPES)
def test_layer_forward_bitwise_equal_to_portable(kern, m, k, n):
    rng = np.random.default_rng(m * 1000 + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    known = sorted({0, k // 2}) if k > 1 else []
    wq, ws, wo = _C.quantize_weight(w, known)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, k - 1] *= 30.0  # a dynamic outlier column
    if k > 3:
        x[0, 3] = 0.0  # mixed: one row with an exact zero
    x[m - 1] *= 1e-3  # a small row
    for thr in (6.0, 0.0):
        for b in (bias, None):
            args = dict(outlier_columns=known, outlier_weight=wo, bias=b, threshold=thr)
            lp, ls = layer("portable", wq, ws, **args), layer(kern, wq, ws, **args)
            assert ls.nbytes >= lp.nbytes
            for xx in (x, x.astype(np.float16)):
                for od in (np.float16, np.float32):
                    same_bits(ls.forward(xx, out_dtype=od), lp.forward(xx, out_dtype=od))


@pytest.mark.skipif(not SIMD_KERNELS, reason="no SIMD kernel on this CPU")
@pytest.mark.parametrize("kern", SIMD_KERNELS)
def test_layer_edge_inputs(kern):
    rng = np.random.default_rng(7)
    n, k = 40, 300
    wq = rng.integers(-128, 128, (n, k), dtype=np.int8)  # -128 cannot come from the quantizer, but is accepted
    ws = rng.uniform(0.5, 2.0, n).astype(np.float32)
    lp, ls = layer("portable", wq, ws, threshold=6.0), layer(kern, wq, ws, threshold=6.0)
    for x in (
        np.zeros((3, k), np.float16),                        # all-zero rows: scale 0
        np.full((2, k), 65504.0, np.float16),                # fp16 max everywhere: every column an outlier
        np.full((2, k), 5.9, np.float32),                    # just under the threshold
        np.full((2, k), 1e-41, np.float32),                  # subnormal scale: the scalar quantizer path
        rng.standard_normal((5, k)).astype(np.float16) * 4,  # some outlier columns
        rng.choice(np.array([-5.99, 5.99], np.float32), (4, k)),
    ):
        for od in (np.float16, np.float32):
            same_bits(ls.forward(x, out_dtype=od), lp.forward(x, out_dtype=od))


def emulate_forward(wq, ws, known, wo, bias, thr, x, out_dtype):
    """The CPU forward's operation order, step by step in float32 NumPy (each ufunc rounds
    once, as the C code does without fused multiply-adds): the quantized product through
    the reference quantizer and an exact int64 GEMM, then the outlier sums
    s = ((0 + x[:, o0] w[o0]) + x[:, o1] w[o1]) + ..., o ascending, then
    y = (acc * (sx / 127^2 * sw) + s) + bias."""
    f32 = np.float32
    x32 = x.astype(f32)
    cols = set(known)
    if thr > 0:
        cols |= set(np.flatnonzero(np.abs(x32).max(axis=0) >= thr).tolist())
    ocols = sorted(cols)
    xq, sx = _C.quantize_rowwise(x, skip_columns=ocols)
    acc = ref64(xq, wq).astype(np.int32).astype(f32)
    s = np.zeros((x.shape[0], wq.shape[0]), f32)
    for col in ocols:
        if col in known:
            w = wo[:, known.index(col)].astype(f32)
        else:
            w = wq[:, col].astype(f32) * (ws / f32(127.0))
            if x.dtype == np.float16:
                w = w.astype(np.float16).astype(f32)
        s = s + x32[:, col:col + 1] * w[None, :]
    sxi = sx * (f32(1.0) / f32(127.0 * 127.0))
    v = acc * (sxi[:, None] * ws[None, :])
    v = v + s
    if bias is not None:
        v = v + bias
    return v.astype(out_dtype)


# share of columns made outliers: all (no int8 product), most (the product over the few
# columns left), half (the full product); with known columns and without (at up to 6 rows
# the SIMD kernels then take the product straight from the int8 weight)
@pytest.mark.parametrize("share", [1.0, 0.9, 0.5])
@pytest.mark.parametrize("m,k,n", [(1, 40, 17), (5, 300, 70), (13, 96, 40), (70, 520, 260), (300, 64, 40)])
@pytest.mark.parametrize("with_known", [True, False])
def test_outlier_product_order_is_the_definition(share, m, k, n, with_known):
    rng = np.random.default_rng(m + k + int(share * 10))
    w = rng.standard_normal((n, k)).astype(np.float32)
    known = [1, k // 3] if with_known else []
    wq, ws, wo = _C.quantize_weight(w, known)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    big = rng.permutation(k)[: int(round(share * k))]
    x[0, big] = np.where(x[0, big] < 0, -1.0, 1.0) * rng.uniform(6.0, 40.0, big.size)
    old = _C.get_num_threads()
    try:
        for b in (bias, None):
            for xx in (x, x.astype(np.float16)):
                want32 = emulate_forward(wq, ws, known, wo, b, 6.0, xx, np.float32)
                for kern in KERNELS:
                    lay = layer(kern, wq, ws, outlier_columns=known, outlier_weight=wo, bias=b, threshold=6.0)
                    for od in (np.float32, np.float16):
                        want = want32.astype(od)
                        for nt in (1, 2, 3):
                            _C.set_num_threads(nt)
                            same_bits(lay.forward(xx, out_dtype=od), want)
    finally:
        _C.set_num_threads(0 if old == 0 else old)


@pytest.mark.parametrize("kern", KERNELS)
@pytest.mark.parametrize("m", [3, 9])  # up to 6 rows the SIMD kernels take another path
def test_fp16_weight_overflow_message_on_every_path(kern, m):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 16)).astype(np.float32)
    w[21] *= 1e4
    w[21, 4] = 1.5e5  # the row's scale, and its dequantized value in column 4 exceeds fp16
    wq, ws, _ = _C.quantize_weight(w, [])
    x = rng.standard_normal((m, 16)).astype(np.float16)
    x[:, 4] = 20.0
    lay = layer(kern, wq, ws, threshold=6.0)
    with pytest.raises(ValueError, match=r"x is float16, but the layer's weight\[21, 4\] = .* beyond float16's range"):
        lay.forward(x)


@pytest.mark.parametrize("kern", KERNELS)
def test_export_is_canonical(kern):
    rng = np.random.default_rng(3)
    wq = rng.integers(-128, 128, (37, 129), dtype=np.int8)
    ws = rng.uniform(0.1, 1, 37).astype(np.float32)
    wo = rng.standard_normal((37, 2)).astype(np.float16)
    bias = rng.standard_normal(37).astype(np.float32)
    L = layer(kern, wq, ws, outlier_columns=[5, 9], outlier_weight=wo, bias=bias)
    q, s, o, b = L._export()
    np.testing.assert_array_equal(q, wq)
    np.testing.assert_array_equal(s, ws)
    np.testing.assert_array_equal(o, wo)
    np.testing.assert_array_equal(b, bias)
    # honest size: the packed int8 weight (rows padded to 16, k to 4 for SIMD kernels) and the rest
    pad_n, pad_k = (37, 129) if kern == "portable" else (48, 132)
    corr = 4 * pad_n if kern in ("avxvnni", "avx512vnni") else 0
    assert L.nbytes == pad_n * pad_k + corr + 37 * 4 + 37 * 2 * 2 + 37 * 4 + 2 * 4


def test_layer_nan_message_same_for_all_kernels():
    wq = np.ones((4, 20), np.int8)
    ws = np.ones(4, np.float32)
    x = np.zeros((3, 20), np.float16)
    x[2, 11] = np.inf
    for kern in KERNELS:
        with pytest.raises(ValueError, match=r"row 2, column 11"):
            layer(kern, wq, ws).forward(x)


# ------------------------------------------------------------------ selection and errors

def test_unknown_kernel_name():
    a = np.zeros((2, 3), np.int8)
    with pytest.raises(ValueError, match="unknown CPU kernel 'sse9'"):
        _C.int8_matmul(a, a, kernel="sse9")
    with pytest.raises(ValueError, match="unknown CPU kernel"):
        _C.set_cpu_kernel("avx-2")
    try:  # names are case-insensitive
        _C.set_cpu_kernel("PORTABLE")
        assert _C.build_info()["cpu_kernel"] == "portable"
    finally:
        _C.set_cpu_kernel(None)
    with pytest.raises(TypeError, match="kernel must be a str"):
        _C.int8_matmul(a, a, kernel=2)


@pytest.mark.skipif(len(KERNELS) == len(ALL_NAMES), reason="this CPU runs every kernel")
def test_unsupported_kernel():
    missing = [k for k in ALL_NAMES if k not in KERNELS][0]
    a = np.zeros((2, 3), np.int8)
    with pytest.raises(RuntimeError, match=f"'{missing}' is not supported"):
        _C.int8_matmul(a, a, kernel=missing)
    with pytest.raises(RuntimeError, match="not supported"):
        _C.set_cpu_kernel(missing)


def test_set_cpu_kernel_selects_default():
    a = np.ones((1, 5), np.int8)
    try:
        for kern in KERNELS:
            _C.set_cpu_kernel(kern)
            assert _C.build_info()["cpu_kernel"] == kern
            assert _C.int8_matmul(a, a)[0, 0] == 5
    finally:
        _C.set_cpu_kernel(None)
    assert _C.build_info()["cpu_kernel"] == KERNELS[-1]


def run_with_env(value, code):
    env = dict(os.environ, LLMINT8_CPU_KERNEL=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(_C.__file__)))
    return r


def test_env_forces_kernel():
    code = "from llmint8 import _C; print(_C.build_info()['cpu_kernel'])"
    for kern in KERNELS:
        r = run_with_env(kern, code)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == kern


def test_env_unknown_name_warns_at_import_and_falls_back():
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import numpy as np\n"
        "    from llmint8 import _C\n"
        "msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]\n"
        "assert any('LLMINT8_CPU_KERNEL=bogus names no CPU kernel' in m for m in msgs), msgs\n"
        "info = _C.build_info()\n"
        "assert info['cpu_kernel'] == info['cpu_kernels'][-1], info\n"
        "a = np.ones((1, 4), np.int8)\n"
        "assert _C.int8_matmul(a, a)[0, 0] == 4\n"
        "assert _C.Int8Linear(a, np.ones(1, np.float32)).forward(np.ones((1, 4), np.float32)).shape == (1, 1)\n"
    )
    r = run_with_env("bogus", code)
    assert r.returncode == 0, r.stderr + r.stdout
    # and -W error turns it into an import failure that names the value
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", "import llmint8"],
                       env=dict(os.environ, LLMINT8_CPU_KERNEL="bogus"), capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(_C.__file__)))
    assert r.returncode != 0 and "LLMINT8_CPU_KERNEL=bogus" in r.stderr


def test_env_names_are_case_insensitive():
    code = "from llmint8 import _C; print(_C.build_info()['cpu_kernel'])"
    for kern in KERNELS:
        r = run_with_env(kern.upper(), code)
        assert r.returncode == 0 and not r.stderr, r.stderr
        assert r.stdout.strip() == kern


@pytest.mark.skipif(len(KERNELS) == len(ALL_NAMES), reason="this CPU runs every kernel")
def test_env_unsupported_kernel_raises_runtime_error():
    missing = [k for k in ALL_NAMES if k not in KERNELS][0]
    code = (
        "import numpy as np\n"
        "from llmint8 import _C\n"
        "a = np.ones((1, 4), np.int8)\n"
        "try:\n"
        "    _C.int8_matmul(a, a)\n"
        "except RuntimeError as e:\n"
        "    assert 'not supported' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    r = run_with_env(missing, code)
    assert r.returncode == 0, r.stderr + r.stdout
