"""The CUDA backend: agreement with the CPU backend, device arrays, protocols, errors.

Tests marked `gpu` need a usable GPU and skip with the reason otherwise; the rest run
everywhere and check how a build behaves without a GPU or driver.

Exactness: the CUDA backend replays the CPU backend's arithmetic operation for operation
(same int8 values and scales, exact int32 products, the fp32 epilogue without fused
multiply-adds, outlier terms summed in the same column order), so the forward is compared
with the CPU backend's for exact equality (np.testing.assert_array_equal), and the int8
GEMM with the int64 product. Only the fp16 cuBLASLt baseline has a tolerance.
"""
import ctypes
import os
import shutil

import numpy as np
import pytest

import llmint8
from llmint8 import _C
from llmint8 import cuda as lcuda

BUILT_WITH_CUDA = bool(llmint8.build_info().get("cuda"))  # built, and the module loads
_cuda = lcuda._module()  # llmint8._cuda, or None
HAVE_GPU = llmint8.cuda_available()
REASON = lcuda.unavailable_reason() or ""

gpu = pytest.mark.skipif(not HAVE_GPU, reason=f"needs a usable CUDA GPU ({REASON})")
no_gpu = pytest.mark.skipif(HAVE_GPU, reason="checks the behaviour without a usable GPU")
built = pytest.mark.skipif(not BUILT_WITH_CUDA, reason="this build has no CUDA backend")

# the largest k the int8 GEMM takes: 127 * 127 * k (and 128 * 128 * k) must fit in int32
MAX_K = (2**31 - 1) // (128 * 128)
# the fp16 cuBLASLt baseline vs a float64 reference, relative to max |y|
FP16_LINEAR_REL = 2e-3


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if a.size else 0.0


def assert_same(y_dev, y_cpu):
    """The CUDA forward (NumPy or device array) is bit-identical to the CPU backend's."""
    if isinstance(y_dev, lcuda.DeviceArray):
        y_dev = y_dev.numpy()
    assert y_dev.dtype == y_cpu.dtype and y_dev.shape == y_cpu.shape
    np.testing.assert_array_equal(y_dev, y_cpu)


def make_layers(n, k, threshold, known=(), bias=True, seed=0, dtype=np.float32, device="cuda"):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.1).astype(dtype)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32) if bias else None
    cpu = llmint8.Int8Linear.from_float(w, bias=b, threshold=threshold, outlier_columns=list(known), device="cpu")
    dev = llmint8.Int8Linear.from_float(w, bias=b, threshold=threshold, outlier_columns=list(known), device=device)
    return cpu, dev


def need_path(path):
    """Skip unless _int8_matmul_cuda offers `path` (the tiled fallback is path 3 in C)."""
    if path == "tiled" and "tiled" not in (_cuda._int8_matmul_cuda.__doc__ or ""):
        pytest.skip("_int8_matmul_cuda does not offer path='tiled' (path 3 of l8_cuda_int8_matmul) in this build")


def int8_matmul(a, b, path):
    """_int8_matmul_cuda on host int8 arrays (a (m, k), b (n, k)); the int32 product on the host."""
    need_path(path)
    return _cuda._int8_matmul_cuda(lcuda.to_device(a), lcuda.to_device(b), path=path).numpy()


def cudart():
    """The CUDA runtime library this process has loaded (ctypes), or None."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and os.path.basename(parts[-1]).startswith("libcudart.so"):
                return ctypes.CDLL(parts[-1])
    return None


def activations(m, k, n_outlier_cols=0, magnitude=20.0, seed=1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    if n_outlier_cols:
        cols = rng.choice(k, size=n_outlier_cols, replace=False)
        x[:, cols] *= magnitude
    return x.astype(dtype)


class CAIOnly:
    """Exposes another array only through __cuda_array_interface__."""

    def __init__(self, a, **overrides):
        self._a = a
        self.__cuda_array_interface__ = dict(a.__cuda_array_interface__, **overrides)


class DLPackOnly:
    """Exposes another array only through __dlpack__ / __dlpack_device__."""

    def __init__(self, a):
        self._a = a
        self.calls = []

    def __dlpack__(self, stream=None, **kw):
        self.calls.append(stream)
        return self._a.__dlpack__(stream=stream, **kw)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


# ====================================================================== without a GPU

def test_cuda_available_is_a_bool_and_never_raises():
    assert isinstance(llmint8.cuda_available(), bool)
    if _cuda is not None:
        assert isinstance(_cuda.cuda_available(), bool)
    assert isinstance(lcuda.available(), bool)


def test_build_info_reports_cuda_when_nvcc_is_present():
    if llmint8.build_info().get("cuda_off") == "LLMINT8_CUDA=0":  # recorded at build time
        pytest.skip("LLMINT8_CUDA=0: a CPU-only build was asked for")
    nvcc = shutil.which("nvcc") or any(
        os.path.isfile(os.path.join(os.environ.get(v, ""), "bin", "nvcc")) for v in ("CUDA_HOME", "CUDA_PATH"))
    if not nvcc:
        pytest.skip("no nvcc here: the build is expected to be CPU-only")
    info = llmint8.build_info()
    assert info["cuda"] is True, "nvcc is present but the extension was built without CUDA"
    if not os.environ.get("LLMINT8_CUDA_ARCHS"):  # the default list
        assert info["cuda_archs"].split() == ["sm_80", "sm_86", "sm_89", "sm_90", "compute_90"]
    assert isinstance(info["cuda_version"], tuple)
    assert info["sm90_gemm"] in (True, False)
    if info["sm90_gemm"]:  # built only for an sm_90a target
        assert "sm_90a" in info["cuda_archs"].split()


@no_gpu
def test_without_gpu_cuda_reports_why():
    assert llmint8.backends() == ["cpu"]
    assert lcuda.device_count() == 0
    assert isinstance(lcuda.unavailable_reason(), str) and lcuda.unavailable_reason()


@no_gpu
def test_without_gpu_a_cuda_layer_raises_runtime_error():
    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        llmint8.Int8Linear.from_float(w, device="cuda")
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        llmint8.Int8Linear.from_float(w, device="cuda:1")
    # the CPU path is untouched
    y = llmint8.Int8Linear.from_float(w, device="cpu")(np.ones((2, 16), np.float32))
    assert y.shape == (2, 8)


@no_gpu
def test_without_gpu_to_device_raises_runtime_error():
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        lcuda.to_device(np.zeros(4, np.float32))
    if BUILT_WITH_CUDA:
        with pytest.raises(RuntimeError, match="(?i)cuda"):
            _cuda.to_device(np.zeros(4, np.float32))


@built
def test_device_array_cannot_be_made_directly():
    with pytest.raises(TypeError):
        _cuda.DeviceArray()


@built
def test_is_device_array_needs_no_gpu():
    assert not lcuda.is_device_array(np.zeros(3, np.float32))
    assert not lcuda.is_device_array([1.0, 2.0])

    class FakeCAI:
        __cuda_array_interface__ = {"shape": (2, 16), "typestr": "<f4", "data": (0, False), "version": 3}

    assert lcuda.is_device_array(FakeCAI())


@built
def test_cpu_layer_rejects_device_arrays_clearly():
    class FakeCAI:
        __cuda_array_interface__ = {"shape": (2, 16), "typestr": "<f4", "data": (0, False), "version": 3}

    w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    layer = llmint8.Int8Linear.from_float(w, device="cpu")
    with pytest.raises(TypeError, match="on the cpu"):
        layer.forward(FakeCAI())


@built
def test_cuda_array_interface_parsing_errors_need_no_gpu():
    class Fake:
        def __init__(self, **cai):
            self.__cuda_array_interface__ = dict({"shape": (2, 8), "typestr": "<f2", "data": (0, False),
                                                  "version": 3}, **cai)

    w = Fake(shape=(4, 8))
    with pytest.raises(ValueError, match="negative dimension"):
        _cuda._fp16_linear(Fake(shape=(-1, 8)), w)
    with pytest.raises(TypeError, match="typestr"):
        _cuda._fp16_linear(Fake(typestr="<f8"), w)
    with pytest.raises(ValueError, match="contiguous"):
        _cuda._fp16_linear(Fake(strides=(32, 4)), w)
    with pytest.raises(TypeError, match="lacks shape"):
        _cuda._fp16_linear(Fake(shape=None), w)
    with pytest.raises(TypeError, match="float16"):
        _cuda._fp16_linear(Fake(typestr="<f4"), w)
    with pytest.raises(TypeError, match="device array"):
        _cuda._fp16_linear(np.zeros((2, 8), np.float16), w)
    # data 0 is an empty array in CAI v3: not valid with elements
    with pytest.raises(ValueError, match="data pointer 0"):
        _cuda._fp16_linear(Fake(), w)
    # misaligned imports are refused before any CUDA call (no sticky misaligned-address error)
    with pytest.raises(ValueError, match="not 2-byte aligned"):
        _cuda._fp16_linear(Fake(data=(1, False)), w)
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        _cuda._int8_matmul_cuda(Fake(typestr="<i4", data=(4098, False)), w)
    # sizes that overflow 64 bits
    with pytest.raises(ValueError, match="too large"):
        _cuda._fp16_linear(Fake(shape=(1 << 62, 1 << 62)), w)
    with pytest.raises(ValueError, match="too large"):
        _cuda._fp16_linear(Fake(shape=(1 << 40, 1 << 40, 1 << 40)), w)


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


_DL_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", _DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", _DL_DELETER),
                ("flags", ctypes.c_uint64), ("dl_tensor", ctypes.c_byte * 48)]


@built
def test_newer_dlpack_major_version_is_a_buffer_error_and_is_released():
    calls = []
    deleter = _DL_DELETER(lambda p: calls.append(p))
    mt = _DLManagedTensorVersioned()
    mt.version.major, mt.version.minor = 2, 0
    mt.deleter = deleter
    name = b"dltensor_versioned"
    capsule_new = ctypes.pythonapi.PyCapsule_New
    capsule_new.restype = ctypes.py_object
    capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

    class Producer:
        def __dlpack__(self, stream=None, **kw):
            return capsule_new(ctypes.addressof(mt), name, None)

        def __dlpack_device__(self):
            return (2, 0)

    with pytest.raises(BufferError, match="DLPack 2.0"):
        _cuda._fp16_linear(Producer(), Producer())
    assert calls == [ctypes.addressof(mt)]  # the consumer calls the deleter, as the spec requires


@built
def test_set_stream_refuses_the_per_thread_default_stream():
    with pytest.raises(ValueError, match="explicit stream handle"):
        _cuda.set_stream(2)
    with pytest.raises(ValueError, match="explicit stream handle"):
        lcuda.set_stream(2)


@built
@no_gpu
def test_without_gpu_synchronize_raises_runtime_error():
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        lcuda.synchronize()


def test_cpu_only_helpers_raise_clearly_when_not_built():
    if BUILT_WITH_CUDA:
        pytest.skip("this build has the CUDA backend")
    assert llmint8.cuda_available() is False
    with pytest.raises(RuntimeError, match="without the CUDA backend|no CUDA backend"):
        lcuda.to_device(np.zeros(2, np.float32))


# ====================================================================== int8 GEMM

@gpu
@pytest.mark.parametrize("path", ["gemv", "cublaslt", "tiled", "auto"])
@pytest.mark.parametrize("m,n,k", [(1, 7, 5), (3, 64, 64), (8, 300, 100), (8, 16, 4096),
                                   (9, 33, 70), (31, 20, 48), (33, 20, 48), (64, 64, 64), (257, 130, 1000),
                                   (128, 512, 4096), (65, 80, 96)])
def test_int8_gemm_is_exact(path, m, n, k):
    if path == "gemv" and m > 8:
        pytest.skip("the GEMV path takes m <= 8")
    rng = np.random.default_rng(m * 1000 + n + k)
    a = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
    b = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    need_path(path)
    c = _cuda._int8_matmul_cuda(lcuda.to_device(a), lcuda.to_device(b), path=path)
    assert c.shape == (m, n) and c.dtype == np.int32
    np.testing.assert_array_equal(c.numpy(), a.astype(np.int64) @ b.astype(np.int64).T)


@gpu
@pytest.mark.parametrize("path", ["gemv", "cublaslt", "tiled", "auto"])
def test_int8_gemm_at_the_largest_k(path):
    # 127 * 127 * MAX_K is just under 2^31: every path must still be exact in int32
    k = MAX_K
    m = 8 if path == "gemv" else 40
    rng = np.random.default_rng(5)
    a = np.full((m, k), -127, np.int8)
    a[1] = 127
    a[2] = rng.integers(-127, 128, size=k, dtype=np.int8)
    b = np.full((20, k), -127, np.int8)
    b[3] = rng.integers(-127, 128, size=k, dtype=np.int8)
    c = int8_matmul(a, b, path)
    np.testing.assert_array_equal(c, a.astype(np.int64) @ b.astype(np.int64).T)
    assert c[0, 0] == 127 * 127 * k
    too_long = lcuda.to_device(np.zeros((2, k + 1), np.int8))
    with pytest.raises(ValueError, match="too large"):
        _cuda._int8_matmul_cuda(too_long, too_long, path=path)


@gpu
@pytest.mark.parametrize("path", ["gemv", "cublaslt", "tiled", "auto"])
def test_int8_gemm_empty_shapes(path):
    need_path(path)
    a = lcuda.to_device(np.zeros((5, 0), np.int8))
    b = lcuda.to_device(np.zeros((6, 0), np.int8))
    c = _cuda._int8_matmul_cuda(a, b, path=path)  # k == 0: an empty sum
    assert c.shape == (5, 6)
    np.testing.assert_array_equal(c.numpy(), 0)
    c = _cuda._int8_matmul_cuda(lcuda.to_device(np.ones((5, 4), np.int8)), lcuda.to_device(np.ones((0, 4), np.int8)),
                             path=path)
    assert c.shape == (5, 0)


@gpu
def test_fp16_linear_empty_shapes():
    b = np.arange(4, dtype=np.float16)
    y = _cuda._fp16_linear(lcuda.to_device(np.zeros((3, 0), np.float16)), lcuda.to_device(np.zeros((4, 0), np.float16)),
                        lcuda.to_device(b))
    np.testing.assert_array_equal(y.numpy(), np.broadcast_to(b, (3, 4)))  # k == 0: the bias alone
    y = _cuda._fp16_linear(lcuda.to_device(np.zeros((3, 0), np.float16)), lcuda.to_device(np.zeros((4, 0), np.float16)))
    np.testing.assert_array_equal(y.numpy(), 0)
    y = _cuda._fp16_linear(lcuda.to_device(np.ones((3, 8), np.float16)), lcuda.to_device(np.ones((0, 8), np.float16)))
    assert y.shape == (3, 0)


@gpu
def test_int8_gemm_extreme_values_are_exact():
    k = 4096
    a = np.full((12, k), -127, np.int8)
    b = np.full((20, k), -127, np.int8)
    for path in ("cublaslt", "auto"):
        c = _cuda._int8_matmul_cuda(lcuda.to_device(a), lcuda.to_device(b), path=path).numpy()
        assert (c == 127 * 127 * k).all()
    c = _cuda._int8_matmul_cuda(lcuda.to_device(a[:8]), lcuda.to_device(b), path="gemv").numpy()
    assert (c == 127 * 127 * k).all()
    if "tiled" in (_cuda._int8_matmul_cuda.__doc__ or ""):  # else test_int8_gemm_is_exact[tiled] says so
        assert (int8_matmul(a, b, "tiled") == 127 * 127 * k).all()


# ====================================================================== forward vs CPU

@gpu
@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 31, 33, 64, 130])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("known", [(), (3, 17, 40)])
def test_forward_matches_cpu(m, threshold, known):
    n, k = 77, 100
    cpu, dev = make_layers(n, k, threshold, known)
    x = activations(m, k, n_outlier_cols=3)
    y_cpu = cpu(x)
    y_dev = dev(x)
    assert isinstance(y_dev, np.ndarray) and y_dev.dtype == np.float32 and y_dev.shape == (m, n)
    assert_same(y_dev, y_cpu)
    # and with x already on the device (no host-side check or copy)
    assert_same(dev(lcuda.to_device(x)), y_cpu)


@gpu
@pytest.mark.parametrize("xdt", [np.float16, np.float32])
@pytest.mark.parametrize("ydt", [np.float16, np.float32])
@pytest.mark.parametrize("m", [4, 40])
def test_forward_dtypes_match_cpu(xdt, ydt, m):
    n, k = 64, 256  # k % 8 == 0: the vectorized quantizer
    cpu, dev = make_layers(n, k, 6.0, known=(5,), dtype=np.float16)
    x = activations(m, k, n_outlier_cols=2, dtype=xdt)
    y_cpu = cpu.forward(x, out_dtype=ydt)
    y_dev = dev.forward(x, out_dtype=ydt)
    assert y_dev.dtype == ydt
    assert_same(y_dev, y_cpu)


@gpu
def test_row_requantized_when_its_max_is_another_rows_outlier():
    # row 0's largest element (5.0 < threshold) sits in column 7, which row 1 makes an
    # outlier column (10.0 >= threshold): row 0's scale must come from the other columns.
    k, n = 64, 32
    x = np.full((12, k), 0.5, np.float32)
    x[0, 7] = 5.0
    x[1, 7] = 10.0
    x[0, 9] = 2.0
    cpu, dev = make_layers(n, k, 6.0)
    for rows in (2, 12):  # GEMV and cuBLASLt paths
        assert_same(dev(x[:rows]), cpu(x[:rows]))


@gpu
@pytest.mark.parametrize("m", [3, 40])
def test_more_dynamic_outliers_than_the_compact_capacity(m):
    # 300 dynamic outlier columns > the 256 compact slots: the rest are gathered directly
    k, n = 1024, 48
    cpu, dev = make_layers(n, k, 6.0, known=(0, 1))
    x = activations(m, k, n_outlier_cols=300, magnitude=30.0)
    assert_same(dev(x), cpu(x))


@gpu
def test_every_column_an_outlier_and_zero_rows():
    k, n = 32, 16
    cpu, dev = make_layers(n, k, 1.0)
    x = np.full((10, k), 3.0, np.float32)
    x[4] = 0.0
    assert_same(dev(x), cpu(x))
    z = np.zeros((0, k), np.float32)
    assert dev(z).shape == (0, n)


@gpu
def test_long_inputs_run_in_row_chunks():
    # a 2200 x 32768 int32 product is over the 256 MiB scratch cap: two row chunks
    k, n, m = 16, 32768, 2200
    cpu, dev = make_layers(n, k, 6.0, known=(3,))
    x = activations(m, k, n_outlier_cols=2, magnitude=10.0)
    x[1500, 5] = 40.0  # a dynamic outlier found in the second chunk's rows
    assert_same(dev.forward(x, out_dtype=np.float16), cpu.forward(x, out_dtype=np.float16))


@pytest.fixture(scope="module")
def mlp_layers():
    """A 4096 -> 14336 layer (a 7B model's MLP up-projection) on both backends."""
    n, k = 14336, 4096
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float16)
    b = (rng.standard_normal(n, dtype=np.float32) * 0.02).astype(np.float32)
    kw = dict(bias=b, threshold=6.0, outlier_columns=[17, 2048, 4095])
    return llmint8.Int8Linear.from_float(w, device="cpu", **kw), llmint8.Int8Linear.from_float(w, device="cuda", **kw)


@gpu
@pytest.mark.parametrize("m", [1, 8, 300])
def test_realistic_shape_matches_cpu(mlp_layers, m):
    cpu, dev = mlp_layers
    x = activations(m, 4096, n_outlier_cols=5, magnitude=25.0, seed=m, dtype=np.float16)
    assert_same(dev.forward(x, out_dtype=np.float16), cpu.forward(x, out_dtype=np.float16))
    assert_same(dev(lcuda.to_device(x.astype(np.float32))), cpu(x.astype(np.float32)))


@gpu
@pytest.mark.parametrize("m", [3, 40])  # the GEMV path and the cuBLASLt path
def test_in_features_at_the_largest_k(m):
    k = MAX_K
    cpu, dev = make_layers(24, k, 6.0, known=(0, k - 1))
    x = activations(m, k, n_outlier_cols=3)
    assert_same(dev(x), cpu(x))
    with pytest.raises(ValueError, match="too large"):
        make_layers(2, k + 1, 6.0)


@gpu
@pytest.mark.parametrize("m", [3, 40])  # the single-launch small-m path and the multi-launch path
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("xdt", [np.float32, np.float16])
def test_nonfinite_device_input_stays_in_its_rows(m, threshold, xdt):
    # Device inputs are not checked for NaN/Inf (that would need a host synchronization).
    # Defined behaviour: no error and no crash; a row holding NaN gives NaN in all its
    # outputs; a row holding +-Inf gives no finite output; every other row is exactly what
    # the CPU backend gives with the NaN replaced by 0 and the Infs by a large finite value
    # (an Inf at or above the threshold makes its column an outlier column for all rows).
    n, k = 40, 64
    cpu, dev = make_layers(n, k, threshold, known=(5,))
    x = activations(m, k, n_outlier_cols=2, magnitude=20.0, dtype=xdt)
    nan_row, inf_row = 1, 2
    bad = x.copy()
    bad[nan_row, 7] = np.nan
    bad[inf_row, 9] = np.inf
    bad[inf_row, 11] = -np.inf
    y = dev.forward(lcuda.to_device(bad), out_dtype=np.float32).numpy()
    assert np.isnan(y[nan_row]).all()
    assert not np.isfinite(y[inf_row]).any()
    finite = bad.copy()
    finite[nan_row, 7] = 0.0
    finite[inf_row, 9] = 1000.0
    finite[inf_row, 11] = -1000.0
    rows = [i for i in range(m) if i not in (nan_row, inf_row)]
    np.testing.assert_array_equal(y[rows], cpu.forward(finite, out_dtype=np.float32)[rows])
    with pytest.raises(ValueError, match="NaN"):  # host inputs are checked, as on the CPU backend
        dev(bad)


@gpu
def test_two_streams_on_one_layer():
    create, destroy = getattr(_cuda, "_stream_create", None), getattr(_cuda, "_stream_destroy", None)
    if create is None or destroy is None:
        pytest.skip("this build has no _stream_create / _stream_destroy functions")
    cpu, dev = make_layers(256, 512, 6.0, known=(3,))
    xs = [activations(m, 512, n_outlier_cols=2, seed=m) for m in (40, 300, 3)]
    wants = [cpu(x) for x in xs]
    streams = [create(), create()]
    try:
        outs = []
        for rnd in range(3):  # interleaved: both streams have work in flight at once
            for i, x in enumerate(xs):
                lcuda.set_stream(streams[(i + rnd) % 2])
                outs.append((i, dev(lcuda.to_device(x))))
        for i, y in outs:
            assert_same(y, wants[i])
        del outs, y  # freed on their streams while those exist
        for st in streams:
            lcuda.set_stream(st)
            lcuda.synchronize()
    finally:
        lcuda.set_stream(0)
        for st in streams:
            destroy(st)


@gpu
@pytest.mark.skipif(HAVE_GPU and lcuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_restores_the_current_device():
    rt = cudart()
    if rt is None:
        pytest.skip("libcudart is not loaded as a shared library")
    cur = ctypes.c_int(-1)
    cpu, dev = make_layers(48, 96, 6.0, known=(4,), device="cuda:1")
    assert dev.device == "cuda:1"
    x = activations(20, 96, n_outlier_cols=2)
    a = np.random.default_rng(2).integers(-127, 128, size=(20, 96), dtype=np.int8)
    try:
        for current in (0, 1):
            assert rt.cudaSetDevice(current) == 0
            assert_same(dev(x), cpu(x))
            yd = dev(lcuda.to_device(x, device="cuda:1"))
            assert yd.device == "cuda:1"
            assert_same(yd, cpu(x))
            c = _cuda._int8_matmul_cuda(lcuda.to_device(a, device="cuda:1"), lcuda.to_device(a, device="cuda:1"))
            np.testing.assert_array_equal(c.numpy(), a.astype(np.int64) @ a.astype(np.int64).T)
            assert rt.cudaGetDevice(ctypes.byref(cur)) == 0 and cur.value == current
    finally:
        rt.cudaSetDevice(0)


@gpu
def test_weights_round_trip_through_the_device():
    cpu, dev = make_layers(40, 72, 6.0, known=(2, 70))
    for a, b in zip(cpu._export(), dev._export()):
        np.testing.assert_array_equal(a, b)
    assert dev.device == "cuda:0"


# ====================================================================== device arrays

@gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.int8, np.int32])
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 4), (2, 3, 4), (1, 0, 2)])
def test_device_array_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 100 - 50).astype(dtype).reshape(shape)
    d = lcuda.to_device(a)
    assert isinstance(d, lcuda.DeviceArray)
    assert d.shape == shape and d.dtype == np.dtype(dtype) and d.device == "cuda:0"
    assert d.ndim == len(shape) and d.size == a.size and d.nbytes == a.nbytes
    np.testing.assert_array_equal(d.numpy(), a)
    assert lcuda.to_device(d) is d


@gpu
def test_device_array_reshape_is_a_view():
    a = np.arange(24, dtype=np.float32)
    d = lcuda.to_device(a)
    v = d.reshape(2, -1, 4)
    assert v.shape == (2, 3, 4) and v.ptr == d.ptr
    del d
    np.testing.assert_array_equal(v.numpy(), a.reshape(2, 3, 4))
    with pytest.raises(ValueError):
        v.reshape(5, 5)
    with pytest.raises(ValueError, match="too large"):
        v.reshape(1 << 62, 1 << 62, 4)


@gpu
def test_cuda_array_interface_is_well_formed():
    d = lcuda.to_device(np.ones((3, 5), np.float16))
    cai = d.__cuda_array_interface__
    assert cai["version"] == 3
    assert cai["shape"] == (3, 5) and cai["typestr"] == "<f2"
    assert cai["data"] == (d.ptr, False) and cai["strides"] is None
    assert isinstance(cai["stream"], int) and cai["stream"] != 0
    assert lcuda.to_device(np.zeros(0, np.float32)).__cuda_array_interface__["data"][0] == 0
    typestrs = {np.float32: "<f4", np.int8: "|i1", np.int32: "<i4"}
    for dt, ts in typestrs.items():
        assert lcuda.to_device(np.zeros(2, dt)).__cuda_array_interface__["typestr"] == ts


@gpu
def test_dlpack_export_is_well_formed():
    d = lcuda.to_device(np.ones((2, 3), np.float32))
    assert d.__dlpack_device__() == (2, 0)
    cap = d.__dlpack__()
    assert type(cap).__name__ == "PyCapsule" and "dltensor" in repr(cap)
    cap_v = d.__dlpack__(max_version=(1, 0), stream=-1)
    assert "dltensor_versioned" in repr(cap_v)
    with pytest.raises(ValueError):
        d.__dlpack__(stream=0)
    with pytest.raises(BufferError):
        d.__dlpack__(copy=True)
    with pytest.raises(BufferError):
        d.__dlpack__(dl_device=(1, 0))
    del cap, cap_v  # unconsumed capsules free their tensors


@gpu
@pytest.mark.parametrize("m", [2, 33])
def test_device_in_device_out(m):
    cpu, dev = make_layers(48, 64, 6.0, known=(1,))
    x = activations(m, 64, n_outlier_cols=2)
    xd = lcuda.to_device(x)
    yd = dev(xd)
    assert isinstance(yd, lcuda.DeviceArray)
    assert yd.shape == (m, 48) and yd.dtype == np.float32 and yd.device == "cuda:0"
    assert_same(yd.numpy(), cpu(x))
    y16 = dev.forward(xd, out_dtype=np.float16)
    assert y16.dtype == np.float16
    # through each protocol alone
    for wrapped in (CAIOnly(xd), DLPackOnly(xd)):
        out = dev.forward(wrapped)
        assert isinstance(out, lcuda.DeviceArray)
        np.testing.assert_array_equal(out.numpy(), yd.numpy())
    w = DLPackOnly(xd)
    dev.forward(w)
    assert w.calls == [1]  # the legacy default stream, in the protocol's numbering
    # an empty CAI array has data pointer 0 and so no device: still a valid input
    empty = dev.forward(CAIOnly(xd, shape=(0, 64), data=(0, False)))
    assert isinstance(empty, lcuda.DeviceArray) and empty.shape == (0, 48)
    # a view's memory belongs to its base: reading the view keeps the base alive on its stream
    out = dev.forward(xd.reshape(m, 64))
    np.testing.assert_array_equal(out.numpy(), yd.numpy())


@gpu
def test_interop_with_cupy_or_torch():
    try:
        import cupy as cp
    except ImportError:
        cp = None
    try:
        import torch
    except ImportError:
        torch = None
    if cp is None and (torch is None or not torch.cuda.is_available()):
        pytest.skip("neither CuPy nor PyTorch with CUDA is installed")
    cpu, dev = make_layers(32, 64, 6.0)
    x = activations(4, 64)
    want = cpu(x)
    if cp is not None:
        y = dev.forward(cp.asarray(x))
        np.testing.assert_array_equal(cp.asnumpy(cp.from_dlpack(y)), want)
        # on a non-blocking stream of CuPy's: input ordered after it, output consumed on it
        with cp.cuda.Stream(non_blocking=True) as s:
            lcuda.set_stream(s.ptr)
            try:
                xc = cp.asarray(x)
                y = dev.forward(xc)
                assert y.stream == s.ptr
                yc = cp.from_dlpack(y)
                np.testing.assert_array_equal(cp.asnumpy(yc), want)
                # release the import while its stream exists: the deleter orders y's stream after it
                del yc, y, xc
            finally:
                lcuda.set_stream(0)
    if torch is not None and torch.cuda.is_available():
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            lcuda.set_stream(torch.cuda.current_stream().cuda_stream)
            try:
                y = dev.forward(torch.from_numpy(x).cuda())
                np.testing.assert_array_equal(torch.from_dlpack(y).cpu().numpy(), want)
            finally:
                lcuda.set_stream(0)


@gpu
def test_streams_are_settable():
    lcuda.set_stream(0)
    assert lcuda.get_stream() == 1
    lcuda.synchronize()


# ====================================================================== helpers

@gpu
def test_fp16_linear_baseline():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((17, 96)).astype(np.float16)
    w = (rng.standard_normal((40, 96)) * 0.1).astype(np.float16)
    b = rng.standard_normal(40).astype(np.float16)
    want = x.astype(np.float64) @ w.astype(np.float64).T + b
    y = _cuda._fp16_linear(lcuda.to_device(x), lcuda.to_device(w), lcuda.to_device(b))
    assert y.dtype == np.float16 and y.shape == (17, 40)
    assert rel_err(y.numpy(), want) <= FP16_LINEAR_REL
    y0 = _cuda._fp16_linear(lcuda.to_device(x), lcuda.to_device(w))
    assert rel_err(y0.numpy(), want - b) <= FP16_LINEAR_REL


@gpu
def test_fp16_linear_with_element_aligned_operands():
    # operands and bias 2 bytes past a 256-byte boundary: cuBLASLt must get an algorithm
    # for that alignment, not the one cached for the aligned call of the same shape (a bias
    # under 16-byte alignment is added after the matmul instead of by cuBLASLt)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((33, 64)).astype(np.float16)
    w = (rng.standard_normal((48, 64)) * 0.1).astype(np.float16)
    b = rng.standard_normal(48).astype(np.float16)
    want = x.astype(np.float64) @ w.astype(np.float64).T + b

    def shifted(a):  # a copy of a whose data starts 2 bytes into a device allocation
        flat = np.concatenate([np.zeros(1, a.dtype), a.ravel()])
        d = lcuda.to_device(flat)
        return d, CAIOnly(d, shape=a.shape, data=(d.ptr + 2, False))

    y = _cuda._fp16_linear(lcuda.to_device(x), lcuda.to_device(w), lcuda.to_device(b))  # aligned first
    assert rel_err(y.numpy(), want) <= FP16_LINEAR_REL
    keep = [shifted(x), shifted(w), shifted(b)]
    y = _cuda._fp16_linear(lcuda.to_device(x), lcuda.to_device(w), keep[2][1])  # only the bias shifted
    assert rel_err(y.numpy(), want) <= FP16_LINEAR_REL
    y = _cuda._fp16_linear(keep[0][1], keep[1][1], keep[2][1])
    assert rel_err(y.numpy(), want) <= FP16_LINEAR_REL


@gpu
@pytest.mark.parametrize("xdt", [np.float16, np.float32])
@pytest.mark.parametrize("m", [3, 40])
def test_forward_with_element_aligned_device_input(xdt, m):
    # x one element past a 256-byte boundary: the quantizer's scalar loads, the same bits
    k = 256
    cpu, dev = make_layers(32, k, 6.0, known=(2,))
    x = activations(m, k, n_outlier_cols=2, dtype=xdt)
    flat = lcuda.to_device(np.concatenate([np.zeros(1, xdt), x.ravel()]))
    xd = CAIOnly(flat, shape=(m, k), data=(flat.ptr + np.dtype(xdt).itemsize, False))
    assert_same(dev.forward(xd, out_dtype=np.float32), cpu.forward(x, out_dtype=np.float32))


@gpu
def test_cuda_time_returns_one_time_per_call():
    _, dev = make_layers(32, 64, 6.0)
    xd = lcuda.to_device(activations(4, 64))
    times = _cuda._cuda_time(lambda: dev(xd), 5, flush_bytes=1 << 20)
    assert len(times) == 5 and all(t >= 0.0 for t in times)
    with pytest.raises(ZeroDivisionError):
        _cuda._cuda_time(lambda: 1 / 0, 2)


# ====================================================================== errors

@gpu
def test_device_input_errors():
    _, dev = make_layers(16, 32, 6.0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 32\)"):
        dev(lcuda.to_device(np.zeros((2, 31), np.float32)))
    with pytest.raises(ValueError, match="in_features = 32"):
        dev.forward(lcuda.to_device(np.zeros((2, 31), np.float32)))
    with pytest.raises(TypeError, match="float16 or float32"):
        dev.forward(lcuda.to_device(np.zeros((2, 32), np.int8)))
    with pytest.raises(TypeError, match="out_dtype"):
        dev.forward(lcuda.to_device(np.zeros((2, 32), np.float32)), out_dtype=np.int32)
    xd = lcuda.to_device(np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        dev.forward(CAIOnly(xd, shape=(2, 32), strides=(256, 4)))
    with pytest.raises(ValueError, match="NaN"):
        dev(np.full((2, 32), np.nan, np.float32))  # NumPy inputs are checked on the host


@gpu
def test_out_of_memory_is_a_memory_error_and_the_layer_survives():
    _, dev = make_layers(16, 32, 6.0)
    xd = lcuda.to_device(np.zeros((4, 32), np.float32))
    huge = CAIOnly(xd, shape=(1 << 40, 32))  # never read: the scratch allocation fails first
    with pytest.raises(MemoryError):
        dev.forward(huge)
    x = activations(4, 32)
    assert dev(x).shape == (4, 16)
    with pytest.raises(MemoryError):
        _cuda._fp16_linear(CAIOnly(lcuda.to_device(np.zeros((4, 8), np.float16)), shape=(1 << 40, 8)),
                        lcuda.to_device(np.zeros((4, 8), np.float16)))


# ====================================================================== loading

def _maps_after(code):
    """Run `code` in a fresh interpreter, then report which CUDA libraries it has mapped."""
    import subprocess
    import sys
    prog = (code + "\nimport re\nmaps = open('/proc/self/maps').read()\n"
            "print(sorted(set(re.findall(r'lib(cudart|cublasLt|cublas|cuda)\\.so', maps))))")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_import_maps_no_cuda_library():
    # import, CPU layers, the primitives and the CPU-only queries stay clear of CUDA
    code = ("import numpy as np, llmint8\n"
            "w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)\n"
            "layer = llmint8.Int8Linear.from_float(w, device='cpu')\n"
            "layer(np.ones((2, 16), np.float32)); llmint8.matmul(np.ones((2, 16), np.float32), w, 'llm.int8')\n"
            "llmint8.cpu_kernels(); llmint8.is_device_array(np.zeros(3))")
    assert _maps_after(code) == "[]"


@built
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_cuda_module_loads_on_first_cuda_use():
    mapped = _maps_after("import llmint8\nllmint8.cuda_available()")
    assert "cudart" in mapped and "cublasLt" in mapped


def test_a_cuda_module_that_cannot_load_makes_cuda_unavailable(tmp_path):
    # a stand-in llmint8._cuda that fails as a missing libcublasLt would
    import subprocess
    import sys
    pkg = os.path.dirname(llmint8.__file__)
    shadow = tmp_path / "shadow"
    (shadow / "llmint8").mkdir(parents=True)
    for name in os.listdir(pkg):  # the real package, with _cuda replaced by a broken one
        if name.startswith("_cuda") or name == "__pycache__":
            continue
        os.symlink(os.path.join(pkg, name), shadow / "llmint8" / name)
    (shadow / "llmint8" / "_cuda.py").write_text(
        "raise ImportError('libcublasLt.so.13: cannot open shared object file: No such file or directory')\n")
    prog = ("import numpy as np, llmint8\n"
            "print(llmint8.cuda_available(), llmint8.backends())\n"
            "print(llmint8.cuda.unavailable_reason())\n"
            "info = llmint8.build_info(); print(info['cuda'], info.get('cuda_off'))\n"
            "try:\n"
            "    llmint8.Int8Linear.from_float(np.ones((4, 8), np.float32), device='cuda')\n"
            "except RuntimeError as e:\n"
            "    print('RuntimeError', e)\n"
            "print(llmint8.Int8Linear.from_float(np.ones((4, 8), np.float32), device='cpu')(np.ones((1, 8), np.float32)).shape)\n")
    env = dict(os.environ, PYTHONPATH=str(shadow))
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120, env=env,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "False ['cpu']"
    if _C.build_info().get("cuda_built"):
        assert "libcublasLt" in out[1]
        assert out[2].startswith("False ") and "libcublasLt" in out[2]
        assert out[3].startswith("RuntimeError") and "could not be loaded" in out[3] and "libcublasLt" in out[3]
    else:  # a CPU-only build never tries to load it
        assert "without the CUDA backend" in out[1]
        assert out[3].startswith("RuntimeError")
    assert out[4] == "(1, 4)"


# ====================================================================== graphs and streams

def check_graph_replay(m, k=256, n=192):
    """A forward of m rows captured in a CUDA graph on a created stream, then replayed on new
    inputs (other values, other outlier columns: the graph recomputes them, the fused paths'
    block counter and flags included), equals the CPU backend each time. Returns how many
    sm90 GEMM forwards the capture queued."""
    cpu, dev = make_layers(n, k, 6.0, known=(7, 100))
    s = _cuda._stream_create()
    try:
        lcuda.set_stream(s)
        xd = lcuda.to_device(activations(m, k, n_outlier_cols=3, seed=1, dtype=np.float16))
        dev.forward(xd, out_dtype=np.float16)  # warm: algorithms and pool on first use
        lcuda.synchronize()
        out = {}
        before = _cuda._sm90_calls()
        graph = _cuda._graph_capture(lambda: out.__setitem__("y", dev.forward(xd, out_dtype=np.float16)))
        sm90 = _cuda._sm90_calls() - before
        assert graph.nodes > 0
        for seed in (2, 3):
            x2 = activations(m, k, n_outlier_cols=5, seed=seed, dtype=np.float16)
            _cuda._copy_into(xd, x2)
            graph.replay()
            lcuda.synchronize()
            np.testing.assert_array_equal(out["y"].numpy(), cpu.forward(x2, out_dtype=np.float16))
        del graph, out, xd
        lcuda.synchronize()
    finally:
        lcuda.set_stream(0)
        _cuda._stream_destroy(s)
    return sm90


@gpu
@pytest.mark.parametrize("m", [4, 300])
def test_forward_captured_in_a_cuda_graph_replays_on_new_input(m):
    check_graph_replay(m)


@gpu
def test_graph_capture_needs_an_explicit_stream():
    with pytest.raises(ValueError, match="legacy default stream"):
        _cuda._graph_capture(lambda: None)


@gpu
@pytest.mark.parametrize("m", [3, 40])
def test_float32_outliers_beyond_fp16_range_match_cpu(m):
    # float32 x keeps float32 in the outlier product: values past 65504 stay finite
    k, n = 96, 64
    rng = np.random.default_rng(m)
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    w[:, 30] *= 1e6  # a weight column beyond fp16's range, found as an outlier at run time below
    cpu = llmint8.Int8Linear.from_float(w, threshold=6.0, outlier_columns=[4], device="cpu")
    dev = llmint8.Int8Linear.from_float(w, threshold=6.0, outlier_columns=[4], device="cuda")
    x = activations(m, k, n_outlier_cols=2, dtype=np.float32)
    x[:, 10] = 1e5
    x[0, 20] = -3e30
    x[:, 30] = 8.0
    y = dev.forward(lcuda.to_device(x)).numpy()
    assert np.isfinite(y).all()
    assert_same(y, cpu.forward(x))


def check_overflow_raises_like_cpu(m=40, seed=7):
    """m rows of float16 x make column 4 a dynamic outlier of _overflowing_layer: the device
    forward raises the CPU's ValueError, word for word. Returns (cpu, dev, x)."""
    _, cpu = _overflowing_layer("cpu")
    _, dev = _overflowing_layer("cuda")
    x = np.random.default_rng(seed).standard_normal((m, 40)).astype(np.float16)
    x[:, 4] = 20.0
    with pytest.raises(ValueError) as e_cpu:
        cpu.forward(x)
    with pytest.raises(ValueError) as e_dev:
        dev.forward(lcuda.to_device(x))
    assert str(e_dev.value) == str(e_cpu.value)
    return cpu, dev, x


def _overflowing_layer(device):
    """A float32 weight whose row 2 dequantizes beyond fp16's range in column 4 (only)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    w[2] *= 1e4
    w[2, 4] = 1.5e5
    return w, llmint8.Int8Linear.from_float(w, threshold=6.0, device=device)


@gpu
@pytest.mark.parametrize("m", [3, 40])  # the single-launch small-m path and the multi-launch path
def test_float16_x_with_a_weight_beyond_fp16_raises_like_cpu(m):
    # float16 x rounds a dynamic column's dequantized weight to fp16; weight[2, 4] does not
    # fit, and both backends must say so rather than return inf (host and device x alike)
    w, cpu = _overflowing_layer("cpu")
    _, dev = _overflowing_layer("cuda")
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 40)).astype(np.float32)
    x[:, 4] = 20.0
    x[1, 30] = -9.0  # another dynamic column, one that fits: column 4 is still the one named
    x16 = x.astype(np.float16)
    with pytest.raises(ValueError) as e_cpu:
        cpu.forward(x16, out_dtype=np.float32)
    with pytest.raises(ValueError) as e_host:
        dev.forward(x16, out_dtype=np.float32)
    with pytest.raises(ValueError) as e_dev:
        dev.forward(lcuda.to_device(x16), out_dtype=np.float32)
    assert "weight[2, 4]" in str(e_cpu.value)
    assert str(e_host.value) == str(e_cpu.value) == str(e_dev.value)
    # the layer is still usable: float32 x, and float16 x whose outliers avoid column 4
    assert_same(dev.forward(lcuda.to_device(x)), cpu.forward(x))
    x16[:, 4] = 1.0
    assert_same(dev.forward(lcuda.to_device(x16), out_dtype=np.float32), cpu.forward(x16, out_dtype=np.float32))
    assert_same(dev.forward(x16, out_dtype=np.float16), cpu.forward(x16, out_dtype=np.float16))


@gpu
def test_float16_forward_of_an_overflowing_layer_cannot_be_captured():
    _, dev = _overflowing_layer("cuda")
    x16 = lcuda.to_device(np.ones((4, 40), np.float16))
    s = _cuda._stream_create()
    try:
        lcuda.set_stream(s)
        with pytest.raises(ValueError, match="cannot be done while a CUDA graph is being captured"):
            _cuda._graph_capture(lambda: dev.forward(x16, out_dtype=np.float16))
    finally:
        lcuda.set_stream(0)
        _cuda._stream_destroy(s)


# ====================================================================== the fused decoding path

@pytest.fixture
def fused_decode():
    """The one-launch decoding forward forced on (it is opt-in until checked on a GPU)."""
    old = _cuda._set_fused("decode")
    try:
        yield
    finally:
        _cuda._set_fused(old)


@built
def test_set_fused_takes_the_modes_it_names():
    old = _cuda._set_fused("none")  # no CUDA call: the modes live in the module's context
    try:
        assert _cuda._set_fused("decode") == "none"
        assert _cuda._set_fused("prefill") == "decode"
        assert _cuda._set_fused("gemm") == "prefill"
        assert _cuda._set_fused("gemm+decode") == "gemm"  # names in any order, read back in one
        assert _cuda._set_fused("prefill+gemm") == "decode+gemm"
        assert _cuda._set_fused("decode+prefill+gemm") == "prefill+gemm"
        assert _cuda._set_fused("all") == "all"
        assert _cuda._set_fused("none") == "all"
        for bad in ("fast", "decode+", "+gemm", "decode++gemm", "gemm+fast", ""):
            with pytest.raises(ValueError, match="mode must be 'decode', 'prefill', 'gemm' .*got"):
                _cuda._set_fused(bad)
        assert _cuda._set_fused("none") == "none"  # a refused mode changes nothing
    finally:
        _cuda._set_fused(old)


@gpu
@pytest.mark.parametrize("m", list(range(1, 17)))
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.5, 1.0])  # outlier columns found at run time
@pytest.mark.parametrize("xdt", [np.float16, np.float32])
def test_fused_decode_matches_cpu(fused_decode, m, frac, xdt):
    k, n = 100, 77  # k % 8 != 0: scalar loads; n odd
    cpu, dev = make_layers(n, k, 6.0, known=(3, 17, 40), seed=m)
    x = activations(m, k, n_outlier_cols=int(round(frac * k)), seed=m + 1, dtype=xdt)
    for ydt in (np.float16, np.float32):
        y_cpu = cpu.forward(x, out_dtype=ydt)
        assert_same(dev.forward(lcuda.to_device(x), out_dtype=ydt), y_cpu)
        assert_same(dev.forward(x, out_dtype=ydt), y_cpu)


@gpu
@pytest.mark.parametrize("k", [5, 13, 16, 64, 257, 1536])  # 1536 with every column an outlier: past the list
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("threshold,known,bias", [(0.0, (), False), (6.0, (), True), (0.0, (1, 4), True),
                                                   (6.0, (0, 2), False)])
def test_fused_decode_shapes_match_cpu(fused_decode, k, m, threshold, known, bias):
    n = 33
    cpu, dev = make_layers(n, k, threshold, known=known, bias=bias, seed=k)
    x = activations(m, k, n_outlier_cols=k if k == 1536 else min(2, k), seed=k + m, dtype=np.float16)
    assert_same(dev.forward(lcuda.to_device(x), out_dtype=np.float32), cpu.forward(x, out_dtype=np.float32))


@gpu
@pytest.mark.parametrize("xdt", [np.float16, np.float32])
def test_fused_decode_vector_loads_and_element_aligned_input(fused_decode, xdt):
    # k % 8 == 0 and an aligned x: 16-byte loads; x one element off: scalar loads; same bits
    m, k = 5, 256
    cpu, dev = make_layers(40, k, 6.0, known=(2,))
    x = activations(m, k, n_outlier_cols=2, dtype=xdt)
    y_cpu = cpu.forward(x, out_dtype=np.float32)
    assert_same(dev.forward(lcuda.to_device(x), out_dtype=np.float32), y_cpu)
    flat = lcuda.to_device(np.concatenate([np.zeros(1, xdt), x.ravel()]))
    xd = CAIOnly(flat, shape=(m, k), data=(flat.ptr + np.dtype(xdt).itemsize, False))
    assert_same(dev.forward(xd, out_dtype=np.float32), y_cpu)


@gpu
def test_fused_decode_zero_and_subnormal_rows(fused_decode):
    k, n = 64, 20
    cpu, dev = make_layers(n, k, 6.0)
    x = activations(4, k, n_outlier_cols=2)
    x[1] = 0.0  # scale 0
    x[2] *= np.float32(1e-39)  # a subnormal scale: 127 / s overflows, the double division
    assert_same(dev.forward(lcuda.to_device(x)), cpu.forward(x))


@gpu
def test_fused_decode_realistic_shapes(fused_decode):
    # many weight tiles per block (more tiles than the grid holds), k = 4096 / 11008
    for n, k, m in ((4096, 4096, 1), (11008, 4096, 16), (4096, 11008, 8)):
        cpu, dev = make_layers(n, k, 6.0, known=(7,), seed=n + k, dtype=np.float16)
        x = activations(m, k, n_outlier_cols=4, seed=m, dtype=np.float16)
        assert_same(dev.forward(lcuda.to_device(x), out_dtype=np.float16), cpu.forward(x, out_dtype=np.float16))


@gpu
@pytest.mark.parametrize("k", [12288, 13312, 14336])  # ~197 KiB: fused; ~214 KiB: over its own cap; 235 KiB
def test_fused_decode_falls_back_when_int8_x_does_not_fit(fused_decode, k):
    # 16 rows of int8 x past the kernel's shared memory: the two-launch path, same bits
    m, n = 16, 48
    cpu, dev = make_layers(n, k, 6.0, seed=3)
    x = activations(m, k, n_outlier_cols=5, dtype=np.float16)
    assert_same(dev.forward(lcuda.to_device(x), out_dtype=np.float32), cpu.forward(x, out_dtype=np.float32))


@gpu
@pytest.mark.parametrize("m", [3, 12])
def test_fused_decode_overflowing_weight_raises_like_cpu(fused_decode, m):
    cpu, dev, x = check_overflow_raises_like_cpu(m, seed=m)
    x[:, 4] = 1.0
    assert_same(dev.forward(lcuda.to_device(x)), cpu.forward(x))


@gpu
def test_fused_decode_nonfinite_device_input_stays_in_its_rows(fused_decode):
    k, n = 64, 24
    cpu, dev = make_layers(n, k, 6.0)
    x = activations(4, k, n_outlier_cols=2)
    x[1, 10] = np.nan
    y = dev.forward(lcuda.to_device(x)).numpy()
    assert np.isnan(y[1]).all()
    keep = [0, 2, 3]
    assert_same(y[keep], cpu.forward(x[keep]))


@gpu
@pytest.mark.parametrize("m", [1, 16])
def test_fused_decode_captured_in_a_cuda_graph(fused_decode, m):
    check_graph_replay(m)



# ====================================================================== the fused prefill quantizer

@pytest.fixture
def fused_all():
    """Both fused paths forced: the decoding forward (m <= 16) and the prefill quantizer."""
    old = _cuda._set_fused("all")
    try:
        yield
    finally:
        _cuda._set_fused(old)


@gpu
@pytest.mark.parametrize("m", [17, 33, 64, 130, 300])
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.5, 1.0])
@pytest.mark.parametrize("xdt", [np.float16, np.float32])
def test_fused_prefill_matches_cpu(fused_all, m, frac, xdt):
    k, n = 100, 77  # k % 8 != 0: scalar loads; n odd
    cpu, dev = make_layers(n, k, 6.0, known=(3, 17, 40), seed=m)
    x = activations(m, k, n_outlier_cols=int(round(frac * k)), seed=m + 1, dtype=xdt)
    for ydt in (np.float16, np.float32):
        y_cpu = cpu.forward(x, out_dtype=ydt)
        assert_same(dev.forward(lcuda.to_device(x), out_dtype=ydt), y_cpu)
        assert_same(dev.forward(x, out_dtype=ydt), y_cpu)


@gpu
@pytest.mark.parametrize("k", [5, 13, 64, 257, 4096])
@pytest.mark.parametrize("threshold,known,bias", [(0.0, (1, 4), True), (6.0, (), True), (6.0, (0, 2), False)])
def test_fused_prefill_shapes_match_cpu(fused_all, k, threshold, known, bias):
    m, n = 70, 33  # 70 rows: two row chunks of the flag pass
    cpu, dev = make_layers(n, k, threshold, known=known, bias=bias, seed=k)
    x = activations(m, k, n_outlier_cols=min(3, k), seed=k + 1, dtype=np.float16)
    assert_same(dev.forward(lcuda.to_device(x), out_dtype=np.float32), cpu.forward(x, out_dtype=np.float32))


@gpu
def test_fused_prefill_scale_from_another_rows_outlier_column(fused_all):
    # row 1's largest value sits in a column only row 0 makes an outlier: the exact scale
    # must leave it out (the three-pass path re-quantizes such rows; this one never guesses)
    k, n, m = 64, 16, 40
    cpu, dev = make_layers(n, k, 6.0)
    x = activations(m, k)
    x[0, 9] = 50.0
    x[1:, 9] = 5.5
    x[1, 10] = 3.0
    assert_same(dev.forward(lcuda.to_device(x)), cpu.forward(x))


@gpu
def test_fused_prefill_many_dynamic_columns_and_long_inputs(fused_all):
    # more dynamic columns than the compact copies hold (the epilogue then reads x and the
    # int8 weight directly), and an input long enough for several flag-pass row chunks
    k, n = 600, 40
    cpu, dev = make_layers(n, k, 6.0, known=(5,))
    for m in (40, 1000):
        x = activations(m, k, n_outlier_cols=300, seed=m, dtype=np.float16)
        assert_same(dev.forward(lcuda.to_device(x), out_dtype=np.float16), cpu.forward(x, out_dtype=np.float16))


@gpu
def test_fused_prefill_overflowing_weight_raises_like_cpu(fused_all):
    check_overflow_raises_like_cpu()


@gpu
@pytest.mark.parametrize("m", [4, 300])
def test_fused_paths_captured_in_a_cuda_graph(fused_all, m):
    check_graph_replay(m)


# ====================================================================== the sm90 GEMM (Hopper)

def _compute_capability():
    """(major, minor) of device 0, through the CUDA runtime this process loaded."""
    rt = cudart()
    if rt is None:
        return (0, 0)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    if rt.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) or rt.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0):
        return (0, 0)  # 75, 76: cudaDevAttrComputeCapabilityMajor / Minor
    return (major.value, minor.value)


@pytest.fixture
def sm90_gemm():
    """The sm90 GEMM selected (with the fused prefill quantizer before it, as 'all' runs it);
    skips where it cannot run: a build without it, or a GPU other than compute capability 9.0."""
    if not llmint8.build_info().get("sm90_gemm"):
        pytest.skip("this build has no sm90 GEMM (LLMINT8_CUDA_ARCHS with 90a, and CUTLASS's headers)")
    cc = _compute_capability()
    if cc != (9, 0):
        pytest.skip(f"the sm90 GEMM runs on compute capability 9.0 only, this GPU is {cc}")
    old = _cuda._set_fused("prefill+gemm")
    try:
        yield
    finally:
        _cuda._set_fused(old)


def _forward_sm90(dev, x, ydt, expect_sm90=True):
    """dev.forward on device x, checking that the sm90 GEMM ran (or did not)."""
    before = _cuda._sm90_calls()
    y = dev.forward(lcuda.to_device(x), out_dtype=ydt)
    assert _cuda._sm90_calls() == before + (1 if expect_sm90 else 0)
    return y


@gpu
@pytest.mark.parametrize("m", [17, 64, 128, 129, 300, 512, 513, 1000])  # tile configs change at 128 and 512
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.05])
@pytest.mark.parametrize("xdt", [np.float16, np.float32])
def test_sm90_gemm_matches_cpu(sm90_gemm, m, frac, xdt):
    k, n = 100, 200  # kp = 112 (the TMA loads see the zero padding); 200 outputs: a partial N tile
    cpu, dev = make_layers(n, k, 6.0, known=(3, 17, 40), seed=m)
    x = activations(m, k, n_outlier_cols=int(round(frac * k)), seed=m + 1, dtype=xdt)
    for ydt in (np.float16, np.float32):
        assert_same(_forward_sm90(dev, x, ydt), cpu.forward(x, out_dtype=ydt))


@gpu
@pytest.mark.parametrize("k", [16, 64, 257, 4096])
@pytest.mark.parametrize("threshold,known,bias", [(0.0, (), True), (0.0, (1, 4), False), (6.0, (), True),
                                                  (6.0, (0, 2), False)])
def test_sm90_gemm_shapes_match_cpu(sm90_gemm, k, threshold, known, bias):
    m, n = 300, 136  # 300 rows: the large tile config and a partial M tile
    cpu, dev = make_layers(n, k, threshold, known=known, bias=bias, seed=k)
    x = activations(m, k, n_outlier_cols=min(3, k), seed=k + 1, dtype=np.float16)
    x[5] = 0.0  # a zero row (scale 0) and a negative-zero output without a bias
    assert_same(_forward_sm90(dev, x, np.float32), cpu.forward(x, out_dtype=np.float32))
    assert_same(_forward_sm90(dev, x, np.float16), cpu.forward(x, out_dtype=np.float16))


@gpu
def test_sm90_gemm_realistic_shape(sm90_gemm):
    k, n, m = 4096, 4096, 1024
    cpu, dev = make_layers(n, k, 6.0, seed=3)
    x = activations(m, k, n_outlier_cols=4, seed=4, dtype=np.float16)
    assert_same(_forward_sm90(dev, x, np.float16), cpu.forward(x, out_dtype=np.float16))


@gpu
def test_sm90_gemm_many_dynamic_columns(sm90_gemm):
    # more dynamic columns than the compact copies hold: the epilogue reads x and the int8
    # weight (with the host's wscale / 127) for the rest
    k, n = 600, 40
    cpu, dev = make_layers(n, k, 6.0, known=(5,))
    for m, xdt in ((40, np.float16), (700, np.float32)):
        x = activations(m, k, n_outlier_cols=300, seed=m, dtype=xdt)
        assert_same(_forward_sm90(dev, x, np.float32), cpu.forward(x, out_dtype=np.float32))


@gpu
def test_sm90_gemm_takes_only_what_it_can_store(sm90_gemm):
    # fp16 y with 77 columns: rows not 16-byte aligned for the TMA store -> the cuBLASLt path
    cpu, dev = make_layers(77, 64, 6.0)
    x = activations(40, 64, n_outlier_cols=2)
    assert_same(_forward_sm90(dev, x, np.float16, expect_sm90=False), cpu.forward(x, out_dtype=np.float16))
    # ... and more known outlier columns than its epilogue takes (65)
    cpu, dev = make_layers(64, 160, 6.0, known=tuple(range(0, 130, 2)))
    x2 = activations(40, 160, n_outlier_cols=2)
    assert_same(_forward_sm90(dev, x2, np.float32, expect_sm90=False), cpu.forward(x2, out_dtype=np.float32))
    # decoding sizes keep their own kernels
    cpu, dev = make_layers(64, 64, 6.0)
    assert_same(_forward_sm90(dev, x[:8], np.float32, expect_sm90=False), cpu.forward(x[:8], out_dtype=np.float32))


@gpu
def test_sm90_gemm_overflowing_weight_raises_like_cpu(sm90_gemm):
    before = _cuda._sm90_calls()
    check_overflow_raises_like_cpu()
    assert _cuda._sm90_calls() == before + 1  # the GEMM ran, then the host check raised


@gpu
@pytest.mark.parametrize("m", [40, 300])
def test_sm90_gemm_captured_in_a_cuda_graph(sm90_gemm, m):
    assert check_graph_replay(m) == 1


@gpu
def test_sm90_gemm_on_a_created_stream(sm90_gemm):
    # on a created stream the GEMM is queued with Programmatic Dependent Launch after the
    # quantizer: it must still see the quantizer's results
    k, n, m = 512, 256, 200
    cpu, dev = make_layers(n, k, 6.0, known=(9,))
    s = _cuda._stream_create()
    try:
        lcuda.set_stream(s)
        for seed in range(3):
            x = activations(m, k, n_outlier_cols=4, seed=seed, dtype=np.float16)
            y = _forward_sm90(dev, x, np.float16)
            lcuda.synchronize()
            assert_same(y, cpu.forward(x, out_dtype=np.float16))
    finally:
        lcuda.set_stream(0)
        _cuda._stream_destroy(s)
