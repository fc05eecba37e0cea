"""Where a model's arrays live: NumPy on the CPU, CuPy on a CUDA GPU.

The runner (:mod:`llmint8.models.transformer`) is written once against an array namespace
``xp``: ``numpy`` on the CPU, ``cupy`` on the GPU. CuPy is an optional extra
(``pip install 'llmint8[gpu]'``), imported only when a model is put on a GPU; every error
here is one sentence that says what is missing and how to get it.

    from llmint8.models import device
    device.parse_device("cuda:0")   # -> "cuda:0"; ValueError for "gpu", TypeError for 3
    xp = device.namespace("cuda")   # cupy, or DeviceError naming the extra / the missing GPU
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["DeviceError", "GPU_EXTRA", "parse_device", "is_cuda", "namespace", "xp_of", "to_host",
           "to_xp", "device_of", "use_current_stream"]

GPU_EXTRA = ("pip install 'llmint8[gpu]' (CuPy for CUDA 13; on a CUDA 12 driver install cupy-cuda12x "
             "instead)")

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class DeviceError(RuntimeError):
    """A device was named that this machine cannot use (no CuPy, no GPU, no CUDA backend)."""


def parse_device(device) -> str:
    """Normalize a device name: "cpu", "cuda" or "cuda:N" (returned as given, lower case).

    None means "cpu". TypeError for a non-string, ValueError for any other name."""
    if device is None:
        return "cpu"
    if not isinstance(device, str):
        raise TypeError(f"device must be a str such as 'cpu', 'cuda' or 'cuda:0', got {type(device).__name__}")
    d = device.strip().lower()
    if not _DEVICE_RE.match(d):
        raise ValueError(f"device {device!r} is not supported; expected 'cpu', 'cuda' or 'cuda:N'")
    return d


def is_cuda(device: str) -> bool:
    """True for "cuda" and "cuda:N"."""
    return device.startswith("cuda")


def _device_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise DeviceError(f"device 'cuda' needs CuPy, which is not installed ({e}); {GPU_EXTRA}") from None
    return cupy


def namespace(device: str = "cpu"):
    """The array module for ``device``: numpy for "cpu"; cupy for "cuda"/"cuda:N", after checking
    that CuPy imports and the GPU exists (DeviceError otherwise; "cuda:N" also makes device N
    CuPy's current device)."""
    device = parse_device(device)
    if not is_cuda(device):
        return np
    cupy = _import_cupy()
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver, or CuPy's own import-time failures
        raise DeviceError(f"no CUDA GPU found ({_short(e)}); use device 'cpu'") from None
    idx = _device_index(device)
    if n == 0:
        raise DeviceError("no CUDA GPU found; use device 'cpu'")
    if idx >= n:
        raise DeviceError(f"device {device!r} does not exist: this machine has {n} CUDA device(s)")
    cupy.cuda.Device(idx).use()
    return cupy


def require_llmint8_cuda() -> None:
    """DeviceError unless llmint8's own CUDA backend (for the int8 layers) can be used."""
    import llmint8

    if not llmint8.cuda_available():
        from llmint8 import cuda

        raise DeviceError(f"llmint8's CUDA backend is not available ({cuda.unavailable_reason()}); "
                          f"int8 layers cannot run on the GPU")


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def xp_of(a):
    """numpy or cupy: the module of array ``a`` (cupy is not imported for a NumPy array)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def device_of(a) -> str:
    """"cpu" for a NumPy array, "cuda:N" for a CuPy array on device N."""
    if type(a).__module__.startswith("cupy"):
        return f"cuda:{a.device.id}"
    return "cpu"


def to_host(a):
    """A NumPy array for ``a`` (a CuPy array is copied to the host; a NumPy array is returned as is)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def to_xp(a, xp):
    """``a`` as an array of module ``xp`` (a copy when it moves between host and device)."""
    if xp is np:
        return to_host(a)
    return xp.asarray(a)


def use_current_stream(xp) -> None:
    """Make llmint8's CUDA layers queue their work on CuPy's current stream, so that a forward
    runs on one stream (and can be captured into a CUDA graph). A no-op for NumPy."""
    if xp is np:
        return
    from llmint8 import cuda

    ptr = xp.cuda.get_current_stream().ptr
    cuda.set_stream(int(ptr) if ptr else 1)  # 0 (CuPy's null stream) is the legacy default stream: 1


def check_cli_device(device: str, int8_layers: bool = False) -> str:
    """For the commands' ``--device``: the parsed device, or UsageError (one line, exit 2) when
    it is a GPU this machine cannot use (no CuPy, no GPU, or for ``int8_layers`` no llmint8 CUDA
    backend). Checked before any work."""
    from .._cli import UsageError

    try:
        d = parse_device(device)
        if is_cuda(d):
            namespace(d)
            if int8_layers:
                require_llmint8_cuda()
    except (ValueError, TypeError, DeviceError) as e:
        raise UsageError(f"--device {device}: {e}") from None
    return d
