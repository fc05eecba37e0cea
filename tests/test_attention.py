"""The decoding attention op (_C.attention_decode) against the float64 attention."""
import numpy as np
import pytest

from llmint8 import _C

# float32 dot products of up to 256 terms and a softmax over up to 1000 positions
ATTN_RTOL = 2e-5
ATTN_ATOL = 2e-6


def ref(q, K, V, length, scale, start=0):
    """float64 attention of q (B, H, hd) over positions [start, length) of K, V (B, cap, KV, hd)."""
    B, H, hd = q.shape
    KV = K.shape[2]
    rep = H // KV
    out = np.zeros((B, H, hd))
    for b in range(B):
        for h in range(H):
            k = K[b, start:length, h // rep].astype(np.float64)
            v = V[b, start:length, h // rep].astype(np.float64)
            s = scale * (k @ q[b, h].astype(np.float64))
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v
    return out


@pytest.mark.parametrize("B,H,KV,hd,cap,length,start", [
    (1, 9, 3, 64, 600, 513, 0),      # SmolLM2's heads at 512 tokens of context
    (1, 4, 1, 256, 40, 40, 0),       # Gemma 3 270M: one kv head, hd 256, the cache full
    (2, 8, 8, 7, 16, 9, 3),          # no grouping, hd not a multiple of 8, a window
    (1, 6, 2, 8, 5, 1, 0),           # one position
    (3, 2, 1, 17, 1000, 1000, 488),  # a sliding window at its end
])
def test_matches_float64(B, H, KV, hd, cap, length, start):
    rng = np.random.default_rng(B * 100 + hd)
    q = rng.standard_normal((B, H, hd), dtype=np.float32)
    K = rng.standard_normal((B, cap, KV, hd), dtype=np.float32) * 2
    V = rng.standard_normal((B, cap, KV, hd), dtype=np.float32)
    scale = hd ** -0.5
    got = _C.attention_decode(q, K, V, length, scale, start)
    assert got.dtype == np.float32 and got.shape == (B, H, hd)
    np.testing.assert_allclose(got, ref(q, K, V, length, scale, start), rtol=ATTN_RTOL, atol=ATTN_ATOL)


def test_positions_beyond_length_are_not_read():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 16), dtype=np.float32)
    K = rng.standard_normal((1, 32, 2, 16), dtype=np.float32)
    V = rng.standard_normal((1, 32, 2, 16), dtype=np.float32)
    a = _C.attention_decode(q, K, V, 20, 0.25)
    K[:, 20:] = np.nan
    V[:, 20:] = 1e30
    K[:, :0] = 0
    np.testing.assert_array_equal(_C.attention_decode(q, K, V, 20, 0.25), a)


def test_threads_agree():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 12, 64), dtype=np.float32)
    K = rng.standard_normal((2, 700, 4, 64), dtype=np.float32)
    V = rng.standard_normal((2, 700, 4, 64), dtype=np.float32)
    old = _C.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            _C.set_num_threads(t)
            outs.append(_C.attention_decode(q, K, V, 700, 0.125, 100))
    finally:
        _C.set_num_threads(old)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_errors():
    q = np.zeros((1, 4, 8), np.float32)
    K = np.zeros((1, 10, 2, 8), np.float32)
    with pytest.raises(TypeError, match="q must be float32"):
        _C.attention_decode(q.astype(np.float16), K, K, 5, 1.0)
    with pytest.raises(TypeError, match="k_cache must be float32"):
        _C.attention_decode(q, K.astype(np.float64), K, 5, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        _C.attention_decode(q, K, K[:, :5], 5, 1.0)
    with pytest.raises(ValueError, match="multiple of KV"):
        _C.attention_decode(np.zeros((1, 3, 8), np.float32), K, K, 5, 1.0)
    with pytest.raises(ValueError, match="B and hd of q"):
        _C.attention_decode(np.zeros((2, 4, 8), np.float32), K, K, 5, 1.0)
    for length, start in [(0, 0), (11, 0), (5, 5), (5, -1)]:
        with pytest.raises(ValueError, match="start < length <= capacity"):
            _C.attention_decode(q, K, K, length, 1.0, start)
    with pytest.raises(ValueError, match="must be 4-D"):
        _C.attention_decode(q, K[0], K, 5, 1.0)


@pytest.mark.parametrize("hd", [7, 8, 64, 72, 128, 256])
@pytest.mark.parametrize("rep", [1, 3, 4, 5, 8])
def test_every_kernel_gives_the_portable_bits(hd, rep):
    import llmint8

    rng = np.random.default_rng(hd * 10 + rep)
    KV, cap = 2, 300
    q = rng.standard_normal((1, KV * rep, hd), dtype=np.float32)
    K = rng.standard_normal((1, cap, KV, hd), dtype=np.float32)
    V = rng.standard_normal((1, cap, KV, hd), dtype=np.float32)
    for length, start in [(77, 5), (290, 5)]:  # one block of the value pass, and three
        want = _C.attention_decode(q, K, V, length, 0.3, start, kernel="portable")
        np.testing.assert_allclose(want, ref(q, K, V, length, 0.3, start), rtol=ATTN_RTOL, atol=ATTN_ATOL)
        for kern in llmint8.cpu_kernels():
            got = _C.attention_decode(q, K, V, length, 0.3, start, kernel=kern)
            np.testing.assert_array_equal(got, want, err_msg=kern)


def test_empty_shapes():
    for qs, ks in [((1, 0, 8), (1, 5, 2, 8)), ((1, 4, 0), (1, 5, 2, 0)), ((0, 4, 8), (0, 5, 2, 8))]:
        k = np.zeros(ks, np.float32)
        assert _C.attention_decode(np.zeros(qs, np.float32), k, k, 3, 1.0).shape == qs
