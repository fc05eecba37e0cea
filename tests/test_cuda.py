"""The CUDA backend: agreement with the CPU backend, device arrays, protocols, errors.

Tests marked `gpu` need a usable GPU and skip with the reason otherwise; the rest run
everywhere and check how a build behaves without a GPU or driver.

Tolerances: the CUDA backend replays the CPU backend's arithmetic operation for operation
(same int8 values and scales, exact int32 products, the fp32 epilogue without fused
multiply-adds, outlier terms summed in the same column order), so the two are expected to
agree bit for bit; the bounds below only leave room for a last-place difference.
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

# max |y_cuda - y_cpu| / max |y_cpu|, by output dtype
CUDA_VS_CPU_REL = {np.float32: 1e-6, np.float16: 1e-3}
# the fp16 cuBLASLt baseline vs a float64 reference, relative to max |y|
FP16_LINEAR_REL = 2e-3


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)) if a.size else 0.0


def make_layers(n, k, threshold, known=(), bias=True, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n, k)) * 0.1).astype(dtype)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32) if bias else None
    cpu = llmint8.Int8Linear.from_float(w, bias=b, threshold=threshold, outlier_columns=list(known), device="cpu")
    dev = llmint8.Int8Linear.from_float(w, bias=b, threshold=threshold, outlier_columns=list(known), device="cuda")
    return cpu, dev


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
@pytest.mark.parametrize("path", ["gemv", "cublaslt", "auto"])
@pytest.mark.parametrize("m,n,k", [(1, 7, 5), (3, 64, 64), (8, 300, 100), (8, 16, 4096),
                                   (9, 33, 70), (31, 20, 48), (33, 20, 48), (64, 64, 64), (257, 130, 1000),
                                   (128, 512, 4096)])
def test_int8_gemm_is_exact(path, m, n, k):
    if path == "gemv" and m > 8:
        pytest.skip("the GEMV path takes m <= 8")
    rng = np.random.default_rng(m * 1000 + n + k)
    a = rng.integers(-127, 128, size=(m, k), dtype=np.int8)
    b = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
    c = _cuda._int8_matmul_cuda(lcuda.to_device(a), lcuda.to_device(b), path=path)
    assert c.shape == (m, n) and c.dtype == np.int32
    np.testing.assert_array_equal(c.numpy(), a.astype(np.int64) @ b.astype(np.int64).T)


@gpu
@pytest.mark.parametrize("path", ["gemv", "cublaslt", "auto"])
def test_int8_gemm_empty_shapes(path):
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
    assert rel_err(y_dev, y_cpu) <= CUDA_VS_CPU_REL[np.float32]


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
    assert rel_err(y_dev, y_cpu) <= CUDA_VS_CPU_REL[ydt]


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
        assert rel_err(dev(x[:rows]), cpu(x[:rows])) <= CUDA_VS_CPU_REL[np.float32]


@gpu
@pytest.mark.parametrize("m", [3, 40])
def test_more_dynamic_outliers_than_the_compact_capacity(m):
    # 300 dynamic outlier columns > the 256 compact slots: the rest are gathered directly
    k, n = 1024, 48
    cpu, dev = make_layers(n, k, 6.0, known=(0, 1))
    x = activations(m, k, n_outlier_cols=300, magnitude=30.0)
    assert rel_err(dev(x), cpu(x)) <= CUDA_VS_CPU_REL[np.float32]


@gpu
def test_every_column_an_outlier_and_zero_rows():
    k, n = 32, 16
    cpu, dev = make_layers(n, k, 1.0)
    x = np.full((10, k), 3.0, np.float32)
    x[4] = 0.0
    assert rel_err(dev(x), cpu(x)) <= CUDA_VS_CPU_REL[np.float32]
    z = np.zeros((0, k), np.float32)
    assert dev(z).shape == (0, n)


@gpu
def test_long_inputs_run_in_row_chunks():
    # a 2200 x 32768 int32 product is over the 256 MiB scratch cap: two row chunks
    k, n, m = 16, 32768, 2200
    cpu, dev = make_layers(n, k, 6.0, known=(3,))
    x = activations(m, k, n_outlier_cols=2, magnitude=10.0)
    x[1500, 5] = 40.0  # a dynamic outlier found in the second chunk's rows
    assert rel_err(dev.forward(x, out_dtype=np.float16), cpu.forward(x, out_dtype=np.float16)) <= \
        CUDA_VS_CPU_REL[np.float16]


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
    assert rel_err(yd.numpy(), cpu(x)) <= CUDA_VS_CPU_REL[np.float32]
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
        np.testing.assert_allclose(cp.asnumpy(cp.from_dlpack(y)), want, rtol=1e-6, atol=1e-6)
        # on a non-blocking stream of CuPy's: input ordered after it, output consumed on it
        with cp.cuda.Stream(non_blocking=True) as s:
            lcuda.set_stream(s.ptr)
            try:
                xc = cp.asarray(x)
                y = dev.forward(xc)
                assert y.stream == s.ptr
                yc = cp.from_dlpack(y)
                np.testing.assert_allclose(cp.asnumpy(yc), want, rtol=1e-6, atol=1e-6)
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
                np.testing.assert_allclose(torch.from_dlpack(y).cpu().numpy(), want, rtol=1e-6, atol=1e-6)
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

@gpu
@pytest.mark.parametrize("m", [4, 300])
def test_forward_captured_in_a_cuda_graph_replays_on_new_input(m):
    k, n = 256, 192
    cpu, dev = make_layers(n, k, 6.0, known=(7, 100))
    s = _cuda._stream_create()
    try:
        lcuda.set_stream(s)
        x1 = activations(m, k, n_outlier_cols=3, seed=1, dtype=np.float16)
        xd = lcuda.to_device(x1)
        dev.forward(xd, out_dtype=np.float16)  # warm: algorithms and pool on first use
        lcuda.synchronize()
        out = {}
        graph = _cuda._graph_capture(lambda: out.__setitem__("y", dev.forward(xd, out_dtype=np.float16)))
        assert graph.nodes > 0
        for seed in (2, 3):  # new values, other outlier columns: the graph recomputes them
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


@gpu
def test_graph_capture_needs_an_explicit_stream():
    with pytest.raises(ValueError, match="legacy default stream"):
        _cuda._graph_capture(lambda: None)


@gpu
def test_two_streams_on_one_layer_match_cpu():
    k, n = 512, 320
    cpu, dev = make_layers(n, k, 6.0)
    streams = [_cuda._stream_create() for _ in range(2)]
    xs = [activations(m, k, n_outlier_cols=2, seed=10 + m) for m in (5, 200)]
    try:
        outs = []
        for s, x in zip(streams, xs):  # queued on two streams, neither waits for the other
            lcuda.set_stream(s)
            outs.append((s, dev.forward(lcuda.to_device(x))))
        for (s, y), x in zip(outs, xs):
            lcuda.set_stream(s)
            lcuda.synchronize()
            np.testing.assert_array_equal(y.numpy(), cpu.forward(x))
        del outs, y
    finally:
        lcuda.set_stream(0)
        lcuda.synchronize()
        for s in streams:
            _cuda._stream_destroy(s)


@gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("m", [3, 40])
def test_element_aligned_but_not_16_byte_aligned_input(dtype, m):
    # an import that starts one element into a buffer: aligned for its dtype, not for 16-byte loads
    k, n = 64, 48  # k a multiple of the vector width, so only the address decides
    cpu, dev = make_layers(n, k, 6.0, known=(5,))
    x = activations(m, k, n_outlier_cols=2, dtype=dtype)
    flat = np.concatenate([np.zeros(1, dtype), x.ravel()])
    buf = lcuda.to_device(flat)
    ptr = buf.__cuda_array_interface__["data"][0] + np.dtype(dtype).itemsize
    assert ptr % 16 != 0
    view = CAIOnly(buf, shape=(m, k), data=(ptr, False))
    np.testing.assert_array_equal(dev.forward(view).numpy(), cpu.forward(x))
