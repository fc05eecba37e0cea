"""A short, deterministic pass over every CUDA code path of llmint8, for compute-sanitizer.

Each case builds a CUDA layer and a CPU layer from the same weights, runs both, and
compares: the CUDA backend replays the CPU arithmetic, so outputs must be identical
(bit for bit). Covers the GEMV path (m <= 8), the cuBLASLt path, dynamic and known
outliers, fp16/fp32 in and out, the fp16 baseline, a weight beyond fp16's range (the
float16 forward must raise as the CPU does), and, when --graph is given, capture of a
forward into a CUDA graph and its replay. --fused forces the fused paths (the one-launch
decoding forward for m <= 16, the two-launch prefill quantizer above) and adds m = 16.

Run: python benchmarks/gpu_smoke.py [--graph] [--fused]    exit status 0 when every case matched.
"""
import argparse
import sys

import numpy as np

import llmint8
from llmint8 import cuda as lcuda

_cuda = lcuda._module()


def cases(fused=False):
    for m in (1, 5, 8, 9, 16, 64, 300) if fused else (1, 5, 8, 9, 64, 300):
        for threshold in (0.0, 6.0):
            for known in ((), (3, 17, 40)):
                yield m, threshold, known


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--graph", action="store_true", help="also capture a forward into a CUDA graph")
    ap.add_argument("--no-fp16-baseline", action="store_true",
                    help="leave out the fp16 cuBLASLt baseline (for initcheck: on an H200 it reported that "
                         "kernel's output as never written although its values checked out in the same run)")
    ap.add_argument("--fused", action="store_true", help="force the fused paths (_cuda._set_fused('all'))")
    args = ap.parse_args(argv)
    if not llmint8.cuda_available():
        print(f"gpu_smoke: no usable GPU ({lcuda.unavailable_reason()})")
        return 2
    if args.fused:
        _cuda._set_fused("all")
    rng = np.random.default_rng(0)
    bad = 0
    n, k = 200, 320
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(n) * 0.1).astype(np.float32)
    for m, threshold, known in cases(args.fused):
        cpu = llmint8.Int8Linear.from_float(w, bias=b, threshold=threshold, outlier_columns=list(known), device="cpu")
        dev = llmint8.Int8Linear.from_float(w, bias=b, threshold=threshold, outlier_columns=list(known), device="cuda")
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, rng.choice(k, 3, replace=False)] *= 20.0
        for xdt in (np.float32, np.float16):
            for ydt in (np.float32, np.float16):
                xc = x.astype(xdt)
                y_cpu = cpu.forward(xc, out_dtype=ydt)
                y_dev = dev.forward(lcuda.to_device(xc), out_dtype=ydt).numpy()
                same = np.array_equal(y_cpu, y_dev)
                if not same:
                    bad += 1
                    d = np.abs(y_cpu.astype(np.float64) - y_dev.astype(np.float64))
                    print(f"MISMATCH m={m} t={threshold} known={known} x={np.dtype(xdt).name} "
                          f"y={np.dtype(ydt).name}: {int((d > 0).sum())} elements differ, max {d.max():.3g}")
    bad += overflow_case(rng)
    # exact int8 GEMM on both paths
    for m, nn, kk in ((1, 7, 5), (8, 300, 100), (33, 20, 48), (257, 130, 1000)):
        a = rng.integers(-127, 128, size=(m, kk), dtype=np.int8)
        bb = rng.integers(-127, 128, size=(nn, kk), dtype=np.int8)
        for path in (("gemv", "cublaslt") if m <= 8 else ("cublaslt",)):
            c = _cuda._int8_matmul_cuda(lcuda.to_device(a), lcuda.to_device(bb), path=path).numpy()
            if not np.array_equal(c, a.astype(np.int64) @ bb.astype(np.int64).T):
                bad += 1
                print(f"MISMATCH int8 gemm {path} m={m} n={nn} k={kk}")
    # the fp16 baseline against float64
    if not args.no_fp16_baseline:
        x16 = rng.standard_normal((16, k)).astype(np.float16)
        w16 = w.astype(np.float16)
        y = _cuda._fp16_linear(lcuda.to_device(x16), lcuda.to_device(w16)).numpy().astype(np.float64)
        ref = x16.astype(np.float64) @ w16.astype(np.float64).T
        e = np.abs(y - ref).max() / np.abs(ref).max()
        if not e < 2e-3:
            bad += 1
            print(f"MISMATCH fp16 baseline: rel err {e:.3g}")
    if args.graph:
        bad += graph_case(w, b, rng)
    print(f"gpu_smoke: {'OK' if not bad else f'{bad} FAILED'}")
    return 1 if bad else 0


def overflow_case(rng):
    """float16 x finding a column whose dequantized weight is beyond fp16: ValueError on both."""
    w = rng.standard_normal((24, 40)).astype(np.float32)
    w[2] *= 1e4
    w[2, 4] = 1.5e5
    cpu = llmint8.Int8Linear.from_float(w, threshold=6.0, device="cpu")
    dev = llmint8.Int8Linear.from_float(w, threshold=6.0, device="cuda")
    bad = 0
    for m in (3, 40):
        x = rng.standard_normal((m, 40)).astype(np.float16)
        x[:, 4] = 20.0
        msgs = []
        for layer, xin in ((cpu, x), (dev, lcuda.to_device(x))):
            try:
                layer.forward(xin)
                msgs.append(None)
            except ValueError as e:
                msgs.append(str(e))
        if msgs[0] is None or msgs[0] != msgs[1]:
            bad += 1
            print(f"MISMATCH fp16 overflow m={m}: cpu {msgs[0]!r}, cuda {msgs[1]!r}")
    return bad


def graph_case(w, b, rng):
    """Capture one forward into a CUDA graph on an explicit stream; replay it on new input."""
    k = w.shape[1]
    dev = llmint8.Int8Linear.from_float(w, bias=b, threshold=6.0, outlier_columns=[3], device="cuda")
    cpu = llmint8.Int8Linear.from_float(w, bias=b, threshold=6.0, outlier_columns=[3], device="cpu")
    bad = 0
    s = _cuda._stream_create()
    try:
        lcuda.set_stream(s)
        for m in (4, 64):
            x1 = rng.standard_normal((m, k)).astype(np.float16)
            xd = lcuda.to_device(x1)
            dev.forward(xd, out_dtype=np.float16)  # warm-up: algorithm choice and pool growth
            lcuda.synchronize()
            out = {}
            graph = _cuda._graph_capture(lambda: out.__setitem__("y", dev.forward(xd, out_dtype=np.float16)))
            x2 = rng.standard_normal((m, k)).astype(np.float16)
            x2[:, 5] = 30  # a dynamic outlier column the capture never saw
            _cuda._copy_into(xd, x2)
            graph.replay()
            lcuda.synchronize()
            ok = np.array_equal(out["y"].numpy(), cpu.forward(x2, out_dtype=np.float16))
            print(f"graph: m={m}, {graph.nodes} nodes, capture and replay {'matched' if ok else 'MISMATCH'}")
            bad += not ok
            del graph, out, xd
            lcuda.synchronize()
    finally:
        lcuda.set_stream(0)
        _cuda._stream_destroy(s)
    return bad


if __name__ == "__main__":
    sys.exit(main())
