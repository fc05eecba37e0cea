"""Replay, in NumPy, the one-launch decoding kernel of the CUDA backend (csrc/cuda/fused_cuda.cu)
and compare it with the CPU backend bit for bit. Needs no GPU.

What is replayed is the kernel's own arithmetic and bookkeeping, in its order:
  - phase 1: outlier flags per column (known, or some |x| >= threshold), gathered as bits
    of 32-column words; row maxima over the other columns as float bits (NaN above Inf);
  - phase 2: inv = 127 / s in fp32, int8 x (0 in outlier columns and for s == 0; the
    fp32 product rounded half to even; the double division where 127 / s overflows); the
    outlier list built by warp 0's scan over the bitmap words, FD_LIST entries at most,
    the rest found again by the epilogue's walk over the bitmap;
  - phase 3: the grid (blocks = min(tiles, SMs x blocks per SM)), tiles of 8 warps x R
    rows, each lane summing the 16-byte chunks c = lane, lane + 32, ...; the lane
    i * R + r owning y[i, j0 + r]; every output written exactly once;
  - the epilogue: osum in the list's order, each product and sum rounded to fp32; then
    acc * ((s * (1 / 127^2)) * sw[j]) + osum + bias[j], rounded to fp32 at each step.
NumPy's float32 ufuncs round every operation (no fused multiply-add), as __fmul_rn /
__fadd_rn do on the GPU and the C epilogue does on the CPU.

Also replayed: the fused prefill quantizer's flag pass (its grid's coverage of x, the flags)
and the last block's compaction into the outlier list; its second launch quantizes each row
with quantize_row's exact mode, the rule of quantize.c.

Run:  python benchmarks/replay_fused.py [--cases 300] [--seed 0]
tests/test_fused_replay.py runs a few dozen cases of it with the test suite.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import llmint8

F32 = np.float32
PAD = 16
WARPS = 8
MAX_M = 16


def rows_per_warp(mt):
    return 4 if mt <= 8 else 2


def instantiation(m):
    """The MT template argument the launcher picks for m rows."""
    for mt in (1, 2, 4, 8, 16):
        if m <= mt:
            return mt
    raise ValueError(f"m = {m} is more than the kernel's {MAX_M} rows")


def pad(v):
    return (v + PAD - 1) // PAD * PAD


def fbits(a):
    return np.asarray(a, F32).view(np.uint32)


def quantize_rows(x32, flags, k):
    """Phases 1-2: exact row scales (bits max over non-outlier columns) and int8 x."""
    m = x32.shape[0]
    bits = fbits(np.abs(x32))
    scales = np.zeros(m, F32)
    xs = np.zeros((m, k), np.int8)
    for i in range(m):
        b = bits[i][~flags]
        scales[i] = np.uint32(b.max() if b.size else 0).view(F32)
        s = scales[i]
        with np.errstate(over="ignore"):
            inv = F32(127.0) / s if s > 0 else F32(0.0)  # fp32 division, rounded once (inf: subnormal s)
        if s == 0 or np.isnan(s):
            q = np.rint(x32[i] * inv) if np.isnan(s) else np.zeros(k)
            q = np.nan_to_num(q, nan=0.0)
        elif np.isinf(inv):  # subnormal s: the double division
            q = np.rint(x32[i].astype(np.float64) * 127.0 / np.float64(s))
        else:
            q = np.rint((x32[i] * inv).astype(F32))  # the fp32 product, then half-to-even
        q = np.clip(q, -127, 127).astype(np.int8)
        q[flags] = 0
        xs[i] = q
    return scales, xs


def outlier_list(flags, k, fd_list):
    """Warp 0's scan: words of 32 columns, 32 words per step, entries in ascending order."""
    nw = (k + 31) // 32
    words = np.zeros(nw, np.uint64)
    for j in np.nonzero(flags)[0]:
        words[j // 32] |= np.uint64(1) << np.uint64(j % 32)
    lst, base = [], 0
    for w0 in range(0, nw, 32):
        lane_words = [int(words[w0 + ln]) if w0 + ln < nw else 0 for ln in range(32)]
        cnt = [bin(v).count("1") for v in lane_words]
        incl = np.cumsum(cnt)
        for ln in range(32):
            at = base + int(incl[ln]) - cnt[ln]
            bits = lane_words[ln]
            while bits:
                b = (bits & -bits).bit_length() - 1
                bits &= bits - 1
                if at < fd_list:
                    while len(lst) <= at:
                        lst.append(None)
                    lst[at] = (w0 + ln) * 32 + b
                at += 1
        base += int(incl[31])
    total = base
    order = [c for c in lst[: min(total, fd_list)]]
    if total > fd_list:  # the epilogue's walk over the bitmap after the last listed column
        frm = order[-1] + 1
        for w in range(frm // 32, nw):
            bits = int(words[w])
            if w == frm // 32:
                bits &= (0xFFFFFFFF << (frm % 32)) & 0xFFFFFFFF
            while bits:
                b = (bits & -bits).bit_length() - 1
                bits &= bits - 1
                order.append(w * 32 + b)
    return order, total


def replay(x, wq, wscale, wout, known, bias, threshold, out_dtype, sms=132, per_sm=2, fd_list=1024):
    """y = the fused decoding kernel's output for x (m, k), the layer in the CPU's canonical
    layout (wq (n, k) int8, wscale (n,), wout (n, n_known) fp16, known sorted columns)."""
    m, k = x.shape
    n = wq.shape[0]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"the decoding kernel takes 1 to {MAX_M} rows, got {m}")
    x_f16 = x.dtype == np.float16
    x32 = x.astype(F32)
    kflag = np.zeros(k, bool)
    kflag[list(known)] = True
    known_pos = {c: p for p, c in enumerate(known)}
    flags = kflag.copy()
    if threshold > 0:
        flags |= (np.abs(x32) >= F32(threshold)).any(axis=0)
    scales, xs = quantize_rows(x32, flags, k)
    order, total = outlier_list(flags, k, fd_list)
    assert order == list(np.nonzero(flags)[0]) and total == int(flags.sum())

    kp, np_ = pad(k), pad(n)
    W = np.zeros((np_, kp), np.int8)
    W[:n, :k] = wq
    X = np.zeros((m, kp), np.int8)
    X[:, :k] = xs
    mt = instantiation(m)
    R = rows_per_warp(mt)
    assert mt * R <= 32
    tile = WARPS * R
    ntiles = (np_ + tile - 1) // tile
    grid = max(1, min(ntiles, sms * per_sm))
    nk = kp // 16
    y = np.full((m, n), np.nan, F32)
    written = np.zeros((m, n), np.int64)
    inv127 = F32(1.0) / (F32(127.0) * F32(127.0))
    Wc = W.astype(np.int64).reshape(np_, nk, 16)
    Xc = X.astype(np.int64).reshape(m, nk, 16)
    for b in range(grid):
        for t in range(b, ntiles, grid):
            for warp in range(WARPS):
                j0 = t * tile + warp * R
                if j0 >= np_:
                    continue
                assert j0 + R <= np_, "a warp's rows are all inside the padded weight"
                acc = np.zeros((mt, R), np.int64)
                for lane in range(32):  # each lane's chunks, summed like __reduce_add_sync
                    cs = np.arange(lane, nk, 32)
                    for i in range(min(mt, m)):
                        for r in range(R):
                            acc[i, r] += int((Xc[i, cs] * Wc[j0 + r, cs]).sum())
                assert np.abs(acc).max(initial=0) < 2**31, "int32 accumulator"
                for lane in range(32):
                    i, r = lane // R, lane % R
                    j = j0 + r
                    if i >= m or j >= n:
                        continue
                    ws127 = F32(wscale[j]) / F32(127.0)
                    osum = F32(0.0)
                    for col in order:
                        if kflag[col]:
                            wv = F32(np.float16(wout[j, known_pos[col]]))
                        else:
                            wv = F32(F32(int(wq[j, col])) * ws127)
                            if x_f16:
                                wv = F32(np.float16(wv))
                        osum = F32(osum + F32(x32[i, col] * wv))
                    sxi = F32(scales[i] * inv127)
                    v = F32(F32(acc[i, r]) * F32(sxi * F32(wscale[j])))
                    v = F32(v + osum)
                    if bias is not None:
                        v = F32(v + F32(bias[j]))
                    y[i, j] = v
                    written[i, j] += 1
    assert (written == 1).all(), "every output has exactly one owner"
    return y.astype(out_dtype)


def replay_prefill_flags(x, threshold, known, vec, pf_threads=256, pf_rows=64):
    """The fused prefill quantizer's flag pass (quantize_cuda.cu, prefill_flags_kernel) and
    its last block's compaction (compact_block with pf_threads threads): the outlier list
    (column, source) in the kernel's order. Known columns keep their position, dynamic ones
    get slots -(d + 1) in ascending order."""
    m, k = x.shape
    a = np.abs(x.astype(F32))
    kflag = np.zeros(k, bool)
    kflag[list(known)] = True
    dflag = np.zeros(k, bool)
    nv = k // vec
    gx = max(1, (nv + pf_threads - 1) // pf_threads) if threshold > 0 else 1
    gy = max(1, (m + pf_rows - 1) // pf_rows) if threshold > 0 else 1
    seen = np.zeros((m, k), np.int64)
    for by in range(gy):
        for bx in range(gx):
            for tid in range(pf_threads):
                c = bx * pf_threads + tid
                if not (threshold > 0 and c < nv):
                    continue
                r0, r1 = by * pf_rows, min(m, by * pf_rows + pf_rows)
                cols = slice(c * vec, c * vec + vec)
                seen[r0:r1, cols] += 1
                fl = (a[r0:r1, cols] >= F32(threshold)).any(axis=0)
                for t in range(vec):
                    j = c * vec + t
                    if fl[t] and not kflag[j]:
                        dflag[j] = True
    if threshold > 0:
        assert (seen == 1).all(), "the flag pass reads every element of x exactly once"
    # compact_block: thread runs of `per` columns, exclusive scans of (total, dynamic)
    per = (k + pf_threads - 1) // pf_threads
    counts = []
    for tid in range(pf_threads):
        j0, j1 = tid * per, min(k, tid * per + per)
        js = range(j0, j1) if j0 < k else range(0)
        counts.append((sum(kflag[j] or dflag[j] for j in js), sum((not kflag[j]) and dflag[j] for j in js)))
    ot = np.concatenate([[0], np.cumsum([c[0] for c in counts])])
    od = np.concatenate([[0], np.cumsum([c[1] for c in counts])])
    ocol = [None] * int(ot[-1])
    osrc = [None] * int(ot[-1])
    kpos = {c: p for p, c in enumerate(known)}
    for tid in range(pf_threads):
        t, d = int(ot[tid]), int(od[tid])
        j0, j1 = tid * per, min(k, tid * per + per)
        for j in range(j0, j1) if j0 < k else ():
            if kflag[j]:
                ocol[t], osrc[t] = j, kpos[j]
                t += 1
            elif dflag[j]:
                ocol[t], osrc[t] = j, -(d + 1)
                t += 1
                d += 1
    return ocol, osrc


def check_prefill_case(rng):
    """The prefill flag pass + compaction replayed against the CPU's outlier selection."""
    from llmint8 import _C
    m = int(rng.integers(17, 300))
    k = int(rng.choice([5, 13, 64, 100, 257, 1000]))
    x_dt = rng.choice([np.float16, np.float32])
    vec = (8 if x_dt == np.float16 else 4) if (k % (8 if x_dt == np.float16 else 4) == 0 and rng.random() < 0.7) else 1
    x = rng.standard_normal((m, k)).astype(np.float32)
    ncols = int(rng.integers(0, k + 1)) if rng.random() < 0.3 else int(rng.integers(0, 4))
    x[:, rng.choice(k, size=ncols, replace=False)] *= 20.0
    if rng.random() < 0.5:  # an outlier in one row only, in the last row chunk
        x[-1, int(rng.integers(k))] = 30.0
    x = x.astype(x_dt)
    known = sorted(rng.choice(k, size=int(rng.integers(0, min(k, 3) + 1)), replace=False).tolist())
    threshold = float(rng.choice([0.0, 6.0]))
    ocol, osrc = replay_prefill_flags(x, threshold, known, vec)
    cpu_flags = np.zeros(k, bool)
    cpu_flags[known] = True
    if threshold > 0:
        cpu_flags[np.asarray(_C.find_outlier_columns(x, threshold), np.int64)] = True
    assert ocol == list(np.nonzero(cpu_flags)[0]), "the list is the CPU's outlier columns, ascending"
    dyn = [c for c in ocol if c not in known]
    assert [s for c, s in zip(ocol, osrc) if c in known] == [known.index(c) for c in ocol if c in known]
    assert [-(s + 1) for c, s in zip(ocol, osrc) if c not in known] == list(range(len(dyn)))


def random_case(rng):
    m = int(rng.integers(1, MAX_M + 1))
    k = int(rng.choice([5, 13, 16, 33, 64, 100, 257]))
    n = int(rng.choice([1, 7, 17, 33, 65]))
    frac = rng.choice([0.0, 0.01, 0.5, 1.0])
    x_dt = rng.choice([np.float16, np.float32])
    y_dt = rng.choice([np.float16, np.float32])
    threshold = float(rng.choice([0.0, 6.0]))
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    nknown = int(rng.integers(0, min(k, 4) + 1)) if rng.random() < 0.5 else 0
    known = sorted(rng.choice(k, size=nknown, replace=False).tolist())
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32) if rng.random() < 0.5 else None
    x = rng.standard_normal((m, k)).astype(np.float32)
    ncols = int(round(frac * k))
    if frac > 0 and ncols == 0:
        ncols = 1
    cols = rng.choice(k, size=ncols, replace=False)
    x[:, cols] *= 20.0
    if rng.random() < 0.2:
        x[int(rng.integers(m))] = 0.0  # a zero row: scale 0
    if rng.random() < 0.1:
        x[0] *= np.float32(1e-39) if x_dt == np.float32 else 1.0  # a subnormal scale (fp32 only)
    return x.astype(x_dt), w, bias, threshold, known, y_dt


def check_case(rng, fd_list=1024):
    x, w, bias, threshold, known, y_dt = random_case(rng)
    layer = llmint8.Int8Linear.from_float(w, bias=bias, threshold=threshold, outlier_columns=known, device="cpu")
    want = layer.forward(x, out_dtype=y_dt)
    got = replay(x, layer.weight_int8, layer.weight_scale, layer.outlier_weight, known, layer.bias, threshold, y_dt,
                 sms=int(rng.choice([1, 3, 132])), per_sm=int(rng.choice([1, 2])), fd_list=fd_list)
    np.testing.assert_array_equal(got, want)
    return x.shape, w.shape


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for c in range(args.cases):
        check_case(rng, fd_list=int(rng.choice([1, 3, 1024])))
    print(f"replay_fused: {args.cases} random cases, the decoding kernel's replay equals the CPU backend bit for bit")
    for c in range(args.cases):
        check_prefill_case(rng)
    print(f"replay_fused: {args.cases} random cases, the prefill flag pass and its list equal the CPU's outlier "
          f"columns")


if __name__ == "__main__":
    sys.exit(main())
