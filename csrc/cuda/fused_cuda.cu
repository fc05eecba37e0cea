/* fused_cuda.cu: the one-launch decoding forward (fused_cuda.h). CPU reference:
 * linear_cpu.c (cpu_forward, linear_epilogue) and quantize.c (l8_quantize_rows); the
 * results are bit-identical to them, operation for operation:
 *
 *   outlier column j:  known, or (threshold > 0) some |x[i, j]| >= threshold
 *                      (the CPU's colmax[j] >= threshold);
 *   row scale s_i:     max |x[i, j]| over the other columns (quantize.c), inv = 127 / s_i;
 *   int8 x:            0 in outlier columns and when s_i == 0, else quantize_one;
 *   y[i, j]:           acc * ((s_i * (1 / 127^2)) * sw[j]) + osum + bias[j], where
 *                      osum = sum over outlier columns in ascending order of
 *                      x[i, col] * w(col, j), each product and sum rounded to fp32
 *                      (__fmul_rn / __fadd_rn: no fused multiply-add, as the CPU has none);
 *                      w(col, j) is the stored fp16 weight for known columns, else
 *                      wq[j, col] * (wscale[j] / 127), rounded to fp16 for float16 x.
 * benchmarks/replay_fused.py replays this kernel's indexing and reduction order in NumPy
 * against the CPU backend (no GPU needed).
 *
 * Structure of a block (FD_THREADS threads; the grid is at most the blocks the GPU holds
 * at once, each taking tiles of FD_WARPS * R weight rows, t = blockIdx.x, + gridDim.x, ...):
 *   0. ask L2 for its first tile's weight rows (prefetch), so DRAM works during 1-2;
 *   1. one pass over x (L2): each thread takes VEC consecutive columns, reads them in all
 *      m rows to decide the columns' outlier flags (bitmap in shared memory, atomicOr),
 *      then reads them again (L1) to fold the non-outlier values into its m row maxima;
 *      a warp reduction and a shared atomicMax per row give the exact scales;
 *   2. a second pass quantizes x into shared memory (xs, m x kp int8), while warp 0 lists
 *      the outlier columns in ascending order (a warp scan over the bitmap words; up to
 *      FD_LIST columns, the rest are found again by walking the bitmap);
 *   3. per tile: each warp streams R weight rows with 16-byte loads (lanes along k), dp4a
 *      against xs, one warp reduction (redux.sync) per (row, output) pair; lane i * R + r
 *      owns y[i, j0 + r] and runs the epilogue.
 * Every int32 sum is exact, so the order of the dp4a work does not matter; the fp32
 * epilogue is the CPU's order exactly.
 *
 * Build: setup.py compiles every .cu file in csrc with nvcc. Check: pytest tests/test_cuda.py
 * -k fused (against the CPU backend). Time: benchmarks/bench_linear.py --fused.
 */
#include <cuda_fp16.h>

#include "device_common.h"
#include <cuda_runtime.h>
#include <limits.h>
#include <stdint.h>

#include <algorithm>
#include <mutex>

#include "epilogue_cuda.cuh"
#include "fused_cuda.h"
#include "gemm_cuda.h"

namespace {

constexpr int FD_THREADS = 256, FD_WARPS = FD_THREADS / 32;
constexpr int FD_LIST = 1024;              /* outlier columns listed in shared memory */
constexpr unsigned FULL = 0xffffffffu;


/* quantize.c's quantize_one: round(127 x / s) to nearest even, clamped to [-127, 127].
 * quant_fast when 127 / s is finite; quant_tiny (a double division, a subroutine call)
 * for the subnormal s where it overflows, kept out of the main loop so that the call's
 * saved registers do not spill there. */
__device__ __forceinline__ int8_t clamp127(int q) { return (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q); }
__device__ __forceinline__ int8_t quant_fast(float v, float inv) { return clamp127(__float2int_rn(__fmul_rn(v, inv))); }
__device__ __noinline__ int8_t quant_tiny(float v, float s) {
    return clamp127((int)rint((double)v * 127.0 / (double)s)); /* v * 127 is exact in double */
}


__device__ __forceinline__ void prefetch_l2(const void *p) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

/* A weight row's 16 bytes, streamed: read once, not kept in L1. */
__device__ __forceinline__ int4 ld_stream(const int4 *p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

/* Weight rows per warp: MT * R <= 32 so one lane owns each output of a tile. */
template <int MT> struct rows_per_warp { static constexpr int value = MT <= 8 ? 4 : 2; };

struct fd_args {
    int m;
    int64_t k, kp, np, n;
    float thr;
    const uint8_t *kflag;
    const int32_t *known_pos;
    const int8_t *W;
    const float *wscale, *bias;
    const __half *wk;
    void *y;
    bool y_f16;
    const uint8_t *ovf;
    int *ovf_out;
};

template <typename T, int VEC, int MT>
__global__ void __launch_bounds__(FD_THREADS)
fused_decode_kernel(const T *__restrict__ x, const fd_args a) {
    constexpr int R = rows_per_warp<MT>::value, TILE = FD_WARPS * R;
    static_assert(MT * R <= 32, "one lane per output");
    static_assert(32 % VEC == 0, "a thread's columns sit in one bitmap word");
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ unsigned rmax[MT];
    __shared__ int nlist, ovmin;
    const int m = a.m, tid = (int)threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t k = a.k, kp = a.kp, nw = (k + 31) / 32;
    int8_t *xs = reinterpret_cast<int8_t *>(smem);                                   /* (m, kp) */
    unsigned *bm = reinterpret_cast<unsigned *>(smem + (size_t)m * (size_t)kp);     /* (nw,) */
    int *list = reinterpret_cast<int *>(bm + ((nw + 3) & ~(int64_t)3));              /* (FD_LIST,) */
    const int64_t ntiles = (a.np + TILE - 1) / TILE;

    /* 0. the first tile's weights toward L2 while x is worked on */
    if ((int64_t)blockIdx.x < ntiles) {
        const int64_t r0 = (int64_t)blockIdx.x * TILE, rows = a.np - r0 < TILE ? a.np - r0 : TILE;
        const char *base = reinterpret_cast<const char *>(a.W + r0 * kp);
        for (int64_t off = (int64_t)tid * 128; off < rows * kp; off += (int64_t)FD_THREADS * 128)
            prefetch_l2(base + off);
    }
    for (int64_t w = tid; w < nw; w += FD_THREADS) bm[w] = 0u;
    if (tid < MT) rmax[tid] = 0u;
    __syncthreads();

    /* 1. outlier flags and row maxima. Maxima as float bits: |x| >= 0 orders like its
     * bits, and a NaN (not checked on the device, cuda_common.h) lands above +Inf, so its
     * row's scale is NaN and the row's outputs NaN, as on the other paths. */
    const bool dyn = a.thr > 0.0f;
    const int64_t nv = k / VEC;
    unsigned rm[MT];
#pragma unroll
    for (int i = 0; i < MT; i++) rm[i] = 0u;
    for (int64_t c = tid; c < nv; c += FD_THREADS) {
        unsigned fl = 0u; /* bit t: column c * VEC + t is an outlier column */
        if (a.kflag) {
#pragma unroll
            for (int t = 0; t < VEC; t++) fl |= a.kflag[c * VEC + t] ? 1u << t : 0u;
        }
        if (dyn) {
#pragma unroll
            for (int i = 0; i < MT; i++) {
                if (i >= m) break;
                float v[VEC];
                load_vec<T, VEC>(x + (int64_t)i * k + c * VEC, v);
#pragma unroll
                for (int t = 0; t < VEC; t++) fl |= fabsf(v[t]) >= a.thr ? 1u << t : 0u;
            }
        }
#pragma unroll
        for (int i = 0; i < MT; i++) {
            if (i >= m) break;
            float v[VEC];
            load_vec<T, VEC>(x + (int64_t)i * k + c * VEC, v);
#pragma unroll
            for (int t = 0; t < VEC; t++) {
                const unsigned b = __float_as_uint(fabsf(v[t]));
                if (!((fl >> t) & 1u)) rm[i] = b > rm[i] ? b : rm[i];
            }
        }
        if (fl) atomicOr(&bm[(c * VEC) / 32], fl << ((c * VEC) % 32));
    }
#pragma unroll
    for (int i = 0; i < MT; i++) {
        if (i >= m) break;
        const unsigned r = __reduce_max_sync(FULL, rm[i]);
        if (lane == 0 && r) atomicMax(&rmax[i], r);
    }
    __syncthreads();

    /* 2. int8 x into shared memory; warp 0 also lists the outlier columns */
    float sc[MT], inv[MT];
#pragma unroll
    for (int i = 0; i < MT; i++) {
        sc[i] = i < m ? __uint_as_float(rmax[i]) : 0.0f;
        inv[i] = sc[i] > 0.0f ? __fdiv_rn(127.0f, sc[i]) : 0.0f;
    }
    if (warp == 0) {
        int base = 0, myov = INT_MAX;
        for (int64_t w0 = 0; w0 < nw; w0 += 32) {
            const int64_t wi = w0 + lane;
            unsigned bits = wi < nw ? bm[wi] : 0u;
            const int cnt = __popc(bits);
            int incl = cnt;
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const int o = __shfl_up_sync(FULL, incl, off);
                if (lane >= off) incl += o;
            }
            int at = base + incl - cnt; /* this word's first entry */
            while (bits) {
                const int col = (int)(wi * 32) + __ffs(bits) - 1;
                bits &= bits - 1u;
                if (at < FD_LIST) list[at] = col;
                at++;
                if (a.ovf && myov == INT_MAX && !(a.kflag && a.kflag[col]) && a.ovf[col]) myov = col;
            }
            base += __shfl_sync(FULL, incl, 31);
        }
        myov = __reduce_min_sync(FULL, myov);
        if (lane == 0) {
            nlist = base;
            ovmin = myov;
        }
    }
    constexpr unsigned VMASK = VEC == 32 ? FULL : (1u << VEC) - 1u;
    for (int64_t c = tid; c < nv; c += FD_THREADS) {
        const unsigned fl = (bm[(c * VEC) / 32] >> ((c * VEC) % 32)) & VMASK;
#pragma unroll
        for (int i = 0; i < MT; i++) {
            if (i >= m) break;
            float v[VEC];
            load_vec<T, VEC>(x + (int64_t)i * k + c * VEC, v);
            uint32_t word[(VEC + 3) / 4] = {}; /* the VEC bytes packed in registers, little-endian */
#pragma unroll
            for (int t = 0; t < VEC; t++) { /* rows with isinf(inv) are redone below */
                const int8_t q = (sc[i] == 0.0f || ((fl >> t) & 1u) || isinf(inv[i])) ? (int8_t)0
                                                                                     : quant_fast(v[t], inv[i]);
                word[t / 4] |= (uint32_t)(uint8_t)q << (8 * (t % 4));
            }
            int8_t *dst = xs + (int64_t)i * kp + c * VEC;
            if constexpr (VEC == 8)
                *reinterpret_cast<uint2 *>(dst) = make_uint2(word[0], word[1]);
            else if constexpr (VEC == 4)
                *reinterpret_cast<uint32_t *>(dst) = word[0];
            else
                dst[0] = (int8_t)word[0];
        }
    }
    bool tiny = false;
#pragma unroll
    for (int i = 0; i < MT; i++) tiny |= i < m && isinf(inv[i]);
    if (tiny) __syncthreads(); /* uniform (every thread has the same scales); orders the writes */
    for (int i = 0; i < m && tiny; i++) { /* a row with a subnormal scale (rare): its exact values now */
        const float si = __uint_as_float(rmax[i]);
        if (!(si > 0.0f) || !isinf(__fdiv_rn(127.0f, si))) continue;
        for (int64_t j = tid; j < k; j += FD_THREADS)
            if (!((bm[j / 32] >> (j % 32)) & 1u)) xs[(int64_t)i * kp + j] = quant_tiny(to_f(x[(int64_t)i * k + j]), si);
    }
    for (int64_t e = tid; e < (int64_t)m * (kp - k); e += FD_THREADS) /* padding columns [k, kp) */
        xs[(e / (kp - k)) * kp + k + e % (kp - k)] = 0;
    __syncthreads();
    if (a.ovf_out && blockIdx.x == 0 && tid == 0) *a.ovf_out = ovmin;
    const int total = nlist;

    /* 3. tiles of weight rows */
    const int64_t nk = kp / 16;
    const int4 *xv = reinterpret_cast<const int4 *>(xs);
    for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const int64_t j0 = t * TILE + (int64_t)warp * R;
        if (j0 >= a.np) continue; /* np is a multiple of 16 and of R: a warp's rows are all in or all out */
        const int4 *Wv = reinterpret_cast<const int4 *>(a.W + j0 * kp);
        int acc[MT][R];
#pragma unroll
        for (int i = 0; i < MT; i++)
#pragma unroll
            for (int r = 0; r < R; r++) acc[i][r] = 0;
#pragma unroll 2
        for (int64_t c = lane; c < nk; c += 32) {
            int4 w[R];
#pragma unroll
            for (int r = 0; r < R; r++) w[r] = ld_stream(Wv + r * nk + c);
#pragma unroll
            for (int i = 0; i < MT; i++) {
                if (i >= m) break;
                const int4 av = xv[i * nk + c];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    acc[i][r] = __dp4a(av.x, w[r].x, acc[i][r]);
                    acc[i][r] = __dp4a(av.y, w[r].y, acc[i][r]);
                    acc[i][r] = __dp4a(av.z, w[r].z, acc[i][r]);
                    acc[i][r] = __dp4a(av.w, w[r].w, acc[i][r]);
                }
            }
        }
        int mine = 0;
#pragma unroll
        for (int i = 0; i < MT; i++) {
            if (i >= m) break;
#pragma unroll
            for (int r = 0; r < R; r++) {
                const int v = __reduce_add_sync(FULL, acc[i][r]);
                if (lane == i * R + r) mine = v; /* constant indices keep acc in registers */
            }
        }
        const int i = lane / R;
        const int64_t j = j0 + lane % R;
        if (i >= m || j >= a.n) continue;
        /* the outlier sum, ascending columns: the list, then (past FD_LIST) the bitmap */
        const T *xr = x + (int64_t)i * k;
        const float ws127 = __fdiv_rn(a.wscale[j], 127.0f);
        auto term = [&](int col) -> float {
            float wv;
            if (a.kflag && a.kflag[col]) {
                wv = __half2float(a.wk[(int64_t)a.known_pos[col] * a.n + j]);
            } else {
                wv = __fmul_rn((float)a.W[j * kp + col], ws127);
                if (sizeof(T) == 2) wv = round_h(wv);
            }
            return __fmul_rn(to_f(xr[col]), wv);
        };
        float osum = 0.0f;
        const int nl = total < FD_LIST ? total : FD_LIST;
        for (int o = 0; o < nl; o++) osum = __fadd_rn(osum, term(list[o]));
        if (total > FD_LIST) {
            const int from = list[FD_LIST - 1] + 1;
            for (int64_t w = from / 32; w < nw; w++) {
                unsigned bits = bm[w];
                if (w == from / 32) bits &= FULL << (from % 32);
                while (bits) {
                    const int col = (int)(w * 32) + __ffs(bits) - 1;
                    bits &= bits - 1u;
                    osum = __fadd_rn(osum, term(col));
                }
            }
        }
        const float v = finish(mine, __uint_as_float(rmax[i]), a.wscale[j], osum, a.bias ? a.bias + j : nullptr);
        if (a.y_f16)
            static_cast<__half *>(a.y)[(int64_t)i * a.n + j] = __float2half_rn(v);
        else
            static_cast<float *>(a.y)[(int64_t)i * a.n + j] = v;
    }
}

/* Blocks of kern per multiprocessor with smem bytes of dynamic shared memory, its limit
 * raised as needed. Asked once per kernel, device and size, then remembered: decoding calls
 * this on every token, and the attribute and occupancy queries are host time on each. */
template <typename K>
cudaError_t blocks_per_sm(K kern, size_t smem, int *per_sm) {
    struct entry {
        int device = -1;
        size_t smem = 0;
        int per_sm = 0;
    };
    constexpr int MAX_DEV = 64;
    static std::mutex mu;
    static entry memo[8];            /* a model's few layer widths; replaced round-robin */
    static unsigned next = 0;
    static size_t raised[MAX_DEV];   /* the limit set per device: only ever raised, so a
                                        launch another thread sized never loses its limit */
    int device = 0;
    cudaError_t e = cudaGetDevice(&device);
    if (e != cudaSuccess) return e;
    if (device < 0 || device >= MAX_DEV) return cudaErrorInvalidDevice;
    std::lock_guard<std::mutex> lock(mu);
    for (const entry &en : memo)
        if (en.device == device && en.smem == smem) {
            *per_sm = en.per_sm;
            return cudaSuccess;
        }
    if (smem > 48u << 10 && smem > raised[device]) {
        if ((e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem)) != cudaSuccess)
            return e;
        raised[device] = smem;
    }
    if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kern, FD_THREADS, smem)) != cudaSuccess) return e;
    memo[next++ % 8] = {device, smem, *per_sm};
    return cudaSuccess;
}

template <typename T, int VEC, int MT>
cudaError_t launch(const void *x, const fd_args &a, size_t smem, int sms, cudaStream_t s) {
    constexpr int R = rows_per_warp<MT>::value, TILE = FD_WARPS * R;
    auto kern = fused_decode_kernel<T, VEC, MT>;
    int per_sm = 0;
    const cudaError_t e = blocks_per_sm(kern, smem, &per_sm);
    if (e != cudaSuccess) return e;
    const int64_t ntiles = (a.np + TILE - 1) / TILE;
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(ntiles, (int64_t)sms * std::max(per_sm, 1)));
    kern<<<(unsigned)grid, FD_THREADS, smem, s>>>(static_cast<const T *>(x), a);
    return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_m(const void *x, const fd_args &a, size_t smem, int sms, cudaStream_t s) {
    static_assert(L8_CUDA_FUSED_MAX_M == 16, "instantiations below cover m <= 16");
    if (a.m <= 1) return launch<T, VEC, 1>(x, a, smem, sms, s);
    if (a.m <= 2) return launch<T, VEC, 2>(x, a, smem, sms, s);
    if (a.m <= 4) return launch<T, VEC, 4>(x, a, smem, sms, s);
    if (a.m <= 8) return launch<T, VEC, 8>(x, a, smem, sms, s);
    return launch<T, VEC, 16>(x, a, smem, sms, s);
}

} // namespace

size_t l8_fused_decode_smem(int64_t m, int64_t k, int64_t kp) {
    const int64_t nw = (k + 31) / 32;
    return (size_t)(m * kp) + (size_t)((nw + 3) & ~(int64_t)3) * 4 + (size_t)FD_LIST * 4;
}

cudaError_t l8_fused_decode_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, int64_t np, int64_t n,
                                 float threshold, const uint8_t *kflag, const int32_t *known_pos, const int8_t *wq,
                                 const float *wscale, const float *bias, const __half *wk, void *y, l8_dtype yt,
                                 const uint8_t *ovf, int *ovf_out, int sms, cudaStream_t s) {
    if (m == 0 || n == 0) return cudaSuccess;
    const size_t smem = l8_fused_decode_smem(m, k, kp);
    if (m > L8_CUDA_FUSED_MAX_M || smem > L8_FUSED_DECODE_SMEM_MAX || kp % 16 != 0 || np % 16 != 0)
        return cudaErrorInvalidValue;
    const fd_args a = {(int)m, k, kp, np, n, threshold, kflag, known_pos, wq, wscale, bias, wk, y, yt == L8_F16,
                       ovf, ovf_out};
    const uintptr_t xa = reinterpret_cast<uintptr_t>(x);
    if (xt == L8_F16)
        return xa % 16 == 0 && k % 8 == 0 ? launch_m<__half, 8>(x, a, smem, sms, s)
                                          : launch_m<__half, 1>(x, a, smem, sms, s);
    return xa % 16 == 0 && k % 4 == 0 ? launch_m<float, 4>(x, a, smem, sms, s) : launch_m<float, 1>(x, a, smem, sms, s);
}
