"""llmint8: LLM.int8() 8-bit matrix multiplication with outlier decomposition, without PyTorch.

Dettmers, Lewis, Belkada, Zettlemoyer, "LLM.int8(): 8-bit Matrix Multiplication for
Transformers at Scale", NeurIPS 2022 (arXiv:2208.07339).

Quick start::

    import numpy as np, llmint8
    w = np.random.randn(4096, 4096).astype(np.float16)
    layer = llmint8.Int8Linear.from_float(w, threshold=6.0)
    y = layer(np.random.randn(8, 4096).astype(np.float16))
"""
from ._version import __version__
from . import cuda
from .backends import (backends, build_info, cpu_kernel, cpu_kernels, cuda_available, get_num_threads,
                       set_cpu_kernel, set_num_threads)
from .linear import Int8Linear
from .quant import (
    METHODS,
    dequantize,
    find_outlier_columns,
    int8_matmul,
    matmul,
    quantize_absmax,
    quantize_rowwise,
    quantize_zeropoint,
    relative_error,
)
from .cuda import get_stream, is_device_array, set_stream, synchronize, to_device
from .synthetic import paper_like

__all__ = [
    "__version__", "backends", "cuda_available", "build_info", "set_num_threads", "get_num_threads",
    "cpu_kernels", "cpu_kernel", "set_cpu_kernel",
    "Int8Linear", "METHODS", "quantize_absmax", "quantize_rowwise", "quantize_zeropoint", "dequantize",
    "find_outlier_columns", "int8_matmul", "matmul", "relative_error", "paper_like",
    "DeviceArray", "to_device", "is_device_array", "set_stream", "get_stream", "synchronize",
]


def __getattr__(name):
    if name == "DeviceArray":  # lives in llmint8._cuda, which loads on first CUDA use
        return cuda.DeviceArray
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
