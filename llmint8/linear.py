"""Int8Linear: an nn.Linear-style layer computed by LLM.int8().

The heavy lifting is in the C type ``llmint8._C.Int8Linear``; this subclass adds the
float-weight constructor, (..., in_features) inputs, copies of the held weights,
``to(device)``, pickling and a repr.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import numpy as np
import numpy.typing as npt

from . import _C
from .backends import resolve_device
from .cuda import is_device_array

__all__ = ["Int8Linear"]

#: What ``out_dtype`` accepts: anything ``np.dtype`` turns into float16 or float32, or None.
DTypeLike = Optional[npt.DTypeLike]


def _rebuild(cls, weight_int8, weight_scale, outlier_columns, outlier_weight, bias, threshold, device):
    return cls(weight_int8, weight_scale, outlier_columns, outlier_weight, bias, threshold, device)


class Int8Linear(_C.Int8Linear):
    """A linear layer ``y = x @ weight.T + bias`` computed with LLM.int8().

    Holds the weight as int8 with one absmax scale per output row (``weight_scale`` is
    the absmax, not absmax/127), the layer's known outlier columns as fp16, and an
    optional float32 bias. At every call:

    * the columns of x with any ``|x| >= threshold`` (found anew each call) together with
      the known ``outlier_columns`` are multiplied in fp16 with fp32 accumulation; known
      columns use the original weight columns in fp16, dynamically found columns use
      the int8 weight dequantized to fp16 (the best the layer holds for them);
    * all other columns go through int8 x int8 -> int32 with vector-wise scales (a scale
      per row of x over its non-outlier columns, a scale per row of the weight).

    ``threshold=0`` turns the dynamic decomposition off (known outlier columns, if
    any, still use their fp16 weights: only fp16 copies of them are kept).

    The outlier product keeps the precision of x: float16 x multiplies fp16 operands
    (a dynamically found column's dequantized weight is rounded to fp16; a value beyond
    fp16's range there raises ValueError), float32 x multiplies x in float32 with the
    fp16 known columns or the unrounded dequantized weight, so a finite float32 input
    never overflows in the outlier path.

    The raw constructor ``Int8Linear(weight_int8, weight_scale, outlier_columns,
    outlier_weight, ...)`` pairs ``outlier_columns[i]`` with ``outlier_weight[:, i]``;
    both are sorted together, and a column given twice is a ValueError.

    Build one with :meth:`from_float`. Calls are thread-safe: the layer is immutable.
    """

    __slots__ = ()

    @classmethod
    def from_float(cls, weight: npt.ArrayLike, bias: Optional[npt.ArrayLike] = None, threshold: float = 6.0,
                   outlier_columns: Optional[npt.ArrayLike] = None, device: Optional[str] = None) -> "Int8Linear":
        """Quantize a float weight into an Int8Linear.

        weight: (out_features, in_features) float16/float32, as in nn.Linear.
        bias: (out_features,) float16/float32, or None.
        threshold: dynamic outlier threshold (>= 0; 0 = no dynamic decomposition).
        outlier_columns: known outlier feature indices (e.g. from calibration with
            ``find_outlier_columns``), a 1-D integer sequence; their weight columns are
            kept in fp16 and left out of the row scales. Sorted and deduplicated (in
            O(n + in_features)). A float32 weight beyond fp16's range (65504) in one of
            these columns raises ValueError naming the element.
        device: "cpu", "cuda", "cuda:N", or None for the best available.
        """
        device = resolve_device(device)
        cols: Any = [] if outlier_columns is None else outlier_columns
        wq, ws, wo = _C.quantize_weight(weight, cols)  # validates cols; wo follows np.unique(cols)
        cols = np.unique(np.asarray(cols)).astype(np.int64) if wo.shape[1] else []
        return cls(wq, ws, cols, wo, bias, threshold, device)

    def __call__(self, x: Any, out_dtype: DTypeLike = None) -> Any:
        """y = layer(x) for x (..., in_features) float16/float32; y (..., out_features).

        out_dtype: float16 or float32 (default: x's dtype), as :meth:`forward` takes it.
        x of another dtype raises TypeError, float64 (NumPy's default) included: the message
        gives the cast (``x.astype(np.float32)``); llmint8 never casts silently.
        NumPy (or array-like) in gives NumPy out. On a CUDA layer a device array (DeviceArray,
        or a CuPy / JAX / PyTorch CUDA array) gives a DeviceArray out, without a host round trip.
        """
        if not is_device_array(x):
            given = x
            x = np.asarray(x)
            if x.dtype.kind not in "fiucb":  # None, str, objects: not an array of numbers
                raise TypeError(f"x must be a float16 or float32 array of shape (..., {self.in_features}), "
                                f"got {type(given).__name__}")
        if len(x.shape) == 0:
            raise ValueError(f"x must have shape (..., {self.in_features}), got a scalar")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}) for this layer, got {tuple(x.shape)}")
        lead = tuple(x.shape[:-1])
        if len(x.shape) == 2:
            return self.forward(x, out_dtype)
        y = self.forward(x.reshape(-1, self.in_features), out_dtype)
        return y.reshape(*lead, self.out_features)

    if TYPE_CHECKING:  # what the C base type defines, for type checkers (inspect reads its docstrings)
        in_features: int
        out_features: int
        threshold: float
        device: str
        has_bias: bool
        nbytes: int
        outlier_columns: np.ndarray

        def forward(self, x: Any, out_dtype: DTypeLike = None) -> Any:
            """y = x @ weight.T + bias for x (m, in_features); see the C docstring."""

    # ---- copies of what the layer holds
    @property
    def weight_int8(self) -> np.ndarray:
        """(out, in) int8 copy of the quantized weight (known outlier columns are 0)."""
        return self._export()[0]

    @property
    def weight_scale(self) -> np.ndarray:
        """(out,) float32 copy of the weight's row scales: absmax over non-outlier columns."""
        return self._export()[1]

    @property
    def outlier_weight(self) -> np.ndarray:
        """(out, len(outlier_columns)) float16 copy of the known outlier weight columns."""
        return self._export()[2]

    @property
    def bias(self) -> Optional[np.ndarray]:
        """(out,) float32 copy of the bias, or None."""
        return self._export()[3]

    def dequantized_weight(self) -> np.ndarray:
        """(out, in) float32: the weight as the layer sees it (int8 dequantized, fp16 outlier columns)."""
        wq, ws, wo, _ = self._export()
        w = wq.astype(np.float32) * (ws / np.float32(127.0))[:, None]
        w[:, self.outlier_columns] = wo.astype(np.float32)
        return w

    def to(self, device: str) -> "Int8Linear":
        """A copy of this layer on another device ("cpu", "cuda", "cuda:N")."""
        device = resolve_device(device)
        wq, ws, wo, b = self._export()
        return type(self)(wq, ws, self.outlier_columns, wo, b, self.threshold, device)

    # ---- plain arrays and back
    def to_dict(self) -> dict[str, np.ndarray]:
        """The layer as a dict of NumPy arrays (copies), enough to rebuild it exactly:

        ``weight_int8`` (out, in) int8 (known outlier columns are 0), ``weight_scale`` (out,)
        float32 (each row's absmax over the non-outlier columns), ``outlier_columns`` (k,) int32
        sorted and unique, ``outlier_weight`` (out, k) float16 (those columns of the original
        weight), ``threshold`` () float32, and ``bias`` (out,) float32 only when the layer has
        one. :meth:`from_dict` of the result computes bit-identical outputs."""
        wq, ws, wo, b = self._export()
        d = {"weight_int8": wq, "weight_scale": ws, "outlier_columns": self.outlier_columns,
             "outlier_weight": wo, "threshold": np.array(self.threshold, dtype=np.float32)}
        if b is not None:
            d["bias"] = b
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], device: Optional[str] = None) -> "Int8Linear":
        """Rebuild a layer from :meth:`to_dict`'s arrays (missing ``bias`` = no bias, missing
        ``threshold`` = 6.0). The arrays are copied into the layer's own layout, so ``d`` may
        hold memory-mapped arrays. ``outlier_columns`` must be strictly increasing (as
        :meth:`to_dict` writes them). Raises ValueError/TypeError naming a missing key or a
        wrong dtype or shape."""
        missing = [k for k in ("weight_int8", "weight_scale", "outlier_columns", "outlier_weight") if k not in d]
        if missing:
            raise ValueError(f"Int8Linear.from_dict: missing key(s) {', '.join(missing)}; "
                             f"expected the keys Int8Linear.to_dict writes")
        cols = np.asarray(d["outlier_columns"])
        if cols.ndim != 1 or (cols.size and not np.issubdtype(cols.dtype, np.integer)):
            raise ValueError(f"Int8Linear.from_dict: outlier_columns must be a 1-D integer array, "
                             f"got shape {cols.shape} dtype {cols.dtype}")
        if cols.size > 1 and not np.all(np.diff(cols.astype(np.int64)) > 0):
            raise ValueError("Int8Linear.from_dict: outlier_columns must be strictly increasing "
                             "(their order matches outlier_weight's columns)")
        thr = d.get("threshold", 6.0)
        thr = float(np.asarray(thr).reshape(-1)[0]) if np.size(thr) == 1 else thr
        return cls(d["weight_int8"], d["weight_scale"], cols, d["outlier_weight"], d.get("bias"), thr,
                   resolve_device(device))

    def __reduce__(self):
        wq, ws, wo, b = self._export()
        return (_rebuild, (type(self), wq, ws, self.outlier_columns, wo, b, self.threshold, self.device))

    def __repr__(self) -> str:
        return (f"Int8Linear(in_features={self.in_features}, out_features={self.out_features}, "
                f"threshold={self.threshold:g}, outlier_columns={len(self.outlier_columns)}, "
                f"bias={self.has_bias}, device='{self.device}', "
                f"nbytes={self.nbytes})")
