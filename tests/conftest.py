"""Shared fixtures: the backend parametrization and the reference LLM.int8() in float64."""
import numpy as np
import pytest

import llmint8

BACKENDS = ["cpu", "cuda"]


@pytest.fixture(params=BACKENDS)
def device(request):
    """Each test taking `device` runs once per backend; CUDA skips without a GPU."""
    if request.param == "cuda" and not llmint8.cuda_available():
        pytest.skip("CUDA backend not available (built without CUDA, or no GPU/driver here)")
    return request.param


def ref_quantize_rows(a, skip=None):
    """float64 reference of vector-wise quantization: (q int64, scales float64)."""
    a = np.asarray(a, dtype=np.float64)
    keep = np.ones(a.shape[1], bool)
    if skip is not None and len(skip):
        keep[np.asarray(skip)] = False
    s = np.abs(a[:, keep]).max(axis=1) if keep.any() else np.zeros(a.shape[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s[:, None] > 0, np.rint(127.0 * a / s[:, None]), 0.0)
    q[:, ~keep] = 0
    return q.astype(np.int64), s


def ref_llm_int8(x, w, bias=None, threshold=6.0, known=()):
    """LLM.int8() forward written independently in float64 NumPy (the test oracle).

    Known outlier columns use the fp16 weight; dynamic ones the dequantized int8 weight."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    known = np.unique(np.asarray(known, dtype=np.int64))
    qw, sw = ref_quantize_rows(w, known)
    dyn = np.nonzero(np.abs(x).max(axis=0) >= threshold)[0] if threshold > 0 and x.size else np.array([], int)
    out = np.union1d(known, dyn).astype(np.int64)
    qx, sx = ref_quantize_rows(x, out)
    y = (qx @ qw.T) * (sx[:, None] * sw[None, :]) / 127.0**2
    if len(out):
        wo = np.where(np.isin(out, known)[None, :], w[:, out], qw[:, out] * sw[:, None] / 127.0)
        wo16 = wo.astype(np.float16).astype(np.float64)
        xo16 = x[:, out].astype(np.float16).astype(np.float64)
        y += xo16 @ wo16.T
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)
    return y
