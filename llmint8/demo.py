"""`python -m llmint8 demo`: backends, then accuracy, memory and speed of each method
on one paper-like layer (normal activations, 0.1% outlier feature columns x20-30)."""
from __future__ import annotations

import time

import numpy as np

from . import _C
from ._cli import ArgumentParser, UsageError, run_command
from .backends import backends, build_info, get_num_threads
from .linear import Int8Linear
from .quant import METHODS, find_outlier_columns, matmul, relative_error


def _median_ms(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def weight_nbytes(method, n, k, n_outliers=0):
    """Bytes a method holds for an (n, k) weight (int8 methods: values + scales)."""
    return {
        "fp32": 4 * n * k,
        "fp16": 2 * n * k,
        "absmax": n * k + 4,
        "zeropoint": n * k + 8,
        "rowwise": n * k + 4,
        "vectorwise": n * k + 4 * n,
        "llm.int8": n * k + 4 * n + 2 * n * n_outliers + 4 * n_outliers,
    }[method]


def run(size=4096, tokens=(1, 32, 512), repeat=5, seed=0):
    """Print the demo tables; returns a dict of the numbers."""
    from .synthetic import paper_like

    info = build_info()
    print(f"llmint8 backends: {', '.join(backends())}   (CPU threads: {get_num_threads()}, "
          f"CPU kernel: {info.get('cpu_kernel', '?')})")
    print(f"Layer {size}x{size}, paper-like activations (0.1% outlier columns x20-30), threshold 6.0\n")
    results = {}
    mmax = max(tokens)
    x_all, w16, _ = paper_like(mmax, size, size, dtype=np.float16, seed=seed)
    w32 = w16.astype(np.float32)
    calib = find_outlier_columns(x_all[: min(mmax, 64)], 6.0)
    layer = Int8Linear.from_float(w16, threshold=6.0, outlier_columns=calib, device="cpu")

    hdr = f"{'tokens':>6}  " + "  ".join(f"{m:>10}" for m in METHODS)
    print("Relative error vs float64 (mean |y - ref| / mean |ref|) of float16 outputs")
    print(hdr)
    for m in tokens:
        x = x_all[:m]
        ref = x.astype(np.float64) @ w16.astype(np.float64).T
        # every method's output as an fp16 layer returns it (Int8Linear gives float16 for
        # float16 x): matmul's float32 result would credit fp16 with float32's precision
        errs = {meth: relative_error(matmul(x, w16, meth).astype(np.float16), ref) for meth in METHODS}
        results.setdefault("error", {})[m] = errs
        print(f"{m:>6}  " + "  ".join(f"{errs[meth]:>10.2e}" for meth in METHODS))

    print("\nWeight memory")
    for meth in ("fp32",) + METHODS:
        nb = layer.nbytes if meth == "llm.int8" else weight_nbytes(meth, size, size)
        print(f"  {meth:>10}: {nb / 2**20:8.2f} MiB  ({nb / weight_nbytes('fp16', size, size):.3f}x fp16)")
    results["nbytes_llm_int8"] = layer.nbytes

    print(f"\nCPU time per forward, median of {repeat} (ms)")
    print(f"{'tokens':>6}  {'numpy fp32':>10}  {'Int8Linear':>10}  {'ratio':>6}")
    for m in tokens:
        x16 = x_all[:m]
        x32 = x16.astype(np.float32)
        # BLAS and OpenMP worker threads spin for a while after a call and would steal the
        # other side's cores: each side gets its own block, with a pause in between
        t_np = _median_ms(lambda: x32 @ w32.T, repeat)
        time.sleep(0.5)
        t_l8 = _median_ms(lambda: layer(x16), repeat)
        time.sleep(0.5)
        results.setdefault("time_ms", {})[m] = {"numpy_fp32": t_np, "int8linear": t_l8}
        print(f"{m:>6}  {t_np:>10.2f}  {t_l8:>10.2f}  {t_l8 / t_np:>6.2f}")
    print("\n(Int8Linear: fp16 in/out, threshold 6.0, calibrated outlier columns; "
          "NumPy: float32 x @ w.T with NumPy's BLAS.)")
    return results


def main(argv=None):
    """Entry point of ``python -m llmint8 demo``; returns the exit code (2 for a bad argument)."""
    return run_command("python -m llmint8 demo", _demo_command, [] if argv is None else argv)


def _demo_command(argv):
    p = ArgumentParser(prog="python -m llmint8 demo", description=__doc__)
    p.add_argument("--size", type=int, default=4096, help="layer in = out features (default 4096)")
    p.add_argument("--tokens", default="1,32,512", help="comma-separated token counts (default 1,32,512)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per point (default 5)")
    a = p.parse_args(argv)
    try:
        tokens = tuple(int(t) for t in a.tokens.split(","))
        if a.size < 1 or a.repeat < 1 or min(tokens) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--size, --repeat and --tokens need positive integers, got --size {a.size} "
                         f"--repeat {a.repeat} --tokens {a.tokens!r}") from None
    run(a.size, tokens, a.repeat)
    return 0


_ = _C  # the extension must import for the demo to mean anything
