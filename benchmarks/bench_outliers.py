"""CPU benchmark: Int8Linear when a large share of the columns of x are outliers.

Models such as Gemma 3 (embeddings scaled by sqrt(d)) feed their first blocks inputs with
|x| >= 6 in most or all feature columns, so most of the layer's work is the float32 outlier
product. Per case, in one process, alternating int8 / float rounds:

  int8        Int8Linear.forward (threshold 6, float32 x and y): the whole layer, outlier
              scan, quantization, int8 GEMM over the columns left, outlier product, epilogue.
  f32 slice   x[:, O] @ w[:, O].T in NumPy float32 (OpenBLAS), O the outlier columns: the
              same outlier slice multiplied by OpenBLAS, the reference the layer is held to.
  f32 full    x @ w.T in NumPy float32: the float layer.

--cold rotates every operand over enough copies that more than twice the L3 cache is
touched between two uses of one copy, so each call streams its weights from DRAM as in a
model (the default keeps them in cache, where the int8 layer's per-call dequantization of its
outlier columns weighs most).

speed vs slice = f32 slice time / int8 time (1.0: as fast as OpenBLAS on the slice, while
also doing the int8 part). Times are the median of --rounds rounds, each the best of
--reps calls; --clock cpu (the default) uses the thread's CPU time, so that with one thread
(the default: --threads 1 and OPENBLAS_NUM_THREADS=1) other processes on the machine do not
count.

Run:  OPENBLAS_NUM_THREADS=1 python benchmarks/bench_outliers.py [--shapes 640x1024,...] [--tokens 1,16,255] [--cold]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import llmint8  # noqa: E402
from benchutil import l3_bytes, rotating  # noqa: E402
from llmint8 import _C  # noqa: E402

# Gemma 3 270M: q (640 -> 1024), fused q/k/v (640 -> 1536), fused gate/up (640 -> 4096)
SHAPES = "640x1024,640x1536,640x4096"


def best_of(fn, reps, clock):
    ts = []
    for _ in range(reps):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    return min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="in x out, comma separated")
    ap.add_argument("--tokens", default="1,16,255")
    ap.add_argument("--shares", default="1.0,0.9,0.5", help="shares of outlier columns")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--cold", action="store_true", help="stream every operand from DRAM (see above)")
    a = ap.parse_args(argv)
    _C.set_num_threads(a.threads)
    clock = time.thread_time if (a.clock == "cpu" and a.threads == 1) else (
        time.process_time if a.clock == "cpu" else time.perf_counter)
    print(f"llmint8 {llmint8.__file__}, kernel {_C.build_info()['cpu_kernel']}, threads {a.threads}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '-')}, clock {a.clock}, "
          f"load average {os.getloadavg()[0]:.1f}, operands {'cold (from DRAM)' if a.cold else 'in cache'}")
    head = (f"{'in x out':>10} {'tokens':>6} {'share':>5} {'int8 ms':>9} {'f32 slice ms':>12} {'f32 full ms':>11} "
            f"{'speed vs slice':>14} {'speed vs full':>13}")
    print(head)
    print("-" * len(head))
    rng = np.random.default_rng(0)
    for shape in a.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        wT = np.ascontiguousarray(w.T)
        # cold: enough copies that the smallest operand (the int8 weight, n k bytes; each float32
        # slice of >= 25% of the columns is as large) passes 2 x L3 between two uses of one copy
        copies = -(-2 * l3_bytes() // (n * k)) + 1 if a.cold else 1
        layers = rotating([llmint8.Int8Linear.from_float(w, threshold=6.0) for _ in range(copies)])
        full = rotating([wT.copy() for _ in range(copies)])
        for m in (int(t) for t in a.tokens.split(",")):
            for share in (float(s) for s in a.shares.split(",")):
                x = rng.standard_normal((m, k)).astype(np.float32)
                cols = np.sort(rng.permutation(k)[: int(round(share * k))])
                x[0, cols] = np.where(x[0, cols] < 0, -1.0, 1.0) * rng.uniform(6.0, 30.0, cols.size)
                xs = np.ascontiguousarray(x[:, cols])
                slices = rotating([np.ascontiguousarray(wT[cols]) for _ in range(copies)])
                t8, ts, tf = [], [], []
                for _ in range(a.rounds):
                    t8.append(best_of(lambda: layers()(x), a.reps, clock))
                    ts.append(best_of(lambda: xs @ slices(), a.reps, clock))
                    tf.append(best_of(lambda: x @ full(), a.reps, clock))
                t8, ts, tf = (statistics.median(t) * 1e3 for t in (t8, ts, tf))
                print(f"{shape:>10} {m:>6} {share:>5.2f} {t8:>9.3f} {ts:>12.3f} {tf:>11.3f} {ts / t8:>14.2f} "
                      f"{tf / t8:>13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
