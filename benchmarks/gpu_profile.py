"""One Int8Linear forward per call, for a kernel-level profile of the outlier path.

Run under Nsight Compute to see where a forward's GPU time goes, kernel by kernel:

    ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \\
        python benchmarks/gpu_profile.py --shape 4096x4096 --tokens 128

It builds one layer (fp16 in and out, bench_linear.py's inputs: 0.1% of the columns are
outliers of magnitude 20-100), runs --warmup forwards at each threshold, synchronizes, then
--iters forwards with threshold 6 and --iters with threshold 0, so the summary's counts say
which kernels belong to which (the warm-up calls are in the counts too).
"""
import argparse

import numpy as np

import llmint8
from llmint8 import _C
from llmint8 import cuda as lcuda

import bench_linear


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="4096x4096", help="in x out")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args(argv)
    k, n = (int(v) for v in args.shape.lower().split("x"))
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float16)
    wq, ws, wo = _C.quantize_weight(w)
    layers = {t: llmint8.Int8Linear(wq, ws, [], wo, None, t, "cuda") for t in (6.0, 0.0)}
    xd = lcuda.to_device(bench_linear.activations(rng, args.tokens, k))
    for t, layer in layers.items():
        for _ in range(args.warmup):
            layer.forward(xd, out_dtype=np.float16)
    lcuda.synchronize()
    for t, layer in layers.items():
        for _ in range(args.iters):
            layer.forward(xd, out_dtype=np.float16)
        lcuda.synchronize()
    print(f"gpu_profile: {k}x{n}, {args.tokens} tokens, {args.warmup} + {args.iters} forwards at t=6 then t=0")


if __name__ == "__main__":
    main()
