"""GPU benchmark: Int8Linear (LLM.int8()) vs an fp16 cuBLASLt linear layer.

What is timed (same run, same device buffers, fp16 in and out, bias on):
  fp16      llmint8._cuda._fp16_linear: one cuBLASLt fp16 GEMM with fp32 accumulation and the
            bias as its epilogue (what a framework's nn.Linear does on the GPU).
  int8 t=6  Int8Linear.forward, threshold 6: outlier detection, quantization of x, int8
            GEMM (cuBLASLt, or the GEMV kernel for <= 8 tokens), dequantization with the
            fp16 outlier product and the bias.
  int8 t=0  the same layer without decomposition (threshold 0).
x is N(0, 1) with 0.1% of its columns (at least one) holding outliers of magnitude 20 to
100 in every row, as in the paper's large models.

Two timings of each, after warm-up:
  GPU ms    CUDA events around each call on the current stream (llmint8._cuda._cuda_time),
            median of --iters calls (>= 50); before each call 256 MiB are written to evict
            the weights and activations from L2, so every call reads them from DRAM as in a
            model far larger than the cache. The host queues the next call while the GPU
            clears the cache, so this hides the host's launch overhead.
  wall us   back to back: --iters calls in a loop with no flush, then one synchronization,
            wall-clock time per call. This includes the host side (Python, argument checks,
            descriptor set-up, every launch) where it is the bottleneck, as it is for small
            layers: the int8 forward launches several kernels where fp16 launches one.

Columns: ms per call; ratio int8 (t=6) / fp16 (below 1: int8 faster); TOPS of int8 (t=6)
counting 2 m n k operations; weight bytes of the int8 layer / the fp16 layer; relative
error ||y - y_ref|| / ||y_ref|| of each output against a float32 reference computed on the
host (from the same fp16 inputs) for up to --check-rows rows.

Run:  python benchmarks/bench_linear.py [--quick] [--iters 50] [--shapes 4096x4096,...] [--tokens 1,8,...]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import llmint8
from llmint8 import _C
from llmint8 import cuda as lcuda

_cuda = lcuda._module()

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (in, out)
TOKENS = [1, 8, 32, 128, 512, 2048, 8192]
FLUSH_BYTES = 256 << 20


def parse_shapes(s):
    return [tuple(int(v) for v in p.lower().split("x")) for p in s.split(",") if p]


def activations(rng, m, k):
    """N(0, 1) fp16 with 0.1% of the columns (at least one) at magnitude 20-100."""
    x = rng.standard_normal((m, k), dtype=np.float32)
    ncols = max(1, round(0.001 * k))
    cols = rng.choice(k, size=ncols, replace=False)
    x[:, cols] = rng.uniform(20.0, 100.0, size=(m, ncols)) * rng.choice([-1.0, 1.0], size=(m, ncols))
    return x.astype(np.float16)


def rel(y, ref):
    y = np.asarray(y, np.float64)
    return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def median_ms(fn, iters, warmup):
    _cuda._cuda_time(fn, warmup, flush_bytes=FLUSH_BYTES)
    return statistics.median(_cuda._cuda_time(fn, iters, flush_bytes=FLUSH_BYTES))


def wall_us(fn, iters):
    """Microseconds per call of `iters` back-to-back calls, no flush, one synchronization."""
    fn()
    lcuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    lcuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES), help="in x out, comma separated")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="rows of x, comma separated")
    ap.add_argument("--iters", type=int, default=50, help="timed calls per case (median), at least 50")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--check-rows", type=int, default=64, help="rows compared with the float32 reference")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, tokens 1, 32, 2048")
    args = ap.parse_args(argv)

    if not llmint8.cuda_available():
        sys.exit(f"bench_linear: no usable CUDA GPU ({lcuda.unavailable_reason()}); this benchmark needs one")
    shapes = [(4096, 4096)] if args.quick else parse_shapes(args.shapes)
    tokens = [1, 32, 2048] if args.quick else [int(t) for t in args.tokens.split(",") if t]
    iters = max(50, args.iters)
    info = llmint8.build_info()
    print(f"llmint8 {llmint8.__version__}, CUDA {info.get('cuda_version')}, archs {info.get('cuda_archs')}, "
          f"median of {iters} calls, L2 flushed before each call")
    print("GPU ms: CUDA events, L2 flushed before each call; wall us: back-to-back calls, no flush; "
          "ratio: int8 (t=6) / fp16")
    hdr = (f"{'in x out':>12} {'tokens':>6} | {'fp16 ms':>9} {'int8 t=6':>9} {'int8 t=0':>9} {'ratio':>6} | "
           f"{'fp16 us':>8} {'int8 us':>8} {'ratio':>6} | {'TOPS':>6} {'wbytes':>6} | "
           f"{'err fp16':>9} {'err t=6':>9} {'err t=0':>9}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    for k, n in shapes:
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float16)
        b = (rng.standard_normal(n, dtype=np.float32) * 0.1).astype(np.float16)
        wq, ws, wo = _C.quantize_weight(w)
        t6 = llmint8.Int8Linear(wq, ws, [], wo, b, 6.0, "cuda")
        t0 = llmint8.Int8Linear(wq, ws, [], wo, b, 0.0, "cuda")
        del wq, ws, wo
        wd, bd = lcuda.to_device(w), lcuda.to_device(b)
        wbytes = t6.nbytes / (w.nbytes + b.nbytes)
        w32 = w.astype(np.float32)
        for m in tokens:
            x = activations(rng, m, k)
            xd = lcuda.to_device(x)
            ms16 = median_ms(lambda: _cuda._fp16_linear(xd, wd, bd), iters, args.warmup)
            ms6 = median_ms(lambda: t6.forward(xd, out_dtype=np.float16), iters, args.warmup)
            ms0 = median_ms(lambda: t0.forward(xd, out_dtype=np.float16), iters, args.warmup)
            us16 = wall_us(lambda: _cuda._fp16_linear(xd, wd, bd), iters)
            us6 = wall_us(lambda: t6.forward(xd, out_dtype=np.float16), iters)
            r = min(m, args.check_rows)
            ref = (x[:r].astype(np.float32) @ w32.T + b.astype(np.float32)).astype(np.float64)
            e16 = rel(_cuda._fp16_linear(xd, wd, bd).numpy()[:r], ref)
            e6 = rel(t6.forward(xd, out_dtype=np.float16).numpy()[:r], ref)
            e0 = rel(t0.forward(xd, out_dtype=np.float16).numpy()[:r], ref)
            tops = 2.0 * m * n * k / (ms6 * 1e-3) / 1e12
            print(f"{f'{k}x{n}':>12} {m:>6} | {ms16:>9.4f} {ms6:>9.4f} {ms0:>9.4f} {ms6 / ms16:>6.2f} | "
                  f"{us16:>8.1f} {us6:>8.1f} {us6 / us16:>6.2f} | {tops:>6.1f} {wbytes:>6.3f} | "
                  f"{e16:>9.2e} {e6:>9.2e} {e0:>9.2e}", flush=True)
            del xd
        del t6, t0, wd, bd


if __name__ == "__main__":
    main()
