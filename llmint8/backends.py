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
    """Threads that llmint8's CPU work may use (for this process); 0 restores the default.

    n: an int in [0, 4096]. The default is ``OMP_NUM_THREADS`` when that is set (the usual
    convention), else the number of CPUs this process may run on. At most 256 are used.

    The CPU backend runs its loops on its own pool of worker threads. The calling thread
    works too, idle workers spin for at most about 50 microseconds and then sleep, and
    work too small to pay for a second thread (such as a 1024x1024 layer on a few tokens)
    runs on the calling thread alone, so a machine shared with other busy processes (or
    NumPy's BLAS threads) costs llmint8 the cores it loses and little more. Fewer threads
    than cores leave the rest to other work; more than the cores never help. Results are
    bit-identical for every thread count. TypeError for a non-integer, ValueError out of
    range."""
    import operator

    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"number of threads must be an int, got {type(n).__name__}") from None
    _C.set_num_threads(n)


def get_num_threads():
    """Threads llmint8's CPU work uses now: the value of :func:`set_num_threads`, or the default."""
    return _C.get_num_threads()
