"""CPU benchmark: Int8Linear forward vs NumPy float32 matmul vs the portable C path.

What is timed (all in one run, same process, same threads):
  int8       llmint8.Int8Linear forward, threshold 6, fp16 in and out, with the CPU
             kernel this machine selects (llmint8._C.build_info()["cpu_kernel"]); includes
             the outlier scan, quantization of x, int8 GEMM, dequantize, fp16 outliers.
  portable   the same layer built with the portable C kernel (plain C, no intrinsics).
  numpy f32  x @ w.T with float32 x and w (OpenBLAS from the NumPy wheel): the baseline.
  ort        ONNX Runtime's int8 paths on float32 x, with the same threads: the
             com.microsoft DynamicQuantizeMatMul op (x quantized per tensor to uint8,
             int8 weight with per-column scales) and DynamicQuantizeLinear + MatMulInteger
             + rescale; the faster of the two is the ort column. Needs onnxruntime and onnx
             (pip install 'llmint8[bench]'); without them the column is skipped.
x has 0.1% outlier columns (|x| >= 6 in 4 of 4096 columns), the rest N(0, 1).

Weights are rotated over enough copies that more than twice the L3 cache is touched
between two uses of one copy: every call streams its weight from DRAM, as in a model
far larger than the cache. Each case runs in its own block (warm-up, then repeats,
median), so OpenMP and OpenBLAS worker threads never compete for the cores.

Peak: the int8 peak is cores x GHz x (int8 multiply-adds per cycle per core) x 2 ops,
with the instruction set's multiply throughput on this core (Zen 3: two 256-bit integer
multiply pipes, so two vpmaddwd = 32 int8 multiply-adds per cycle on the avx2 path; the
vnni paths count one vpdpbusd per cycle: 32 (ymm) or 64 (zmm)). The float32 peak is
cores x GHz x 2 FMA x 8 lanes x 2 flops.

Run:  python benchmarks/bench_cpu.py [--quick] [--threads N] [--markdown benchmarks/RESULTS_cpu.md]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

import llmint8
from benchutil import l3_bytes, rotating
from llmint8 import _C

L3_BYTES = l3_bytes()
INT8_MACS_PER_CYCLE = {"portable": None, "avx2": 32, "avxvnni": 32, "avx512vnni": 64}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name"))
        mhz = float(next(l.split(":", 1)[1] for l in info.splitlines() if l.startswith("cpu MHz")))
        flags = next(l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags"))
        fam = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("cpu family"))
        model = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model\t"))
        return f"{name} (family {fam}, model {model})", mhz / 1000.0, flags
    except (OSError, StopIteration):
        return platform.processor() or "unknown", 0.0, []


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def timeit(fn, min_reps, min_time):
    fn()  # warm-up (first touch, thread pool start)
    ts = []
    t_end = time.perf_counter() + min_time
    while len(ts) < min_reps or time.perf_counter() < t_end:
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
        if len(ts) >= 200:
            break
    return statistics.median(ts), min(ts), len(ts)


def make_layer(kernel, w):
    _C.set_cpu_kernel(kernel)
    try:
        if hasattr(llmint8, "Int8Linear"):
            return llmint8.Int8Linear.from_float(w, threshold=6.0, device="cpu")
        wq, ws, wo = _C.quantize_weight(w)
        return _C.Int8Linear(wq, ws, threshold=6.0)
    finally:
        _C.set_cpu_kernel(None)


def ort_sessions(w32, threads):
    """ONNX Runtime sessions for y = x @ w.T on int8 weights, or None (with a note) when
    onnxruntime / onnx are missing: {"dqmm": session, "mmint": session}."""
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        return None, f"ONNX Runtime column skipped: {e.name} is not installed (pip install 'llmint8[bench]')"
    n, k = w32.shape
    scale = (np.abs(w32).max(axis=1) / 127.0).astype(np.float32)  # per output column of B = w.T
    scale[scale == 0] = 1.0
    wq = np.clip(np.rint(w32 / scale[:, None]), -127, 127).astype(np.int8)
    B = numpy_helper.from_array(np.ascontiguousarray(wq.T), "B")
    S = numpy_helper.from_array(scale, "S")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])
    graphs = {
        "dqmm": helper.make_graph(
            [helper.make_node("DynamicQuantizeMatMul", ["x", "B", "S"], ["y"], domain="com.microsoft")],
            "dqmm", [x], [y], [B, S]),
        "mmint": helper.make_graph(
            [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "B", "xz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "S"], ["sc"]),
             helper.make_node("Mul", ["accf", "sc"], ["y"])],
            "mmint", [x], [y], [B, S]),
    }
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    out = {}
    for name, g in graphs.items():
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        out[name] = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return out, f"onnxruntime {ort.__version__} (onnx {onnx.__version__}), {threads} intra-op thread(s)"


def copy_bandwidth():
    src = np.ones(256 << 20, np.uint8)
    dst = np.empty_like(src)
    _, t, _ = timeit(lambda: np.copyto(dst, src), 3, 0.5)
    return 2 * src.nbytes / t / 1e9  # read + write


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,4096x14336", help="in x out, comma separated")
    ap.add_argument("--tokens", default="1,8,32,128,512")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per case (at least --min-reps runs)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--ghz", type=float, default=0.0, help="clock for the peak (default: /proc/cpuinfo cpu MHz)")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, tokens 1 and 32")
    ap.add_argument("--skip-portable-above", type=int, default=10**9, help="skip the portable path above this many tokens")
    ap.add_argument("--markdown", help="also write the results as Markdown to this file")
    ap.add_argument("--threads", type=int, default=0, help="llmint8 and ONNX Runtime threads (default: llmint8's)")
    ap.add_argument("--no-portable", action="store_true", help="skip the portable C path")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock (default) or the process's CPU time: with one thread everywhere "
                         "(--threads 1, OPENBLAS_NUM_THREADS=1) it counts the work done, not the time other "
                         "processes held the core")
    args = ap.parse_args()
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    if args.threads > 0:
        _C.set_num_threads(args.threads)
    if args.no_portable:
        args.skip_portable_above = 0
    if args.quick:
        args.shapes, args.tokens = "4096x4096", "1,32"

    model, ghz_info, flags = cpu_model()
    ghz = args.ghz or ghz_info
    cores = os.cpu_count() or 1
    used = min(cores, _C.get_num_threads())  # the peak counts the cores the layer may use
    kernel = _C.build_info()["cpu_kernel"]
    macs = INT8_MACS_PER_CYCLE.get(kernel)
    peak_int8 = used * ghz * macs * 2 if macs else float("nan")  # GOPS
    peak_f32 = used * ghz * 2 * 8 * 2
    try:
        rev = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        rev = "uncommitted"
    simd_flags = [f for f in ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni") if f in flags]
    bw = copy_bandwidth()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    head = [
        f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, revision: {rev}",
        f"CPU: {model}, {cores} cores, {ghz:.2f} GHz (peak computed at this clock), flags: {' '.join(simd_flags)}",
        f"kernel: {kernel} (supported: {', '.join(_C.cpu_kernels())}), threads: {_C.get_num_threads()}, "
        f"clock: {args.clock}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '-')}, "
        f"numpy {np.__version__}, python {platform.python_version()}",
        f"peaks on {used} core(s): int8 {peak_int8:.0f} GOPS ({kernel}: {macs} MAC/cycle/core), "
        f"float32 {peak_f32:.0f} GFLOPS; "
        f"memory copy bandwidth {bw:.1f} GB/s (read + write); load average at start {load0:.2f} "
        f"(other processes on the machine compete for its {cores} cores)",
    ]
    print("\n".join(head))

    rows = []
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        w16 = (rng.standard_normal((n, k)) * 0.05).astype(np.float16)
        w32 = w16.astype(np.float32)
        copies_f32 = max(1, -(-2 * L3_BYTES // w32.nbytes))
        copies_i8 = max(1, -(-2 * L3_BYTES // (n * k)))
        w32s = [w32] + [w32.copy() for _ in range(copies_f32 - 1)]
        layers = {kern: [make_layer(kern, w16) for _ in range(copies_i8)] for kern in ("portable", kernel)}
        orts, ort_note = [], None
        for _ in range(copies_i8):
            sess, ort_note = ort_sessions(w32, _C.get_num_threads())
            if sess is None:
                break
            orts.append(sess)
        print(f"{k}x{n}: {ort_note}")
        ocols = rng.choice(k, max(1, k // 1000), replace=False)
        for m in (int(t) for t in args.tokens.split(",")):
            x16 = rng.standard_normal((m, k)).astype(np.float16)
            x16[:, ocols] *= 8.0
            x16[0, ocols] = 7.0  # every outlier column reaches the threshold
            x32 = x16.astype(np.float32)
            nw = rotating(w32s)
            t_np, b_np, r_np = timeit(lambda: x32 @ nw().T, args.min_reps, args.min_time)
            time.sleep(0.05)
            nl = rotating(layers[kernel])
            t_i8, b_i8, r_i8 = timeit(lambda: nl().forward(x16), args.min_reps, args.min_time)
            time.sleep(0.05)
            if m <= args.skip_portable_above:
                npl = rotating(layers["portable"])
                t_pt, _, _ = timeit(lambda: npl().forward(x16), 3 if m >= 128 else args.min_reps, args.min_time)
            else:
                t_pt = float("nan")
            t_ort, b_ort, err_ort, ort_path = float("nan"), float("nan"), float("nan"), "-"
            for path in ("dqmm", "mmint") if orts else ():
                no = rotating([o[path] for o in orts])
                t, b, _ = timeit(lambda: no().run(None, {"x": x32}), args.min_reps, args.min_time)
                time.sleep(0.05)
                if not t_ort <= t:
                    yo = orts[0][path].run(None, {"x": x32})[0].astype(np.float64)
                    ref = x32.astype(np.float64) @ w32.T.astype(np.float64)
                    t_ort, b_ort, ort_path = t, b, path
                    err_ort = float(np.abs(yo - ref).mean() / np.abs(ref).mean())
            y = layers[kernel][0].forward(x16)
            err = float(np.abs(y.astype(np.float64) - x32.astype(np.float64) @ w32.T.astype(np.float64)).mean()
                        / np.abs(x32.astype(np.float64) @ w32.T.astype(np.float64)).mean())
            gops = 2 * m * n * k / t_i8 / 1e9
            target = 0.35 if m == 1 else 0.5 if m >= 32 else None
            row = dict(shape=f"{k}x{n}", m=m, t_np=t_np * 1e3, t_pt=t_pt * 1e3, t_i8=t_i8 * 1e3,
                       ratio=t_i8 / t_np, ratio_pt=t_pt / t_np, gops=gops, b_np=b_np * 1e3, b_i8=b_i8 * 1e3,
                       ratio_best=b_i8 / b_np, pct=100 * gops / peak_int8,
                       gbs=n * k / t_i8 / 1e9, target=target, reps=min(r_np, r_i8), err=err,
                       t_ort=t_ort * 1e3, b_ort=b_ort * 1e3, ratio_ort=t_i8 / t_ort, ratio_ort_best=b_i8 / b_ort,
                       err_ort=err_ort, ort_path=ort_path)
            rows.append(row)
            ok = "" if target is None else ("  ok" if row["ratio"] <= target else f"  MISS (target {target})")
            print(f"{row['shape']:>10} m={m:<4} numpy {row['t_np']:8.2f} ms  portable {row['t_pt']:9.2f} ms  "
                  f"int8 {row['t_i8']:8.2f} ms  int8/numpy {row['ratio']:.3f}{ok}  portable/numpy "
                  f"{row['ratio_pt']:.2f}  {gops:6.1f} GOPS ({row['pct']:.0f}% of peak)  weight {row['gbs']:.1f} GB/s  "
                  f"fastest runs: numpy {b_np * 1e3:.2f} int8 {b_i8 * 1e3:.2f} ms ratio {row['ratio_best']:.3f}  "
                  f"rel.err {err:.4f}  ort {row['t_ort']:8.2f} ms ({ort_path}) int8/ort {row['ratio_ort']:.3f} "
                  f"(fastest runs {row['ratio_ort_best']:.3f}) ort rel.err {err_ort:.4f}", flush=True)
        del layers, w32s, orts

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at end {load1:.2f}")
    if args.markdown:
        lines = ["# CPU benchmark: Int8Linear vs NumPy float32", ""]
        lines += [f"- {h}" for h in head] + [f"- load average at end {load1:.2f}"]
        lines += [
            "- command: `python benchmarks/bench_cpu.py " + " ".join(sys.argv[1:]) + "`",
            "",
            "Times are medians; the last three columns use the fastest run of each (the least disturbed "
            "by other processes).",
            "",
            "| in x out | tokens | numpy f32 ms | portable ms | int8 ms | int8 / numpy | target | portable / numpy "
            "| int8 GOPS | % of int8 peak | weight GB/s | rel. error | fastest numpy ms | fastest int8 ms | ratio "
            "| ORT ms (path) | int8 / ORT | fastest int8 / ORT | ORT rel. error |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            tgt = "" if r["target"] is None else (f"<= {r['target']} " + ("met" if r["ratio"] <= r["target"] else "**missed**"))
            lines.append(f"| {r['shape']} | {r['m']} | {r['t_np']:.2f} | {r['t_pt']:.2f} | {r['t_i8']:.2f} | "
                         f"{r['ratio']:.3f} | {tgt} | {r['ratio_pt']:.2f} | {r['gops']:.1f} | {r['pct']:.0f} | "
                         f"{r['gbs']:.1f} | {r['err']:.4f} | {r['b_np']:.2f} | {r['b_i8']:.2f} | {r['ratio_best']:.3f} | "
                         f"{r['t_ort']:.2f} ({r['ort_path']}) | {r['ratio_ort']:.3f} | {r['ratio_ort_best']:.3f} | "
                         f"{r['err_ort']:.4f} |")
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
