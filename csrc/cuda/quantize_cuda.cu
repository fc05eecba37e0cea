/* quantize_cuda.cu: vector-wise quantization of the activations with outlier
 * decomposition, on the GPU. CPU reference: quantize.c (l8_quantize_rows) and the
 * outlier selection in linear_cpu.c; the results here are bit-identical to them.
 *
 * The problem: row i's scale is the absmax over the columns that are NOT outliers, and a
 * column is an outlier when ANY row has |x| >= threshold in it. So a row's scale depends
 * on every other row, which a one-pass kernel cannot see. What we do instead:
 *
 *   pass 1 (one block per row, x read from DRAM once): mark the columns where this row
 *     has |x| >= threshold; take the absmax over the remaining elements (known outlier
 *     columns excluded) together with the column where it occurs; quantize the row with
 *     that provisional scale. The provisional scale is an upper bound of the exact one and
 *     equals it unless its own column is an outlier found by another row.
 *   compact (one block): the outlier columns in ascending order (a block scan over the
 *     column flags) -- the order the CPU backend sums the fp16 products in, so the two
 *     backends agree bit for bit, and the result does not depend on block scheduling.
 *   pass 2 (one block per row, touching only the outlier columns): rows whose provisional
 *     scale came from an outlier column are re-quantized exactly (one more read of those
 *     rows only); all other rows just get their dynamic outlier columns zeroed, and the
 *     outlier activations are gathered into a compact fp16 matrix.
 *
 * Why not a column-absmax pre-pass: it reads all of x once more for every call, whereas
 * the fix-up above only re-reads the (usually few) rows that need it. Why not a grid-wide
 * barrier between the phases: it needs a cooperative launch sized to the GPU and still
 * re-reads x after the barrier, for no saving in traffic.
 *
 * Versions: the three launches above (any m), and small_m_kernel, which runs the same
 * three steps for m <= 8 rows (decoding) in one single-block launch with block barriers
 * between them.
 *
 * Nothing here synchronizes with the host: counts stay on the device, and the outlier
 * list has room for every column (k entries), so it cannot overflow. The compact fp16
 * copies used by the GEMM epilogue have a fixed capacity; entries past it are read
 * straight from x and the int8 weight instead (same values, slower; gemm_cuda.cu).
 *
 * Build: setup.py compiles every .cu file in csrc with nvcc (python setup.py build_ext --inplace).
 * Check: pytest tests/test_cuda.py (CUDA against the CPU backend). Time: benchmarks/bench_linear.py.
 */
#include <cuda_fp16.h>

#include "device_common.h"
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include <algorithm>

#include "quantize_cuda.h"

namespace {

constexpr int QBLOCK = 256;   /* threads per row block */
constexpr int CBLOCK = 1024;  /* threads of the compaction block */
/* Threads per row block of pass 2: most rows only zero a few columns and gather a few
 * values (a chain of dependent loads), so small blocks let 32 rows share an SM; the rows
 * that are re-quantized read their row with these threads (any block size gives the same
 * bits: the max is order-independent). */
constexpr int FBLOCK = 64;
static_assert(QBLOCK % 32 == 0 && CBLOCK % 32 == 0 && FBLOCK % 32 == 0 && CBLOCK / 32 <= 32 && FBLOCK <= QBLOCK,
              "block scans assume whole warps");
static_assert(CBLOCK / 32 >= L8_CUDA_SMALL_M, "small_m_kernel gives every row at least one warp");

/* q = round(127 x / s) to nearest even, clamped to [-127, 127]: quantize.c's quantize_one.
 * __fmul_rn keeps the compiler from fusing; the double path covers subnormal scales. */
__device__ __forceinline__ int8_t quant(float v, float s, float inv) {
    int q;
    if (isinf(inv))
        q = (int)rint((double)v * 127.0 / (double)s);
    else
        q = __float2int_rn(__fmul_rn(v, inv));
    return (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
}

/* The threads working on one row: the whole block, or (small_m_kernel) a group of
 * consecutive whole warps, warps [g0, g0 + gw) of the block. */
struct row_group {
    int tid;  /* thread index within the group */
    int nthr; /* threads in the group, gw * 32 */
    int g0, gw;
};

__device__ __forceinline__ row_group whole_block() {
    return row_group{(int)threadIdx.x, (int)blockDim.x, 0, (int)blockDim.x / 32};
}

/* Max over a row group of a packed (|x| bits << 32 | column) key. |x| >= 0, so its float
 * bits order like the values (and any NaN's bits above +Inf's); ties go to the larger
 * column, which is as good as any. Every thread of the BLOCK must call it at the same
 * point (it has block barriers); each group gets its own maximum. */
__device__ unsigned long long group_max(unsigned long long v, const row_group &g) {
    __shared__ unsigned long long red[32];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        unsigned long long o = __shfl_xor_sync(0xffffffffu, v, off);
        v = o > v ? o : v;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads(); /* red may still be read by a previous call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < g.gw ? red[g.g0 + lane] : 0ull;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        unsigned long long o = __shfl_xor_sync(0xffffffffu, v, off);
        v = o > v ? o : v;
    }
    return v;
}

/* Quantize one row with a row group (group_max's rule: every thread of the block calls
 * this once, at the same point). REQUANT = false: pass 1 (exclude known columns and this
 * row's elements >= threshold, marking those columns in dflag). REQUANT = true: exact
 * re-quantization with every flagged column excluded.
 * Non-finite x (not checked; cuda_common.h): a NaN is never excluded and its key is
 * above every other, so the row's scale is NaN, every q is 0 (the comparison s > 0 fails,
 * inv = 0, and NaN * 0 converts to 0) and the epilogue's 0 * NaN makes the whole output
 * row NaN. An Inf at or above the threshold is a dynamic outlier like any large value;
 * below it (threshold 0) it becomes the scale, inv = 127 / Inf = 0, every q is 0 and the
 * outputs 0 * Inf = NaN. */
template <typename T, int VEC, bool REQUANT>
__device__ void quantize_row(const T *__restrict__ xr, int64_t k, int64_t kp, float thr,
                             const uint8_t *__restrict__ kflag, unsigned *dflag, int8_t *__restrict__ qr,
                             float *sx_out, int *rcol_out, const row_group &g) {
    const bool dyn = thr > 0.0f;
    auto excluded = [&](int64_t j, float a) -> bool {
        if (kflag && kflag[j]) return true;
        if (REQUANT) return dyn && dflag[j] != 0u;
        return dyn && a >= thr;
    };
    unsigned long long best = 0ull;
    const int64_t nv = k / VEC;
    for (int64_t c = g.tid; c < nv; c += g.nthr) {
        float v[VEC];
        load_vec<T, VEC>(xr + c * VEC, v);
#pragma unroll
        for (int t = 0; t < VEC; t++) {
            const int64_t j = c * VEC + t;
            const float a = fabsf(v[t]);
            if (excluded(j, a)) {
                /* read before writing: most rows find the flag already set */
                if (!REQUANT && dyn && a >= thr && !(kflag && kflag[j]) && dflag[j] == 0u) dflag[j] = 1u;
                continue;
            }
            const unsigned long long key = ((unsigned long long)__float_as_uint(a) << 32) | (unsigned)j;
            best = key > best ? key : best;
        }
    }
    best = group_max(best, g);
    const float s = __uint_as_float((unsigned)(best >> 32));
    const float inv = s > 0.0f ? __fdiv_rn(127.0f, s) : 0.0f;
    if (g.tid == 0) {
        *sx_out = s;
        if (rcol_out) *rcol_out = s > 0.0f ? (int)(unsigned)(best & 0xffffffffull) : -1;
    }
    /* second read of the row: it was just loaded by this block, so it comes from L1/L2 */
    for (int64_t c = g.tid; c < nv; c += g.nthr) {
        float v[VEC];
        load_vec<T, VEC>(xr + c * VEC, v);
        int8_t q[VEC];
#pragma unroll
        for (int t = 0; t < VEC; t++) {
            const int64_t j = c * VEC + t;
            q[t] = (s == 0.0f || excluded(j, fabsf(v[t]))) ? (int8_t)0 : quant(v[t], s, inv);
        }
        if constexpr (VEC == 8)
            *reinterpret_cast<uint2 *>(qr + c * VEC) = *reinterpret_cast<const uint2 *>(q);
        else if constexpr (VEC == 4)
            *reinterpret_cast<uint32_t *>(qr + c * VEC) = *reinterpret_cast<const uint32_t *>(q);
        else
            qr[c] = q[0];
    }
    for (int64_t j = k + g.tid; j < kp; j += g.nthr) qr[j] = 0; /* padding */
}

/* One block per row i < m (= gridDim.x); block i also zeroes the padding rows m + i,
 * m + i + m, ... below mpad that the int8 GEMM reads. */
template <typename T, int VEC>
__global__ void __launch_bounds__(QBLOCK)
quantize_x_kernel(const T *__restrict__ x, int64_t k, int64_t kp, int64_t mpad, float thr,
                  const uint8_t *__restrict__ kflag, unsigned *dflag, int8_t *__restrict__ xq, float *__restrict__ sx,
                  int *__restrict__ rcol) {
    const int64_t i = blockIdx.x, m = gridDim.x;
    quantize_row<T, VEC, false>(x + i * k, k, kp, thr, kflag, dflag, xq + i * kp, sx + i, rcol + i, whole_block());
    for (int64_t r = m + i; r < mpad; r += m)
        for (int64_t j = threadIdx.x; j < kp; j += blockDim.x) xq[r * kp + j] = 0;
}

/* The outlier list in ascending column order. Each thread takes a contiguous run of
 * columns: it counts the run's flags (independent loads, in flight together), one
 * block-wide exclusive scan of the two counts (total, dynamic) with warp shuffles places
 * every run, and each thread writes its own. One scan for any k, where a scan per
 * blockDim columns paid a few global-load latencies and barriers each time (measured on
 * an H200: 11.8 us for k = 4096, ~35 us for k = 14336, one block). Any block size that is
 * a whole number of warps, up to 1024 threads. dflag is read through L2 (__ldcg): the
 * fused prefill's last block runs this on flags other blocks wrote, and its own L1 may
 * still hold lines it read before they did (a fence orders, it does not invalidate). */
__device__ void compact_block(const uint8_t *__restrict__ kflag, const int32_t *__restrict__ known_pos,
                              const unsigned *dflag, int64_t k, int *ocol, int *osrc, int *dcol, int *counts,
                              const uint8_t *__restrict__ ovf) {
    __shared__ int wtot[32], wdyn[32], ovmin;
    const int nthr = (int)blockDim.x, tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32, nw = nthr / 32;
    if (tid == 0) ovmin = INT_MAX; /* read after the barriers below */
    const int64_t per = (k + nthr - 1) / nthr;
    const int64_t j0 = (int64_t)tid * per, j1 = j0 + per < k ? j0 + per : k; /* empty when j0 >= k */
    int ct = 0, cd = 0;
#pragma unroll 4
    for (int64_t j = j0; j < j1; j++) {
        const unsigned kf = kflag ? kflag[j] : 0u, df = dflag ? __ldcg(dflag + j) : 0u;
        ct += (kf | df) != 0u;
        cd += kf == 0u && df != 0u;
    }
    /* inclusive scan within the warp, then over the warps' totals */
    int it = ct, id = cd;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int a = __shfl_up_sync(0xffffffffu, it, off), b = __shfl_up_sync(0xffffffffu, id, off);
        if (lane >= off) { it += a; id += b; }
    }
    if (lane == 31) { wtot[warp] = it; wdyn[warp] = id; }
    __syncthreads();
    if (warp == 0) {
        int vt = lane < nw ? wtot[lane] : 0, vd = lane < nw ? wdyn[lane] : 0;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int a = __shfl_up_sync(0xffffffffu, vt, off), b = __shfl_up_sync(0xffffffffu, vd, off);
            if (lane >= off) { vt += a; vd += b; }
        }
        __syncwarp();
        if (lane < nw) { wtot[lane] = vt; wdyn[lane] = vd; } /* through warp `lane`, inclusive */
    }
    __syncthreads();
    int ot = (warp > 0 ? wtot[warp - 1] : 0) + it - ct; /* this run's first entry and dynamic slot */
    int od = (warp > 0 ? wdyn[warp - 1] : 0) + id - cd;
    int myov = INT_MAX; /* this run's first dynamic column whose weight overflows fp16 */
    for (int64_t j = j0; j < j1; j++) {
        const unsigned kf = kflag ? kflag[j] : 0u, df = dflag ? __ldcg(dflag + j) : 0u;
        if (kf != 0u) {
            ocol[ot] = (int)j;
            osrc[ot++] = known_pos[j];
        } else if (df != 0u) {
            ocol[ot] = (int)j;
            osrc[ot++] = -(od + 1);
            dcol[od++] = (int)j;
            if (ovf && ovf[j] && myov == INT_MAX) myov = (int)j;
        }
    }
    if (ovf) { /* uniform: the barrier is reached by every thread or by none */
        if (myov != INT_MAX) atomicMin(&ovmin, myov);
        __syncthreads();
    }
    if (tid == 0) {
        counts[0] = wtot[nw - 1];
        counts[1] = wdyn[nw - 1];
        counts[2] = ovmin; /* INT_MAX when no overflowing column was found (or none is checked) */
    }
}

__global__ void __launch_bounds__(CBLOCK)
compact_kernel(const uint8_t *__restrict__ kflag, const int32_t *__restrict__ known_pos, const unsigned *dflag,
               int64_t k, int *ocol, int *osrc, int *dcol, int *counts, const uint8_t *__restrict__ ovf) {
    compact_block(kflag, known_pos, dflag, k, ocol, osrc, dcol, counts, ovf);
}

/* Pass 2 for row i with the whole block (see l8_outliers_fix_cuda). */
template <typename T, int VEC>
__device__ void fix_row(const T *__restrict__ x, int64_t i, int64_t k, int64_t kp, float thr,
                        const uint8_t *__restrict__ kflag, unsigned *dflag, const int *counts, const int *ocol,
                        int8_t *__restrict__ xq, float *__restrict__ sx, int rc, float *__restrict__ xo, int64_t ldo) {
    const T *xr = x + i * k;
    int8_t *qr = xq + i * kp;
    const int total = counts[0], ndyn = counts[1];
    if (thr > 0.0f && rc >= 0 && dflag[rc] != 0u) {
        quantize_row<T, VEC, true>(xr, k, kp, thr, kflag, dflag, qr, sx + i, nullptr, whole_block());
    } else if (ndyn > 0) {
        for (int o = threadIdx.x; o < total; o += blockDim.x) {
            const int col = ocol[o];
            if (!(kflag && kflag[col])) qr[col] = 0;
        }
    }
    const int nx = (int64_t)total < ldo ? total : (int)ldo;
    for (int o = threadIdx.x; o < nx; o += blockDim.x) xo[i * ldo + o] = to_f(xr[ocol[o]]); /* x's own value */
}

/* The dequantized weight columns of the dynamic outliers (l8_outliers_fix_cuda): part b of
 * nb (a grid-stride loop over (slot, j) with the part's threads). */
__device__ void dynamic_weights_part(const int8_t *__restrict__ wq, int64_t ldw, const float *__restrict__ wscale,
                                     int64_t n, const int *__restrict__ counts, const int *__restrict__ dcol, int dcap,
                                     float *__restrict__ wd, bool round16, int64_t b, int64_t nb) {
    const int nd = counts[1] < dcap ? counts[1] : dcap;
    const int64_t total = (int64_t)nd * n, stride = nb * blockDim.x;
    for (int64_t e = b * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int64_t d = e / n, j = e % n, col = dcol[d];
        const float v = __fmul_rn((float)wq[j * ldw + col], __fdiv_rn(wscale[j], 127.0f));
        wd[e] = round16 ? __half2float(__float2half_rn(v)) : v;
    }
}

/* Blocks [0, m): pass 2 for row blockIdx.x. Blocks [m, m + nwb): the dynamic weights. */
template <typename T, int VEC>
__global__ void __launch_bounds__(QBLOCK)
fix_kernel(const T *__restrict__ x, int64_t m, int64_t k, int64_t kp, float thr, const uint8_t *__restrict__ kflag,
           unsigned *dflag, const int *__restrict__ counts, const int *__restrict__ ocol,
           const int *__restrict__ dcol, int8_t *__restrict__ xq, float *__restrict__ sx,
           const int *__restrict__ rcol, float *__restrict__ xo, int64_t ldo, const int8_t *__restrict__ wq,
           int64_t ldw, const float *__restrict__ wscale, int64_t n, int dcap, float *__restrict__ wd, int64_t nwb) {
    const int64_t b = blockIdx.x;
    if (b >= m) { /* uniform per block; no barrier below */
        dynamic_weights_part(wq, ldw, wscale, n, counts, dcol, dcap, wd, sizeof(T) == 2, b - m, nwb);
        return;
    }
    fix_row<T, VEC>(x, b, k, kp, thr, kflag, dflag, counts, ocol, xq, sx, rcol[b], xo, ldo);
}

/* m <= L8_CUDA_SMALL_M rows in one block: pass 1, compaction and pass 2 in one launch,
 * separated by block barriers instead of kernel boundaries (a decode step's activations
 * are a few KB, so one SM reads them in about a microsecond; the launches it saves cost
 * more). No compact fp16 copies: the GEMV epilogue gathers outlier values itself.
 * Pass 1 runs the rows in parallel: the block is m groups of gw = blockDim.x / 32 / m
 * whole warps (the launcher makes blockDim.x = m * gw * 32), one group per row; each
 * group's maximum is its own (group_max), so the result is the one-row-at-a-time one.
 * Pass 2 takes the rows one after another with the whole block (a re-quantization has
 * block barriers and is needed by some rows only). __launch_bounds__(CBLOCK, 1): with the
 * register budget of one block per SM, nothing spills. */
template <typename T, int VEC>
__global__ void __launch_bounds__(CBLOCK, 1)
small_m_kernel(const T *__restrict__ x, int m, int64_t k, int64_t kp, float thr, const uint8_t *__restrict__ kflag,
               const int32_t *__restrict__ known_pos, unsigned *dflag, int *ocol, int *osrc, int *dcol, int *counts,
               int8_t *__restrict__ xq, float *__restrict__ sx, const uint8_t *__restrict__ ovf) {
    __shared__ int rcol[L8_CUDA_SMALL_M];
    const bool any = thr > 0.0f || kflag != nullptr;
    if (dflag)
        for (int64_t j = threadIdx.x; j < k; j += blockDim.x) dflag[j] = 0u;
    __syncthreads(); /* orders the block's global writes for the block: no memset needed */
    {
        const int gw = (int)(blockDim.x / 32) / m, i = (int)(threadIdx.x / 32) / gw; /* i < m by the launch */
        const row_group g{(int)threadIdx.x - i * gw * 32, gw * 32, i * gw, gw};
        quantize_row<T, VEC, false>(x + (int64_t)i * k, k, kp, thr, kflag, dflag, xq + (int64_t)i * kp, sx + i,
                                    rcol + i, g);
    }
    if (!any) return;
    __syncthreads();
    compact_block(kflag, known_pos, dflag, k, ocol, osrc, dcol, counts, ovf);
    __syncthreads();
    for (int i = 0; i < m; i++) {
        const int rc = rcol[i];
        fix_row<T, VEC>(x, i, k, kp, thr, kflag, dflag, counts, ocol, xq, sx, rc, nullptr, 0);
        __syncthreads(); /* fix_row may run a block reduction: keep the rows in lockstep */
    }
}

/* ---- the fused prefill quantizer (l8_prefill_flags_cuda + l8_prefill_quantize_cuda) ----
 * The CPU's order of work, on the GPU: first every column's outlier flag (any |x| >= t),
 * then every row quantized with its exact scale. No provisional scales, no fix-up pass:
 * the price is a second read of x, which comes from L2 when x fits there (50 MB on an
 * H200: 2048 x 4096 fp16 is 16 MB), against the two launches and the single-block
 * compaction of the three-pass scheme. */

constexpr int PF_THREADS = 256, PF_ROWS = 64; /* flag pass: column vectors x row chunk per block */
static_assert(L8_PREFILL_MAX_M == (int64_t)65535 * PF_ROWS, "callers keep m within the flag pass's grid");

/* Blocks (column vectors [bx * PF_THREADS, +PF_THREADS), rows [by * PF_ROWS, +PF_ROWS)):
 * dflag[j] = 1 for the non-known columns with some |x| >= thr in the chunk (plain stores of
 * the same value: any order is the same). The last block to finish (a counter, after a
 * device-wide fence) builds the outlier list from the final flags with compact_block. */
template <typename T, int VEC>
__global__ void __launch_bounds__(PF_THREADS)
prefill_flags_kernel(const T *__restrict__ x, int64_t m, int64_t k, float thr, const uint8_t *__restrict__ kflag,
                     const int32_t *__restrict__ known_pos, unsigned *dflag, int *ocol, int *osrc, int *dcol,
                     int *counts, unsigned *done, const uint8_t *__restrict__ ovf) {
    __shared__ bool last;
    const int64_t c = (int64_t)blockIdx.x * PF_THREADS + threadIdx.x, nv = k / VEC;
    const int64_t r0 = (int64_t)blockIdx.y * PF_ROWS, r1 = r0 + PF_ROWS < m ? r0 + PF_ROWS : m;
    if (thr > 0.0f && c < nv) {
        unsigned fl = 0u;
        for (int64_t i = r0; i < r1; i++) {
            float v[VEC];
            load_vec<T, VEC>(x + i * k + c * VEC, v);
#pragma unroll
            for (int t = 0; t < VEC; t++) fl |= fabsf(v[t]) >= thr ? 1u << t : 0u;
        }
#pragma unroll
        for (int t = 0; t < VEC; t++) {
            const int64_t j = c * VEC + t;
            if (((fl >> t) & 1u) && !(kflag && kflag[j]) && dflag[j] == 0u) dflag[j] = 1u;
        }
    }
    /* the last block: every other block's flags are visible after its fence and counter */
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) == gridDim.x * gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence(); /* acquire: the loads below see the other blocks' flags, not stale L1 lines */
    compact_block(kflag, known_pos, dflag, k, ocol, osrc, dcol, counts, ovf);
}

/* Blocks [0, m): row blockIdx.x quantized with its exact scale (every flagged column
 * excluded: quantize_row's REQUANT mode, the rule of quantize.c), the padding rows of xq
 * below mpad zeroed, and x's outlier values gathered into xo (first min(total, ldo)
 * entries). Blocks [m, m + nwb): the dynamic columns' dequantized weights. */
template <typename T, int VEC>
__global__ void __launch_bounds__(QBLOCK)
prefill_quantize_kernel(const T *__restrict__ x, int64_t m, int64_t k, int64_t kp, int64_t mpad, float thr,
                        const uint8_t *__restrict__ kflag, unsigned *dflag, const int *__restrict__ counts,
                        const int *__restrict__ ocol, const int *__restrict__ dcol, int8_t *__restrict__ xq,
                        float *__restrict__ sx, float *__restrict__ xo, int64_t ldo, const int8_t *__restrict__ wq,
                        int64_t ldw, const float *__restrict__ wscale, int64_t n, int dcap, float *__restrict__ wd,
                        int64_t nwb) {
    const int64_t b = blockIdx.x;
    if (b >= m) { /* uniform per block; no barrier below */
        dynamic_weights_part(wq, ldw, wscale, n, counts, dcol, dcap, wd, sizeof(T) == 2, b - m, nwb);
        return;
    }
    const T *xr = x + b * k;
    quantize_row<T, VEC, true>(xr, k, kp, thr, kflag, dflag, xq + b * kp, sx + b, nullptr, whole_block());
    for (int64_t r = m + b; r < mpad; r += m)
        for (int64_t j = threadIdx.x; j < kp; j += blockDim.x) xq[r * kp + j] = 0;
    const int total = counts[0], nx = (int64_t)total < ldo ? total : (int)ldo;
    for (int o = threadIdx.x; o < nx; o += blockDim.x) xo[b * ldo + o] = to_f(xr[ocol[o]]);
}

/* 16-byte vectors when the rows allow them, scalars otherwise. */
template <typename T>
bool vec_ok(const void *x, int64_t k) {
    constexpr int V = 16 / sizeof(T);
    return ((uintptr_t)x % 16) == 0 && k % V == 0;
}

int qthreads(int64_t k, int vec) {
    int64_t t = (k / vec + 31) / 32 * 32;
    return t < 32 ? 32 : t > QBLOCK ? QBLOCK : (int)t;
}

} // namespace

/* ------------------------------------------------------------------ launchers */

cudaError_t l8_quantize_x_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, int64_t mpad,
                               float threshold, const uint8_t *kflag, unsigned *dflag, int8_t *xq, float *sx, int *rcol,
                               cudaStream_t s) {
    if (m == 0) return cudaSuccess;
    if (m > 0x7fffffff) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)m);
    if (xt == L8_F16) {
        const __half *xh = static_cast<const __half *>(x);
        if (vec_ok<__half>(x, k))
            quantize_x_kernel<__half, 8><<<grid, qthreads(k, 8), 0, s>>>(xh, k, kp, mpad, threshold, kflag, dflag, xq,
                                                                         sx, rcol);
        else
            quantize_x_kernel<__half, 1><<<grid, qthreads(k, 1), 0, s>>>(xh, k, kp, mpad, threshold, kflag, dflag, xq,
                                                                         sx, rcol);
    } else {
        const float *xf = static_cast<const float *>(x);
        if (vec_ok<float>(x, k))
            quantize_x_kernel<float, 4><<<grid, qthreads(k, 4), 0, s>>>(xf, k, kp, mpad, threshold, kflag, dflag, xq,
                                                                        sx, rcol);
        else
            quantize_x_kernel<float, 1><<<grid, qthreads(k, 1), 0, s>>>(xf, k, kp, mpad, threshold, kflag, dflag, xq,
                                                                        sx, rcol);
    }
    return cudaGetLastError();
}

cudaError_t l8_outliers_compact_cuda(const uint8_t *kflag, const int32_t *known_pos, int64_t k,
                                     const l8_outlier_list *ol, cudaStream_t s) {
    compact_kernel<<<1, CBLOCK, 0, s>>>(kflag, known_pos, ol->dflag, k, ol->ocol, ol->osrc, ol->dcol, ol->counts,
                                        ol->ovf);
    return cudaGetLastError();
}

cudaError_t l8_outliers_fix_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, float threshold,
                                 const uint8_t *kflag, const l8_outlier_list *ol, int8_t *xq, float *sx,
                                 const int *rcol, float *xo, int64_t ldo, const int8_t *wq, int64_t ldw,
                                 const float *wscale, int64_t n, int dcap, float *wd, cudaStream_t s) {
    if (m == 0) return cudaSuccess;
    const bool f16 = xt == L8_F16;
    const int vec = f16 ? (vec_ok<__half>(x, k) ? 8 : 1) : (vec_ok<float>(x, k) ? 4 : 1);
    const int threads = std::min(qthreads(k, vec), FBLOCK);
    /* blocks for the dynamic weights: up to one element per thread, at most 64K threads */
    const int64_t elems = dcap > 0 ? (int64_t)dcap * n : 0;
    const int64_t nwb = std::min<int64_t>((elems + threads - 1) / threads, 65536 / threads);
    if (m + nwb > 0x7fffffff) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)(m + nwb));
#define L8_FIX_LAUNCH(T, V)                                                                                        \
    fix_kernel<T, V><<<grid, threads, 0, s>>>(static_cast<const T *>(x), m, k, kp, threshold, kflag, ol->dflag,  \
                                              ol->counts, ol->ocol, ol->dcol, xq, sx, rcol, xo, ldo, wq, ldw,     \
                                              wscale, n, dcap, wd, nwb)
    if (f16) {
        if (vec == 8)
            L8_FIX_LAUNCH(__half, 8);
        else
            L8_FIX_LAUNCH(__half, 1);
    } else {
        if (vec == 4)
            L8_FIX_LAUNCH(float, 4);
        else
            L8_FIX_LAUNCH(float, 1);
    }
#undef L8_FIX_LAUNCH
    return cudaGetLastError();
}

cudaError_t l8_quantize_small_m_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, float threshold,
                                     const uint8_t *kflag, const int32_t *known_pos, const l8_outlier_list *ol,
                                     int8_t *xq, float *sx, cudaStream_t s) {
    if (m == 0) return cudaSuccess;
    if (m > L8_CUDA_SMALL_M) return cudaErrorInvalidValue;
    const int mi = (int)m;
    /* m groups of whole warps, as many as fit in CBLOCK threads (small_m_kernel) */
    const int threads = (CBLOCK / 32 / mi) * mi * 32;
#define L8_SMALL_LAUNCH(T, V)                                                                                      \
    small_m_kernel<T, V><<<1, threads, 0, s>>>(static_cast<const T *>(x), mi, k, kp, threshold, kflag, known_pos, \
                                               ol->dflag, ol->ocol, ol->osrc, ol->dcol, ol->counts, xq, sx, ol->ovf)
    if (xt == L8_F16) {
        if (vec_ok<__half>(x, k))
            L8_SMALL_LAUNCH(__half, 8);
        else
            L8_SMALL_LAUNCH(__half, 1);
    } else {
        if (vec_ok<float>(x, k))
            L8_SMALL_LAUNCH(float, 4);
        else
            L8_SMALL_LAUNCH(float, 1);
    }
#undef L8_SMALL_LAUNCH
    return cudaGetLastError();
}

cudaError_t l8_prefill_flags_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, float threshold,
                                  const uint8_t *kflag, const int32_t *known_pos, const l8_outlier_list *ol,
                                  unsigned *done, cudaStream_t s) {
    const bool f16 = xt == L8_F16;
    const int vec = f16 ? (vec_ok<__half>(x, k) ? 8 : 1) : (vec_ok<float>(x, k) ? 4 : 1);
    /* no threshold: one block, which only builds the list of the known columns */
    const int64_t gx = threshold > 0.0f ? std::max<int64_t>(1, (k / vec + PF_THREADS - 1) / PF_THREADS) : 1;
    const int64_t gy = threshold > 0.0f ? std::max<int64_t>(1, (m + PF_ROWS - 1) / PF_ROWS) : 1;
    if (gx > 0x7fffffff || gy > 65535) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)gx, (unsigned)gy);
#define L8_PF_LAUNCH(T, V)                                                                                         \
    prefill_flags_kernel<T, V><<<grid, PF_THREADS, 0, s>>>(static_cast<const T *>(x), m, k, threshold, kflag,      \
                                                           known_pos, ol->dflag, ol->ocol, ol->osrc, ol->dcol,     \
                                                           ol->counts, done, ol->ovf)
    if (f16) {
        if (vec == 8)
            L8_PF_LAUNCH(__half, 8);
        else
            L8_PF_LAUNCH(__half, 1);
    } else {
        if (vec == 4)
            L8_PF_LAUNCH(float, 4);
        else
            L8_PF_LAUNCH(float, 1);
    }
#undef L8_PF_LAUNCH
    return cudaGetLastError();
}

cudaError_t l8_prefill_quantize_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, int64_t mpad,
                                     float threshold, const uint8_t *kflag, const l8_outlier_list *ol, int8_t *xq,
                                     float *sx, float *xo, int64_t ldo, const int8_t *wq, int64_t ldw,
                                     const float *wscale, int64_t n, int dcap, float *wd, cudaStream_t s) {
    if (m == 0) return cudaSuccess;
    const bool f16 = xt == L8_F16;
    const int vec = f16 ? (vec_ok<__half>(x, k) ? 8 : 1) : (vec_ok<float>(x, k) ? 4 : 1);
    const int threads = qthreads(k, vec);
    const int64_t elems = dcap > 0 ? (int64_t)dcap * n : 0;
    const int64_t nwb = std::min<int64_t>((elems + threads - 1) / threads, 65536 / threads);
    if (m + nwb > 0x7fffffff) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)(m + nwb));
#define L8_PQ_LAUNCH(T, V)                                                                                         \
    prefill_quantize_kernel<T, V><<<grid, threads, 0, s>>>(static_cast<const T *>(x), m, k, kp, mpad, threshold,  \
                                                           kflag, ol->dflag, ol->counts, ol->ocol, ol->dcol, xq,   \
                                                           sx, xo, ldo, wq, ldw, wscale, n, dcap, wd, nwb)
    if (f16) {
        if (vec == 8)
            L8_PQ_LAUNCH(__half, 8);
        else
            L8_PQ_LAUNCH(__half, 1);
    } else {
        if (vec == 4)
            L8_PQ_LAUNCH(float, 4);
        else
            L8_PQ_LAUNCH(float, 1);
    }
#undef L8_PQ_LAUNCH
    return cudaGetLastError();
}
