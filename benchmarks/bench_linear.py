"""GPU benchmark: Int8Linear (LLM.int8()) vs an fp16 cuBLASLt linear layer.

What is timed (same run, same device buffers, fp16 in and out, bias on):
  fp16      llmint8._cuda._fp16_linear: one cuBLASLt fp16 GEMM with fp32 accumulation and the
            bias as its epilogue (what a framework's nn.Linear does on the GPU).
  int8 t=6  Int8Linear.forward, threshold 6: outlier detection, quantization of x, int8
            GEMM (cuBLASLt, or the GEMV kernel for <= 8 tokens), dequantization with the
            fp16 outlier product and the bias.
  int8 t=0  the same layer without decomposition (threshold 0).
  fused     int8 t=6 with the fused paths forced (_cuda._set_fused("all"): one launch for
            m <= 16 tokens, the two-launch quantizer before the int8 GEMM above that; on
            Hopper with build_info()["sm90_gemm"], that GEMM is the CUTLASS one with the
            dequantization in its epilogue instead of cuBLASLt + a separate epilogue).
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

--check: after the table, one line per target (met / missed, with the worst case), for
the default dispatch and for the fused paths:
  - int8 t=6 / fp16 <= 1.0 at every row, GPU time and wall time;
  - <= 0.7 at 1 token and at 2048 and 8192 tokens (GPU time);
  - the aim, 0.6 everywhere (how close);
  - decoding (1 token): the int8 weight read at >= 70% of the HBM bandwidth (--hbm-gbs,
    default 4800 GB/s, the H200's datasheet figure; 3350 for an H100 SXM).

Run:  python benchmarks/bench_linear.py [--quick] [--check] [--iters 50] [--shapes 4096x4096,...] [--tokens 1,8,...]
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
    ap.add_argument("--check", action="store_true", help="print one line per target: met or missed")
    ap.add_argument("--hbm-gbs", type=float, default=4800.0, help="HBM bandwidth for the decoding target, GB/s")
    args = ap.parse_args(argv)

    if not llmint8.cuda_available():
        sys.exit(f"bench_linear: no usable CUDA GPU ({lcuda.unavailable_reason()}); this benchmark needs one")
    shapes = [(4096, 4096)] if args.quick else parse_shapes(args.shapes)
    tokens = [1, 32, 2048] if args.quick else [int(t) for t in args.tokens.split(",") if t]
    iters = max(50, args.iters)
    info = llmint8.build_info()
    print(f"llmint8 {llmint8.__version__}, CUDA {info.get('cuda_version')}, archs {info.get('cuda_archs')}, "
          f"sm90 GEMM {'built' if info.get('sm90_gemm') else 'not built'}, "
          f"median of {iters} calls, L2 flushed before each call")
    print("GPU ms: CUDA events, L2 flushed before each call; wall us: back-to-back calls, no flush; "
          "ratio: int8 (t=6) / fp16")
    hdr = (f"{'in x out':>12} {'tokens':>6} | {'fp16 ms':>9} {'int8 t=6':>9} {'int8 t=0':>9} {'ratio':>6} | "
           f"{'fp16 us':>8} {'int8 us':>8} {'ratio':>6} | {'TOPS':>6} {'wbytes':>6} | "
           f"{'err fp16':>9} {'err t=6':>9} {'err t=0':>9} | {'fused ms':>9} {'ratio':>6} {'us':>8} {'ratio':>6} "
           f"{'err':>9}")
    print(hdr)
    print("-" * len(hdr))
    rng = np.random.default_rng(0)
    rows = []  # (shape, m, gpu ratio, wall ratio, fused gpu ratio, fused wall ratio, int8 weight GB/s, fused GB/s)
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
            old = _cuda._set_fused("all")
            try:
                msf = median_ms(lambda: t6.forward(xd, out_dtype=np.float16), iters, args.warmup)
                usf = wall_us(lambda: t6.forward(xd, out_dtype=np.float16), iters)
                ef = rel(t6.forward(xd, out_dtype=np.float16).numpy()[:r], ref)
            finally:
                _cuda._set_fused(old)
            fused = f" | {msf:>9.4f} {msf / ms16:>6.2f} {usf:>8.1f} {usf / us16:>6.2f} {ef:>9.2e}"
            print(f"{f'{k}x{n}':>12} {m:>6} | {ms16:>9.4f} {ms6:>9.4f} {ms0:>9.4f} {ms6 / ms16:>6.2f} | "
                  f"{us16:>8.1f} {us6:>8.1f} {us6 / us16:>6.2f} | {tops:>6.1f} {wbytes:>6.3f} | "
                  f"{e16:>9.2e} {e6:>9.2e} {e0:>9.2e}{fused}", flush=True)
            gbs = n * k / (ms6 * 1e-3) / 1e9
            rows.append((f"{k}x{n}", m, ms6 / ms16, us6 / us16,
                         msf / ms16, usf / us16, gbs, n * k / (msf * 1e-3) / 1e9))
            del xd
        del t6, t0, wd, bd
    if args.check:
        check_targets(rows, args.hbm_gbs)


def check_targets(rows, hbm_gbs):
    """One line per target of the GPU work (met / missed, the worst case), for the default
    dispatch and for the fused paths."""
    print("--- targets (int8 t=6 over fp16, this run)")
    for label, g, w, bw in (("default", 2, 3, 6), ("fused", 4, 5, 7)):
        def worst(sel, col):
            cand = [r for r in rows if sel(r)]
            return max(cand, key=lambda r: r[col]) if cand else None

        def line(name, sel, col, limit):
            r = worst(sel, col)
            if r is None:
                print(f"[{label}] {name}: not measured (no such rows in this run)")
                return
            verdict = "met" if r[col] <= limit else "missed"
            print(f"[{label}] {name}: {verdict} (worst {r[col]:.2f} at {r[0]}, {r[1]} tokens)")

        line("<= 1.0x at every row, GPU time", lambda r: True, g, 1.0)
        line("<= 1.0x at every row, wall time", lambda r: True, w, 1.0)
        for m in (1, 2048, 8192):
            line(f"<= 0.7x at {m} tokens, GPU time", lambda r, m=m: r[1] == m, g, 0.7)
        line("aim: <= 0.6x everywhere, GPU time", lambda r: True, g, 0.6)
        dec = [r for r in rows if r[1] == 1]
        if dec:
            low = min(dec, key=lambda r: r[bw])
            frac = low[bw] / hbm_gbs
            print(f"[{label}] decoding weight read >= 70% of {hbm_gbs:.0f} GB/s: {'met' if frac >= 0.7 else 'missed'} "
                  f"(lowest {low[bw]:.0f} GB/s = {100 * frac:.0f}% at {low[0]})")
        else:
            print(f"[{label}] decoding weight read >= 70% of HBM bandwidth: not measured (no 1-token rows)")


if __name__ == "__main__":
    main()
