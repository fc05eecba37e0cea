"""bitsandbytes' LLM.int8() forward, for comparing like with like when migrating from it.

llmint8 and bitsandbytes split x the same way (the columns holding any ``|x| >= threshold``
go through fp16, the rest through int8) but scale the int8 part differently:

* llmint8 (as the paper decomposes X): each row's absmax is taken over the non-outlier
  columns only, so one large value anywhere in an outlier column leaves the whole column out
  of every row's scale;
* bitsandbytes (``int8_vectorwise_quant``, bitsandbytes 0.45 - 0.50): x is cast to fp16, only
  the elements with ``|x| >= threshold`` are zeroed before each row's absmax, so the smaller
  elements of an outlier column still set that row's scale, and are then dropped from the
  int8 product (they go through the fp16 part with the rest of their column).

The bitsandbytes scale is never smaller, so its int8 grid is coarser: its error against the
exact product is larger on rows whose absmax sits in an outlier column (see the README).
:func:`bitsandbytes_forward` computes bitsandbytes' arithmetic on llmint8's weights: the same
int8 codes of x, the same exact int32 products (llmint8's int8 GEMM), then the dequantization
``acc * (row_scale * SCB) * 6.200124e-05`` in float32, the bias, a cast to x's dtype and the
outlier columns multiplied in x's dtype against the int8 weight dequantized
(``CB * SCB * 7.874015718698502e-3``). It is written from bitsandbytes' documented behaviour;
no code of bitsandbytes is used.
"""
from __future__ import annotations

import numpy as np

from .quant import int8_matmul

__all__ = ["bitsandbytes_forward"]

# bitsandbytes' dequantization constants: 1 / 127**2 and 1 / 127 as float32 literals
_MM_DEQUANT = np.float32(6.200124e-05)
_W_DEQUANT = np.float32(7.874015718698502e-3)


def quantize_rows_bitsandbytes(x16: np.ndarray, threshold: float):
    """bitsandbytes' int8 quantization of fp16 activations x16 (n, k).

    Returns ``(codes int8 (n, k), row_scale float32 (n,), outlier_columns int64)``: elements
    with ``|x| >= threshold`` (threshold > 0) are zeroed before each row's absmax, codes are
    ``round_half_even(x * ((1 / row_scale) * 127))`` in float32 with the outlier columns set to 0; an
    all-zero row has scale 0 and codes 0."""
    xf = x16.astype(np.float32)
    cols = np.zeros(0, dtype=np.int64)
    if threshold > 0:
        big = np.abs(xf) >= np.float32(threshold)
        if big.any():
            cols = np.flatnonzero(big.any(axis=0))
            xf[big] = 0
    scale = np.abs(xf).max(axis=1) if xf.shape[1] else np.zeros(xf.shape[0], np.float32)
    # 127 / scale as PyTorch evaluates it (reciprocal, then times 127: two float32 roundings);
    # a correctly rounded quotient flips a few codes at exact .5 ties
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    inv = np.where(scale > 0, (np.float32(1) / safe) * np.float32(127), np.float32(0)).astype(np.float32)
    codes = np.rint(xf * inv[:, None]).astype(np.int8)
    codes[:, cols] = 0
    return codes, scale.astype(np.float32), cols


def _forward_arrays(x, wq, scb, bias, threshold, known_cols=None, known_w=None):
    out_dtype = x.dtype
    codes, rs, cols = quantize_rows_bitsandbytes(x.astype(np.float16), threshold)
    if known_cols is not None and len(known_cols):
        # llmint8's known outlier columns (bitsandbytes has none): always decomposed, with
        # their stored fp16 weight; the int8 weight is 0 there
        codes[:, known_cols] = 0
    acc = int8_matmul(codes, wq)
    y = acc.astype(np.float32) * (rs[:, None] * scb[None, :]) * _MM_DEQUANT
    if bias is not None:
        y += np.asarray(bias).astype(out_dtype).astype(np.float32)
    y = y.astype(out_dtype)
    # outlier columns: x (in its own dtype) against the weight in x's dtype, accumulated in
    # float32 and added with one rounding, as a float16 addmm does
    known = known_cols is not None and len(known_cols) > 0
    dyn = np.setdiff1d(cols, known_cols) if known else cols
    xs, ws = [], []
    if len(dyn):
        xs.append(x[:, dyn])
        ws.append((wq[:, dyn].astype(np.float32) * scb[:, None] * _W_DEQUANT).astype(out_dtype))
    if known:
        xs.append(x[:, known_cols])
        ws.append(np.asarray(known_w).astype(out_dtype))
    if xs:
        xo = np.concatenate(xs, axis=1).astype(np.float32)
        wo = np.concatenate(ws, axis=1).astype(np.float32)
        y = (y.astype(np.float32) + xo @ wo.T).astype(out_dtype)
    return y


def bitsandbytes_forward(layer, x, weights=None):
    """``layer(x)`` computed as bitsandbytes' ``Linear8bitLt`` computes it (inference, int8
    weights), for an :class:`llmint8.Int8Linear` ``layer`` (its ``weight_scale`` plays the part
    of bitsandbytes' ``SCB``).

    x: (..., in_features) float16/float32; returns (..., out_features) in x's dtype. The row
    scales of x skip only the elements with ``|x| >= threshold`` of its fp16 cast (not their
    whole columns, as ``layer(x)`` does); see the module docstring for every step. A layer
    with known outlier columns multiplies them in x's dtype with their fp16 weights, as
    ``layer(x)`` does. ``weights``: the layer's ``_export()`` tuple, when the caller keeps
    one (saves copying the weight at every call)."""
    x = np.asarray(x)
    if x.dtype not in (np.float16, np.float32):
        raise TypeError(f"x must be float16 or float32, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != layer.in_features:
        raise ValueError(f"x must have shape (..., {layer.in_features}) for this layer, got {tuple(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ValueError("x holds NaN or Inf; expected finite values")
    wq, ws, wo, b = layer._export() if weights is None else weights
    lead = x.shape[:-1]
    y = _forward_arrays(x.reshape(-1, layer.in_features), wq, ws, b, float(layer.threshold),
                        layer.outlier_columns, wo)
    return y.reshape(*lead, layer.out_features)
