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

    Known outlier columns use the fp16 weight; dynamic ones the dequantized int8 weight.
    The outlier product keeps x's precision: for float16 x the dynamic weight columns are
    rounded to fp16, for float32 x neither x nor they are rounded."""
    half = np.asarray(x).dtype.type is np.float16  # any byte order
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    known = np.unique(np.asarray(known, dtype=np.int64))
    qw, sw = ref_quantize_rows(w, known)
    dyn = np.nonzero(np.abs(x).max(axis=0) >= threshold)[0] if threshold > 0 and x.size else np.array([], int)
    out = np.union1d(known, dyn).astype(np.int64)
    qx, sx = ref_quantize_rows(x, out)
    y = (qx @ qw.T) * (sx[:, None] * sw[None, :]) / 127.0**2
    if len(out):
        wo = qw[:, out] * sw[:, None] / 127.0
        if half:
            wo = wo.astype(np.float16).astype(np.float64)
        is_known = np.isin(out, known)
        wo[:, is_known] = w[:, out[is_known]].astype(np.float16).astype(np.float64)
        y += x[:, out] @ wo.T
    if bias is not None:
        y += np.asarray(bias, dtype=np.float64)
    return y


def packed_weight_nbytes(kernel, n, k):
    """Bytes of an (n, k) int8 weight packed for a CPU kernel, from the layout csrc/gemm.h
    documents: portable keeps (n, k); the SIMD kernels pad n to a multiple of 16 and k to a
    multiple of 4, and the vpdpbusd kernels (avxvnni, avx512vnni) add an int32 per padded row."""
    if kernel == "portable":
        return n * k
    n_pad, k_pad = -(-n // 16) * 16, -(-k // 4) * 4
    return n_pad * k_pad + (4 * n_pad if kernel in ("avxvnni", "avx512vnni") else 0)


def int8linear_nbytes(kernel, n, k, n_outliers=0, bias=False):
    """What a CPU Int8Linear (n, k) holds: the packed weight, float32 row scales, fp16 known
    outlier columns with their int32 indices, and the float32 bias."""
    return (packed_weight_nbytes(kernel, n, k) + 4 * n + (2 * n + 4) * n_outliers
            + (4 * n if bias else 0))


# --------------------------------------------------------------------------- command lines


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts loading a model: its argument checks must come first."""
    import llmint8.analysis.cli as acli
    import llmint8.models as models

    def boom(*a, **k):
        raise AssertionError("the command loaded a model before checking its arguments")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(acli, "_load", boom)


def one_line_error(capsys, rc, expected_rc, *words):
    """A command's failure: exit status expected_rc and one line on stderr holding every word."""
    err = capsys.readouterr().err
    assert rc == expected_rc, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
