"""Which compute backends this build of llmint8 has, and device-name resolution."""
from __future__ import annotations

from . import _C

__all__ = ["backends", "cuda_available", "resolve_device", "build_info", "set_num_threads", "get_num_threads",
           "cpu_kernels", "cpu_kernel", "set_cpu_kernel"]


def cuda_available():
    """True when llmint8's CUDA backend is built and loads and a usable GPU and driver are
    present. Never raises; the first call imports llmint8._cuda (see llmint8.cuda)."""
    from . import cuda

    return cuda.available()


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
    """How the extensions were built and what they run: CPU threads, the compiler, the CPU GEMM
    kernel in use (``cpu_kernel``) and those available (``cpu_kernels``), and CUDA:

    * ``cuda``: True when the CUDA backend was built and loads; otherwise ``cuda_off`` says why
      ("LLMINT8_CUDA=0", "nvcc not found", or the error that kept llmint8._cuda from loading).
    * where it loads: ``cuda_version`` and ``cuda_archs`` (the toolkit it was compiled with and
      the GPUs it carries code for), ``cuda_runtime_version`` (the libcudart it loaded) and
      ``cuda_driver_version`` (the CUDA version the installed driver supports; (0, 0) without a
      driver), ``sm90_gemm`` (whether the Hopper GEMM with the dequantization in its epilogue
      was built: an sm_90a build with CUTLASS's headers), and ``cuda_usable``: whether a GPU
      can run it here (:func:`cuda_available`).
      When it cannot, ``cuda_unusable_reason`` gives the error of the first CUDA call (such as
      "CUDA driver version is insufficient for CUDA runtime version": a driver older than the
      runtime) or "no CUDA device found".

    Loads llmint8._cuda where it was built."""
    from . import cuda

    info = dict(_C.build_info())
    built = info.pop("cuda_built", False)
    m = cuda._module() if built else None
    info["cuda"] = m is not None
    if m is not None:
        info.update(m.build_info())
        reason = cuda.unavailable_reason()
        info["cuda_usable"] = reason is None
        if reason is not None:
            drv, rt = info.get("cuda_driver_version"), info.get("cuda_runtime_version")
            if drv and rt and tuple(drv) < tuple(rt):  # name the versions: the usual cause
                reason += (f" (driver supports CUDA {drv[0]}.{drv[1]}, runtime is {rt[0]}.{rt[1]}; "
                           f"update the NVIDIA driver)" if drv != (0, 0) else " (no NVIDIA driver found)")
            info["cuda_unusable_reason"] = reason
    elif built:
        info["cuda_off"] = cuda._load_error()
    return info


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
