"""Which compute backends this build of llmint8 has, and device-name resolution."""
from __future__ import annotations

from . import _C

__all__ = ["backends", "cuda_available", "resolve_device", "build_info", "set_num_threads", "get_num_threads",
           "cpu_kernels", "cpu_kernel", "set_cpu_kernel"]


def cuda_available():
    """True when llmint8 was built with CUDA and a usable GPU and driver are present. Never raises."""
    try:
        probe = getattr(_C, "cuda_available", None)
        return bool(probe()) if probe is not None else False
    except Exception:  # a broken driver must not break the CPU path
        return False


def backends():
    """Available backends, best last: ``["cpu"]`` or ``["cpu", "cuda"]``."""
    return ["cpu", "cuda"] if cuda_available() else ["cpu"]


def resolve_device(device):
    """Normalize a device name: None picks "cuda" when available, else "cpu"."""
    if device is None:
        return "cuda" if cuda_available() else "cpu"
    if not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cpu', 'cuda' or 'cuda:0', got {device!r}")
    return device


def build_info():
    """How the extension was built and what it runs: OpenMP, CUDA (version, architectures),
    compiler, the CPU GEMM kernel in use (``cpu_kernel``) and those available (``cpu_kernels``);
    in a build without CUDA, ``cuda_off`` says why ("LLMINT8_CUDA=0" or "nvcc not found")."""
    return _C.build_info()


def cpu_kernels():
    """CPU int8 GEMM kernels this CPU and build can run, slowest first, e.g. ["portable", "avx2"]."""
    return _C.cpu_kernels()


def cpu_kernel():
    """The CPU kernel new layers and int8_matmul use now (None if LLMINT8_CPU_KERNEL names a bad one)."""
    return _C.build_info()["cpu_kernel"]


def set_cpu_kernel(name):
    """Choose the CPU kernel for int8_matmul and CPU layers created afterwards; None = the fastest.

    Overrides the LLMINT8_CPU_KERNEL environment setting. A layer keeps the kernel its
    weights were packed for. ValueError for an unknown name, RuntimeError if this CPU lacks it."""
    _C.set_cpu_kernel(name)


def set_num_threads(n):
    """Threads for CPU work (0 = OpenMP's default, which follows OMP_NUM_THREADS)."""
    _C.set_num_threads(int(n))


def get_num_threads():
    """Threads used for CPU work."""
    return _C.get_num_threads()
