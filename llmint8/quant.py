"""Quantization primitives and y = x @ w.T by each of the paper's methods.

NumPy in, NumPy out, on the CPU. Conventions (the paper's, and bitsandbytes'):

* Symmetric scales are **absmax values**: ``q = round(127 * x / absmax)``, int8 in
  [-127, 127], and ``x_hat = q * absmax / 127``. Rounding is to nearest even.
* Zeropoint quantization is asymmetric over the full int8 range [-128, 127]:
  ``x ~= (q - zeropoint) * scale`` where ``scale`` is the step ``(max - min) / 255`` and
  the range is widened to include 0 (so 0 is exact and the zeropoint fits int8).
* An all-zero tensor or row gets scale 0 and quantizes to 0 exactly, never NaN.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import numpy.typing as npt

from . import _C

__all__ = [
    "quantize_absmax", "quantize_rowwise", "quantize_zeropoint", "dequantize",
    "find_outlier_columns", "int8_matmul", "matmul", "relative_error", "METHODS",
]

#: The methods ``matmul`` knows, in the paper's order of increasing precision.
METHODS = ("fp16", "absmax", "zeropoint", "rowwise", "vectorwise", "llm.int8")

_INV127SQ = 1.0 / (127.0 * 127.0)


def quantize_absmax(x: npt.ArrayLike) -> tuple[np.ndarray, np.float32]:
    """Per-tensor absmax quantization.

    x: float16 or float32 array, any shape with ndim >= 1.
    Returns ``(q, absmax)``: q int8 of x's shape in [-127, 127], absmax a float32 scalar
    (max |x|). Raises TypeError for other dtypes, ValueError for NaN/Inf.
    """
    q, s = _C.quantize_absmax(x)
    return q, np.float32(s)


def quantize_rowwise(x: npt.ArrayLike, skip_columns: Optional[npt.ArrayLike] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Vector-wise (row-wise) quantization: one absmax scale per row.

    x: float16 or float32, (rows, k) or (k,) (one row).
    skip_columns: optional column indices left out of the scales and quantized as 0
        (the outlier columns of LLM.int8()).
    Returns ``(q, scales)``: q int8 of x's shape, scales float32 (rows,) absmax per row.
    """
    return _C.quantize_rowwise(x, skip_columns)


def quantize_zeropoint(x: npt.ArrayLike) -> tuple[np.ndarray, np.float32, int]:
    """Asymmetric per-tensor quantization over the full int8 range.

    x: float16 or float32 array, ndim >= 1.
    Returns ``(q, scale, zeropoint)``: q int8 in [-128, 127], scale a float32 step,
    zeropoint an int in [-128, 127], with ``x ~= (q - zeropoint) * scale``.
    """
    q, s, zp = _C.quantize_zeropoint(x)
    return q, np.float32(s), int(zp)


def dequantize(q: npt.ArrayLike, scale: npt.ArrayLike, zeropoint: Optional[int] = None) -> np.ndarray:
    """Inverse of each quantizer, as float32.

    * ``dequantize(q, absmax)`` inverts ``quantize_absmax``: ``q * absmax / 127``.
    * ``dequantize(q, scales)`` with scales of shape (rows,) inverts ``quantize_rowwise``
      (row i uses scales[i]; a 1-D q takes scales of shape (1,)).
    * ``dequantize(q, scale, zeropoint)`` inverts ``quantize_zeropoint``:
      ``(q - zeropoint) * scale``.

    q must be int8. Raises TypeError / ValueError for the wrong dtype, shapes that
    do not match, or negative / non-finite scales.
    """
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise TypeError(f"q must be int8, got {q.dtype}")
    s = np.asarray(scale, dtype=np.float32) if not isinstance(scale, np.ndarray) else scale
    if s.dtype.kind != "f":
        raise TypeError(f"scale must be a float or float array, got {s.dtype}")
    s = s.astype(np.float32, copy=False)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("scale must be finite and >= 0")
    if zeropoint is not None:
        if s.ndim != 0:
            raise ValueError(f"zeropoint dequantization takes one scale, got shape {s.shape}")
        zp = int(zeropoint)
        if not -128 <= zp <= 127:
            raise ValueError(f"zeropoint must be in [-128, 127], got {zp}")
        return ((q.astype(np.float32) - np.float32(zp)) * s).astype(np.float32)
    if s.ndim == 0:
        return q.astype(np.float32) * (s / np.float32(127.0))
    if s.ndim != 1:
        raise ValueError(f"scale must be a scalar or 1-D (rows,), got shape {s.shape}")
    rows = q.shape[0] if q.ndim == 2 else 1
    if q.ndim not in (1, 2) or s.shape[0] != rows:
        raise ValueError(f"row scales of shape {s.shape} do not match q of shape {q.shape}; "
                         f"expected ({rows},)")
    col = (s / np.float32(127.0)).reshape((-1, 1) if q.ndim == 2 else (1,))
    return q.astype(np.float32) * col


def find_outlier_columns(x: npt.ArrayLike, threshold: float = 6.0) -> np.ndarray:
    """Sorted int32 indices of the columns of x with any ``|x| >= threshold``.

    x: float16 or float32, (m, k) or (k,). threshold: >= 0; 0 turns decomposition off
    and returns an empty array.
    """
    return _C.find_outlier_columns(x, threshold)


def int8_matmul(a: npt.ArrayLike, b: npt.ArrayLike, kernel: Optional[str] = None) -> np.ndarray:
    """Exact int8 GEMM: a (m, k) int8 and b (n, k) int8 give ``a @ b.T`` as int32 (m, n).

    kernel: the CPU kernel, one of ``llmint8.cpu_kernels()`` ("portable", "avx2", "avxvnni",
    "avx512vnni"); None uses ``LLMINT8_CPU_KERNEL`` if set, else the fastest this CPU has.
    """
    return _C.int8_matmul(a, b, kernel=kernel)


def relative_error(y: npt.ArrayLike, ref: npt.ArrayLike) -> float:
    """Mean absolute error over mean absolute reference: ``mean|y - ref| / mean|ref|``.

    The error measure used across llmint8's tests, demo and benchmarks (computed in float64).
    y and ref must have the same shape (ValueError otherwise: broadcasting (3, 1) against
    (3,) would compare every element with every other).
    """
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if y.shape != ref.shape:
        raise ValueError(f"relative_error: y has shape {y.shape} and ref has shape {ref.shape}; "
                         f"expected the same shape")
    denom = np.mean(np.abs(ref))
    return float(np.mean(np.abs(y - ref)) / denom) if denom > 0 else float(np.mean(np.abs(y)))


def _float2d(a: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype not in (np.float16, np.float32):
        cast = (f"; convert it with {name}.astype(np.float32) (llmint8 computes in float16/float32 and never "
                f"casts silently)" if arr.dtype.kind in "fiu" else "")
        raise TypeError(f"{name} must be float16 or float32, got {arr.dtype}{cast}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; expected finite values")
    return arr


def matmul(x: npt.ArrayLike, w: npt.ArrayLike, method: str = "llm.int8", threshold: float = 6.0) -> np.ndarray:
    """y = x @ w.T by one of the paper's methods, as float32 (m, n).

    x: (m, k) float16/float32 activations; w: (n, k) float16/float32 weight (nn.Linear layout).

    method:
      * ``"fp16"``: both operands rounded to fp16, fp32 accumulation.
      * ``"absmax"``: one absmax scale for x and one for w.
      * ``"zeropoint"``: asymmetric per-tensor quantization of both (exact integer
        expansion of the zero points).
      * ``"rowwise"``: a scale per row of x, one scale for w.
      * ``"vectorwise"``: a scale per row of x and per row of w (the paper's vector-wise).
      * ``"llm.int8"``: vector-wise plus fp16 decomposition of the columns of x with
        any ``|x| >= threshold``; those columns of w stay in fp16 and are left out of
        w's row scales.
    """
    x = _float2d(x, "x")
    w = _float2d(w, "w")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"x is {x.shape} and w is {w.shape}; expected x (m, k) and w (n, k) with the same k")
    if method == "fp16":
        xh = x.astype(np.float16).astype(np.float32)
        wh = w.astype(np.float16).astype(np.float32)
        return xh @ wh.T
    if method == "absmax":
        qx, sx = quantize_absmax(x)
        qw, sw = quantize_absmax(w)
        c = int8_matmul(qx, qw)
        return (c * (np.float64(sx) * np.float64(sw) * _INV127SQ)).astype(np.float32)
    if method == "rowwise":
        qx, sx_rows = quantize_rowwise(x)
        qw, sw = quantize_absmax(w)
        c = int8_matmul(qx, qw)
        return (c * (sx_rows.astype(np.float64)[:, None] * (np.float64(sw) * _INV127SQ))).astype(np.float32)
    if method == "zeropoint":
        qx, sx, zx = quantize_zeropoint(x)
        qw, sw, zw = quantize_zeropoint(w)
        c = int8_matmul(qx, qw).astype(np.int64)
        k = x.shape[1]
        # sum (qx - zx)(qw - zw) expanded, exactly in int64
        c -= zw * qx.sum(axis=1, dtype=np.int64)[:, None]
        c -= zx * qw.sum(axis=1, dtype=np.int64)[None, :]
        c += k * zx * zw
        return (c * (np.float64(sx) * np.float64(sw))).astype(np.float32)
    if method in ("vectorwise", "llm.int8"):
        from .linear import Int8Linear

        if method == "vectorwise":
            layer = Int8Linear.from_float(w, threshold=0.0, device="cpu")
        else:
            cols = find_outlier_columns(x, threshold)
            layer = Int8Linear.from_float(w, threshold=threshold, outlier_columns=cols, device="cpu")
        return layer.forward(x, out_dtype=np.float32)
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
