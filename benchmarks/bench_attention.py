"""CPU benchmark: the decoding attention, _C.attention_decode against the NumPy products.

One new position attends over --positions cached ones (SmolLM2-135M's heads by default: 9
query heads sharing 3 key/value heads of 64), the way the model runner computes it before
(two batched matrix products and a softmax in NumPy/OpenBLAS) and now (one C pass). "hot":
the same cache every call; "cold": --copies caches in turn, so each call reads its cache
from beyond the L2 cache, as a decoding step does after the other layers' weights passed.
Median microseconds per call of --calls calls, one thread (run with OPENBLAS_NUM_THREADS=1).

Run:  OPENBLAS_NUM_THREADS=1 python benchmarks/bench_attention.py [--positions 512,2048]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from llmint8 import _C  # noqa: E402


def numpy_path(q, K, V, S, scale):
    """The model runner's NumPy attention for one position (transformer.py, T = 1)."""
    B, H, hd = q.shape
    KV = K.shape[2]
    rep = H // KV
    k, v = K[:, :S], V[:, :S]
    s = (q.reshape(B, KV, rep, hd) @ k.transpose(0, 2, 3, 1)).reshape(B, H, 1, S)
    s *= np.float32(scale)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return (s.reshape(B, KV, rep, S) @ v.transpose(0, 2, 1, 3)).reshape(B, H, hd)


def median_us(fn, calls, copies):
    ts = []
    for i in range(calls):
        t0 = time.perf_counter()
        fn(i % copies)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", default="128,512,2048")
    ap.add_argument("--heads", default="9,3,64", help="query heads, key/value heads, head size")
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--copies", type=int, default=48)
    a = ap.parse_args(argv)
    H, KV, hd = (int(v) for v in a.heads.split(","))
    _C.set_num_threads(1)
    rng = np.random.default_rng(0)
    print(f"heads {H} sharing {KV} key/value heads of {hd}, one thread, load average {os.getloadavg()[0]:.1f}")
    print(f"{'positions':>9} {'numpy hot us':>12} {'C hot us':>9} {'numpy cold us':>13} {'C cold us':>10} "
          f"{'hot x':>6} {'cold x':>7} {'max rel. diff':>13}")
    for S in (int(v) for v in a.positions.split(",")):
        q = rng.standard_normal((1, H, hd), dtype=np.float32)
        Ks = [rng.standard_normal((1, S, KV, hd), dtype=np.float32) for _ in range(a.copies)]
        Vs = [rng.standard_normal((1, S, KV, hd), dtype=np.float32) for _ in range(a.copies)]
        scale = hd ** -0.5
        ref = numpy_path(q, Ks[0], Vs[0], S, scale)
        diff = float(np.abs(_C.attention_decode(q, Ks[0], Vs[0], S, scale) - ref).max() / np.abs(ref).max())
        nh = median_us(lambda i: numpy_path(q, Ks[0], Vs[0], S, scale), a.calls, 1)
        ch = median_us(lambda i: _C.attention_decode(q, Ks[0], Vs[0], S, scale), a.calls, 1)
        nc = median_us(lambda i: numpy_path(q, Ks[i], Vs[i], S, scale), a.calls, a.copies)
        cc = median_us(lambda i: _C.attention_decode(q, Ks[i], Vs[i], S, scale), a.calls, a.copies)
        print(f"{S:>9} {nh:>12.1f} {ch:>9.1f} {nc:>13.1f} {cc:>10.1f} {nh / ch:>6.2f} {nc / cc:>7.2f} {diff:>13.1e}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
