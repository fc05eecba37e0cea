"""GPU helpers: device arrays, the current stream, and whether CUDA can be used.

Arrays on the GPU are ``DeviceArray`` objects (float16, float32, int8 or int32,
C-contiguous). They come from ``to_device`` or from a CUDA layer, share memory with
CuPy, JAX and PyTorch through ``__dlpack__`` and ``__cuda_array_interface__`` (v3), and
``.numpy()`` copies them back. A layer on the GPU takes a DeviceArray (or a CuPy / JAX /
PyTorch CUDA array) and returns a DeviceArray without a host round trip; given a NumPy
array it copies in and out and returns NumPy.

The CUDA backend is its own extension module, ``llmint8._cuda``, imported on first CUDA
use (any function here, or the first layer with device="cuda"): ``import llmint8`` maps no
CUDA library. Where that module was not built or cannot load (a missing libcudart or
libcublasLt, say), ``available()`` is False and ``unavailable_reason()`` says why.

All GPU work is queued on one stream, the current stream (``set_stream``); it starts as
the legacy default stream. Example with PyTorch::

    import torch, llmint8
    from llmint8 import cuda
    cuda.set_stream(torch.cuda.current_stream().cuda_stream)
    layer = llmint8.Int8Linear.from_float(w, device="cuda")
    y = torch.from_dlpack(layer(torch.randn(8, 4096, device="cuda", dtype=torch.float16)))

Every function raises RuntimeError when this build has no CUDA backend or no GPU and
driver can be used (``available()`` says which, without raising).

Notes:
  - Work is queued asynchronously: an input must stay alive until the work on the
    stream is done, and a stream must outlive the arrays made while it was current
    (their memory goes back to the pool on that stream).
  - Device inputs are not checked for NaN/Inf (that would need a host synchronization);
    NumPy inputs to a GPU layer are, as on the CPU.
  - Temporaries come from the device's default memory pool (cudaMallocAsync). When its
    release threshold is 0 (nobody set one) it is raised to 1 GiB: up to that much freed
    memory stays reserved for reuse across synchronizations, and more goes back to the
    driver, so the pool (shared with other libraries in the process) does not keep the
    peak of a long prefill forever.
  - A DeviceArray read on a stream other than its own (a layer, or a DLPack consumer
    that names its stream) has its own stream ordered after the reader's, so freeing
    it cannot overtake the reads.
"""
from __future__ import annotations

from . import _C


__all__ = ["available", "device_count", "unavailable_reason", "DeviceArray", "to_device", "is_device_array",
           "set_stream", "get_stream", "synchronize"]

_state = {"module": None, "error": None}


def _module():
    """llmint8._cuda, imported on first use; None when it was not built or cannot load
    (``_load_error()`` then says why). Never raises."""
    if _state["module"] is None and _state["error"] is None:
        info = _C.build_info()
        if not info.get("cuda_built"):
            _state["error"] = (f"llmint8 was built without the CUDA backend ({info.get('cuda_off', 'unknown reason')}); "
                               "rebuild with the CUDA toolkit (nvcc) on PATH")
        else:
            try:
                from . import _cuda
                _state["module"] = _cuda
            except (ImportError, OSError) as e:  # a missing or too old libcudart / libcublasLt
                _state["error"] = f"llmint8._cuda could not be loaded: {e}"
    return _state["module"]


def _load_error():
    """Why llmint8._cuda is not loaded (a str), or None once it is."""
    _module()
    return _state["error"]


def _need():
    m = _module()
    if m is None:
        raise RuntimeError(f"CUDA is not available: {_state['error']}")
    return m


def __getattr__(name):
    if name == "DeviceArray":  # the type lives in llmint8._cuda: load it only when asked for
        m = _module()
        return m.DeviceArray if m is not None else None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> bool:
    """True when the CUDA backend is built and loads, and a GPU and driver are usable. Never raises."""
    try:
        m = _module()
        return bool(m is not None and m.cuda_available())
    except Exception:
        return False


def device_count() -> int:
    """Number of usable CUDA devices (0 without a GPU, a driver, or the CUDA backend)."""
    m = _module()
    return m.cuda_device_count() if m is not None else 0


def unavailable_reason():
    """Why CUDA cannot be used (a str), or None when it can."""
    m = _module()
    if m is None:
        return _state["error"]
    return m.cuda_unavailable_reason()


def to_device(a, device="cuda"):
    """Copy a host array (float16, float32, int8 or int32, up to 8-D) to the GPU -> DeviceArray.

    device: "cuda" or "cuda:N". A DeviceArray already on that device is returned as is."""
    return _need().to_device(a, device)


def is_device_array(x) -> bool:
    """True for a DeviceArray or any object exporting CUDA memory by DLPack or the CUDA Array Interface.

    Looks only at the object (no import of the CUDA backend, no GPU call): CPU layers ask
    this of every input. The same test the C layer makes (csrc/python/shared.c)."""
    return bool(_C._is_cuda_array(x))


def set_stream(handle: int) -> None:
    """Queue all following GPU work on the CUDA stream `handle` (an int cudaStream_t).

    0 or 1: the legacy default stream. 2 (the per-thread default stream) raises
    ValueError: that handle names a different stream in every thread, so pass an explicit
    stream handle instead. The stream must belong to the layers' device and outlive the
    arrays made while it is current."""
    _need().set_stream(int(handle))


def get_stream() -> int:
    """The current stream as the protocols number it (1: legacy default)."""
    return _need().get_stream()


def synchronize() -> None:
    """Wait until the work queued on the current stream is done.

    With the legacy default stream, that stream of every device llmint8 has used."""
    _need().synchronize()
