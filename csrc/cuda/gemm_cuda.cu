/* gemm_cuda.cu: int8 GEMM on the GPU and what it needs: the CUDA context (cuBLASLt
 * handle, per-shape matmul plans, current stream), the status checks, the cuBLASLt
 * wrapper (int8 and the fp16 baseline), the tiled int8 fallback, the small-m GEMV kernel
 * and the dequantization epilogue. CPU reference: gemm.c (l8_gemm_s8_ref) and
 * linear_cpu.c (linear_epilogue).
 *
 * Versions of the int8 product:
 *   - cuBLASLt (m > L8_CUDA_GEMV_MAX_M): int8 x int8 -> int32 with CUBLAS_COMPUTE_32I in
 *     the "TN" layout its IMMA kernels take with plain row/column ordering, then one pass
 *     of l8_dequant_cuda over the int32 result that applies the row and column scales,
 *     the fp16 outlier product and the bias, and converts. cuBLASLt cannot do this
 *     itself: its int8 epilogues scale by a single vector and write int8 or int32.
 *   - tiled (when cuBLASLt has no int8 algorithm for a shape, or forced with path 3 of
 *     l8_cuda_int8_matmul): 64 x 64 output tiles through shared memory with dp4a.
 *   - GEMV (m <= L8_CUDA_GEMV_MAX_M): one warp per 4 output columns streams the int8
 *     weight rows once with 16-byte loads, multiplies with dp4a, and runs the same
 *     epilogue on the reduced sums, so the int32 product never reaches memory.
 * All are exact in int32, and the epilogue replays the CPU backend's fp32 operations
 * in the same order with __fmul_rn/__fadd_rn (no fused multiply-add), so the CUDA and
 * CPU backends agree bit for bit.
 *
 * Graph capture: nothing here waits across calls or synchronizes with the host. Each
 * cuBLASLt call takes the workspace its algorithm needs from the stream-ordered pool on
 * the call's stream (cudaMallocAsync / cudaFreeAsync, both capturable), so calls on
 * different streams run concurrently and a forward can be captured in a CUDA graph. The
 * first call of a shape builds its plan (descriptors, heuristic): host work only.
 *
 * Build: setup.py compiles every .cu file in csrc with nvcc (python setup.py build_ext --inplace).
 * Check: pytest tests/test_cuda.py (CUDA against the CPU backend). Time: benchmarks/bench_linear.py.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <new>
#include <tuple>
#include <vector>

#include "gemm_cuda.h"
#include "epilogue_cuda.cuh"

/* ================================================================== status checks */

extern "C" int l8_cuda_fail(l8_status *st, cudaError_t e, const char *expr, const char *file, int line) {
    /* reset the thread's last error, or the next launch check would report this one again
     * (a sticky error, after which the context is unusable, stays whatever we do) */
    (void)cudaGetLastError();
    return l8_fail(st, e == cudaErrorMemoryAllocation ? L8_ERR_NOMEM : L8_ERR_RUNTIME,
                   "CUDA error %s (%s) in %s at %s:%d", cudaGetErrorName(e), cudaGetErrorString(e), expr, file,
                   line);
}

extern "C" int l8_cublas_fail(l8_status *st, cublasStatus_t e, const char *expr, const char *file, int line) {
    (void)cudaGetLastError(); /* as above: a failed cuBLAS call may leave a CUDA error behind */
    return l8_fail(st, e == CUBLAS_STATUS_ALLOC_FAILED ? L8_ERR_NOMEM : L8_ERR_RUNTIME,
                   "cuBLAS error %s (%d) in %s at %s:%d", cublasLtGetStatusString(e), (int)e, expr, file, line);
}

/* ================================================================== context */

namespace {

/* The most workspace the cuBLASLt heuristic may ask for (what cuBLAS recommends for
 * Hopper). Each matmul takes the workspace its algorithm needs from the stream-ordered
 * pool on its own stream, so calls on different streams never share one, nothing waits
 * across calls, and a forward can be captured in a CUDA graph (cudaMallocAsync and
 * cudaFreeAsync are capturable). */
constexpr size_t LT_WORKSPACE = 32u << 20;

/* Plans kept at most (a few KB each); past this the cache starts over. Prefills of many
 * different lengths make a plan per multiple of 32 rows. */
constexpr size_t MAX_PLANS = 4096;

/* Bytes of freed memory the default pool keeps reserved across synchronizations. */
constexpr uint64_t POOL_RELEASE_THRESHOLD = 1ull << 30;

struct dev_state {
    bool ready = false;
    cublasLtHandle_t lt = nullptr;
};

/* One matmul shape, ready to run: its descriptors, layouts and algorithm. Created on the
 * first call of a shape, destroyed with the context. supported == false: the heuristic
 * found no algorithm (the int8 GEMM then runs the tiled kernel). */
struct lt_plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
    cublasLtMatmulAlgo_t algo = {};
    size_t ws = 0; /* workspace bytes the algorithm needs */
    bool supported = false;
};

void destroy_plan(lt_plan &p) {
    if (p.ld) cublasLtMatrixLayoutDestroy(p.ld);
    if (p.lb) cublasLtMatrixLayoutDestroy(p.lb);
    if (p.la) cublasLtMatrixLayoutDestroy(p.la);
    if (p.op) cublasLtMatmulDescDestroy(p.op);
    p = lt_plan();
}

/* kind, device, rows of D, cols of D, k, alignments of A/B/D and of the bias (0: none) */
using plan_key = std::tuple<int, int, int64_t, int64_t, int64_t, int, int, int, int>;

/* Run f(), turning a C++ exception into a failed status: none may cross extern "C". */
template <typename F>
int no_throw(l8_status *st, F f) {
    try {
        return f();
    } catch (const std::bad_alloc &) {
        return l8_fail(st, L8_ERR_NOMEM, "out of host memory");
    } catch (const std::exception &e) {
        return l8_fail(st, L8_ERR_RUNTIME, "unexpected C++ exception: %s", e.what());
    } catch (...) {
        return l8_fail(st, L8_ERR_RUNTIME, "unexpected C++ exception");
    }
}

} // namespace

struct l8_cuda_ctx {
    std::mutex mu;                 /* the GIL is released around all of this */
    std::vector<dev_state> devs;
    std::map<plan_key, lt_plan> plans;
    cudaStream_t stream = nullptr; /* current stream; 0 is the legacy default stream */
    int fused = L8_CUDA_FUSED_DEFAULT; /* the fused paths in use (cuda_common.h) */
    std::atomic<long long> sm90_calls{0}; /* forwards through the sm90 GEMM (tests: the path was taken) */
};

extern "C" int l8_cuda_device_count(const char **why) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky: clear it so later calls do not see it */
        if (why) *why = cudaGetErrorString(e);
        return 0;
    }
    if (n == 0 && why) *why = "no CUDA device found";
    return n;
}

extern "C" l8_cuda_ctx *l8_cuda_ctx_new(void) {
    l8_cuda_ctx *ctx = new (std::nothrow) l8_cuda_ctx();
    const char *env = getenv("LLMINT8_CUDA_FUSED");
    const int f = env && *env ? l8_cuda_fused_parse(env) : -1;
    if (ctx && f >= 0) ctx->fused = f;
    return ctx;
}

static const char *const FUSED_NAMES[] = {"decode", "prefill", "gemm"}; /* bit 0, 1, 2 */

extern "C" int l8_cuda_fused_parse(const char *s) {
    if (!strcmp(s, "none") || !strcmp(s, "0")) return 0;
    if (!strcmp(s, "all") || !strcmp(s, "1")) return L8_FUSED_ALL;
    int f = 0;
    for (const char *p = s;;) {
        const char *end = strchr(p, '+');
        const size_t len = end ? (size_t)(end - p) : strlen(p);
        int bit = -1;
        for (int b = 0; b < 3; b++)
            if (strlen(FUSED_NAMES[b]) == len && !strncmp(p, FUSED_NAMES[b], len)) bit = b;
        if (bit < 0) return -1;
        f |= 1 << bit;
        if (!end) return f;
        p = end + 1;
    }
}

extern "C" const char *l8_cuda_fused_name(int fused) {
    static const char *const names[8] = {"none", "decode", "prefill", "decode+prefill",
                                         "gemm", "decode+gemm", "prefill+gemm", "all"};
    return names[fused & L8_FUSED_ALL];
}

extern "C" int l8_cuda_ctx_fused(const l8_cuda_ctx *ctx) { return ctx->fused; }
extern "C" void l8_cuda_ctx_note_sm90(l8_cuda_ctx *ctx) { ctx->sm90_calls++; }
extern "C" long long l8_cuda_ctx_sm90_calls(const l8_cuda_ctx *ctx) { return ctx->sm90_calls.load(); }
extern "C" void l8_cuda_ctx_set_fused(l8_cuda_ctx *ctx, int fused) { ctx->fused = fused; }

extern "C" void l8_cuda_ctx_free(l8_cuda_ctx *ctx) {
    if (!ctx) return;
    int prev = -1;
    const bool have_prev = cudaGetDevice(&prev) == cudaSuccess;
    for (auto &kv : ctx->plans) destroy_plan(kv.second); /* host objects: no device needed */
    for (size_t d = 0; d < ctx->devs.size(); d++) {
        dev_state &ds = ctx->devs[d];
        if (!ds.ready) continue;
        if (cudaSetDevice((int)d) != cudaSuccess) continue; /* runtime shutting down: nothing to free */
        if (ds.lt) cublasLtDestroy(ds.lt);
    }
    if (have_prev) cudaSetDevice(prev);
    (void)cudaGetLastError();
    delete ctx;
}

extern "C" int l8_cuda_push_device(int device, int *prev, l8_status *st) {
    *prev = -1;
    L8_CUDA_CHECK(st, cudaGetDevice(prev));
    if (*prev != device) L8_CUDA_CHECK(st, cudaSetDevice(device));
    return 0;
fail:
    return -1;
}

extern "C" void l8_cuda_pop_device(int prev) {
    int cur = -1;
    if (prev >= 0 && cudaGetDevice(&cur) == cudaSuccess && cur != prev) cudaSetDevice(prev);
}

namespace {

/* l8_cuda_ctx_device with ctx->mu held. */
int ctx_device_locked(l8_cuda_ctx *ctx, int device, l8_status *st) {
    if (device >= 0 && (size_t)device < ctx->devs.size() && ctx->devs[device].ready) return 0;
    const char *why = nullptr;
    const int n = l8_cuda_device_count(&why);
    if (n == 0)
        return l8_fail(st, L8_ERR_RUNTIME, "device 'cuda:%d' requested but CUDA is not available (%s); use device='cpu'",
                       device, why ? why : "unknown");
    if (device < 0 || device >= n)
        return l8_fail(st, L8_ERR_VALUE, "CUDA device %d does not exist (this machine has %d)", device, n);
    if (ctx->devs.size() < (size_t)n) ctx->devs.resize((size_t)n); /* may throw: nothing created yet */
    dev_state &ds = ctx->devs[device];
    int prev = -1;
    cudaMemPool_t pool;
    uint64_t thr = 0; /* cuuint64_t in the driver API */
    int major = 0, minor = 0, pools = 0;
    if (l8_cuda_push_device(device, &prev, st) < 0) return -1;
    L8_CUDA_CHECK(st, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    L8_CUDA_CHECK(st, cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    L8_CUDA_CHECK(st, cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device));
    if (major < 8) { /* setup.py builds sm_80 and up (and compute_90 PTX, which older GPUs cannot run) */
        l8_fail(st, L8_ERR_RUNTIME, "cuda:%d has compute capability %d.%d; llmint8's CUDA kernels need 8.0 or newer "
                "(Ampere, Ada, Hopper); use device='cpu'", device, major, minor);
        goto fail;
    }
    if (!pools) {
        l8_fail(st, L8_ERR_RUNTIME, "cuda:%d does not support stream-ordered memory pools (cudaMallocAsync); "
                "update the driver or use device='cpu'", device);
        goto fail;
    }
    L8_CUBLAS_CHECK(st, cublasLtCreate(&ds.lt));
    /* Keep freed temporaries in the pool between calls instead of returning them to the
     * driver at every synchronization; only raise the threshold if nobody set one. Bounded
     * (POOL_RELEASE_THRESHOLD, 1 GiB) rather than unlimited: the default pool is shared
     * with every other library in the process, and an unlimited threshold would keep the
     * peak of a long prefill reserved forever, out of reach of cudaMalloc users. */
    L8_CUDA_CHECK(st, cudaDeviceGetDefaultMemPool(&pool, device));
    L8_CUDA_CHECK(st, cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &thr));
    if (thr == 0) {
        thr = POOL_RELEASE_THRESHOLD;
        L8_CUDA_CHECK(st, cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &thr));
    }
    ds.ready = true;
    l8_cuda_pop_device(prev);
    return 0;
fail:
    if (ds.lt) cublasLtDestroy(ds.lt);
    ds = dev_state();
    l8_cuda_pop_device(prev);
    return -1;
}

} // namespace

extern "C" int l8_cuda_ctx_device(l8_cuda_ctx *ctx, int device, l8_status *st) {
    return no_throw(st, [&] {
        std::lock_guard<std::mutex> lock(ctx->mu);
        return ctx_device_locked(ctx, device, st);
    });
}

extern "C" cudaStream_t l8_cuda_ctx_stream(const l8_cuda_ctx *ctx) { return ctx->stream; }
extern "C" void l8_cuda_ctx_set_stream(l8_cuda_ctx *ctx, cudaStream_t s) { ctx->stream = s; }

extern "C" int l8_cuda_ctx_synchronize(l8_cuda_ctx *ctx, l8_status *st) {
    const cudaStream_t s = ctx->stream;
    std::vector<int> ready;
    const char *why = nullptr;
    int prev = -1;
    bool have_prev = false;
    if (s != nullptr) { /* a stream of one device: no need to know which */
        L8_CUDA_CHECK(st, cudaStreamSynchronize(s));
        return 0;
    }
    /* The legacy default stream is per device, and cudaStreamSynchronize(0) only waits for
     * the calling thread's current device: wait for each device this context has used. */
    if (no_throw(st, [&] {
            std::lock_guard<std::mutex> lock(ctx->mu);
            for (size_t d = 0; d < ctx->devs.size(); d++)
                if (ctx->devs[d].ready) ready.push_back((int)d);
            return 0;
        }) < 0)
        return -1;
    if (ready.empty()) { /* nothing was queued; still say so when CUDA cannot be used */
        if (l8_cuda_device_count(&why) == 0)
            return l8_fail(st, L8_ERR_RUNTIME, "CUDA is not available (%s)", why ? why : "unknown");
        return 0;
    }
    have_prev = cudaGetDevice(&prev) == cudaSuccess;
    for (int d : ready) {
        L8_CUDA_CHECK(st, cudaSetDevice(d));
        L8_CUDA_CHECK(st, cudaStreamSynchronize(cudaStreamLegacy));
    }
    if (have_prev) cudaSetDevice(prev);
    return 0;
fail:
    if (have_prev) cudaSetDevice(prev);
    return -1;
}

extern "C" int l8_cuda_alloc(void **p, size_t bytes, cudaStream_t s, l8_status *st) {
    *p = nullptr;
    L8_CUDA_CHECK(st, cudaMallocAsync(p, bytes < 256 ? 256 : bytes, s));
    return 0;
fail:
    *p = nullptr;
    return -1;
}

extern "C" void l8_cuda_free(void *p, cudaStream_t s) {
    if (p && cudaFreeAsync(p, s) != cudaSuccess) (void)cudaGetLastError();
}

/* ================================================================== cuBLASLt */

namespace {

/* Largest power of two <= 256 dividing the address and the leading dimension in bytes:
 * the alignment every column of the matrix has. */
int alignment(const void *p, int64_t ld_bytes) {
    uintptr_t v = (uintptr_t)p | (uintptr_t)ld_bytes | 256u;
    return (int)(v & (~v + 1));
}

enum { LT_INT8 = 0, LT_FP16 = 1 };

/* D (M, N) col-major, every column = v (M,). */
__global__ void fill_columns_kernel(__half *__restrict__ D, const __half *__restrict__ v, int64_t M, int64_t total) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
        D[e] = v[e % M];
}

cudaError_t fill_columns(__half *D, const __half *v, int64_t M, int64_t N, cudaStream_t s) {
    const int64_t total = M * N, blocks = std::min<int64_t>((total + 255) / 256, 4096);
    fill_columns_kernel<<<(unsigned)blocks, 256, 0, s>>>(D, v, M, total);
    return cudaGetLastError();
}

/* D (M, N) col-major, every column += v (M,), in fp32, rounded to fp16. */
__global__ void add_columns_kernel(__half *__restrict__ D, const __half *__restrict__ v, int64_t M, int64_t total) {
    for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
        D[e] = __float2half_rn(__half2float(D[e]) + __half2float(v[e % M]));
}

cudaError_t add_columns(__half *D, const __half *v, int64_t M, int64_t N, cudaStream_t s) {
    const int64_t total = M * N, blocks = std::min<int64_t>((total + 255) / 256, 4096);
    if (total == 0) return cudaSuccess;
    add_columns_kernel<<<(unsigned)blocks, 256, 0, s>>>(D, v, M, total);
    return cudaGetLastError();
}

/* cuBLASLt's bias epilogue reads the bias with vector loads that need more than element
 * alignment (and has no preference attribute for it): a bias with less than this goes
 * through add_columns after the matmul instead. */
constexpr int LT_BIAS_ALIGN = 16;

/* The descriptors, layouts and algorithm of one shape (see lt_matmul). On failure nothing
 * is left allocated. */
int make_plan(cublasLtHandle_t lt, bool i8, int64_t M, int64_t N, int64_t K, const void *bias, int aa, int ab_,
              int ad, lt_plan *p, l8_status *st) {
    cublasLtMatmulPreference_t pref = nullptr;
    const cudaDataType_t ab = i8 ? CUDA_R_8I : CUDA_R_16F, dt = i8 ? CUDA_R_32I : CUDA_R_16F;
    const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
    cublasLtMatmulHeuristicResult_t res = {};
    int nres = 0;
    const uint64_t wsb = LT_WORKSPACE;
    const uint32_t a32 = (uint32_t)aa, b32 = (uint32_t)ab_, d32 = (uint32_t)ad;
    cublasStatus_t hs;
    *p = lt_plan();
    L8_CUBLAS_CHECK(st, cublasLtMatmulDescCreate(&p->op, i8 ? CUBLAS_COMPUTE_32I : CUBLAS_COMPUTE_32F,
                                                 i8 ? CUDA_R_32I : CUDA_R_32F));
    L8_CUBLAS_CHECK(st, cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof tA));
    L8_CUBLAS_CHECK(st, cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof tB));
    if (bias) { /* the pointer is set again before every call; this one has the key's alignment */
        const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
        L8_CUBLAS_CHECK(st, cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
        L8_CUBLAS_CHECK(st, cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                           sizeof bias));
    }
    L8_CUBLAS_CHECK(st, cublasLtMatrixLayoutCreate(&p->la, ab, (uint64_t)K, (uint64_t)M, K));
    L8_CUBLAS_CHECK(st, cublasLtMatrixLayoutCreate(&p->lb, ab, (uint64_t)K, (uint64_t)N, K));
    L8_CUBLAS_CHECK(st, cublasLtMatrixLayoutCreate(&p->ld, dt, (uint64_t)M, (uint64_t)N, M));
    L8_CUBLAS_CHECK(st, cublasLtMatmulPreferenceCreate(&pref));
    L8_CUBLAS_CHECK(st, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb,
                                                             sizeof wsb));
    L8_CUBLAS_CHECK(st, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &a32,
                                                             sizeof a32));
    L8_CUBLAS_CHECK(st, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &b32,
                                                             sizeof b32));
    L8_CUBLAS_CHECK(st, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &d32,
                                                             sizeof d32));
    L8_CUBLAS_CHECK(st, cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &d32,
                                                             sizeof d32));
    hs = cublasLtMatmulAlgoGetHeuristic(lt, p->op, p->la, p->lb, p->ld, p->ld, pref, 1, &res, &nres);
    if (hs == CUBLAS_STATUS_NOT_SUPPORTED || (hs == CUBLAS_STATUS_SUCCESS && nres == 0)) {
        p->supported = false;
    } else {
        L8_CUBLAS_CHECK(st, hs);
        p->algo = res.algo;
        p->ws = res.workspaceSize;
        p->supported = true;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    return 0;
fail:
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    destroy_plan(*p);
    return -1;
}

/* D (M, N) col-major = A^T B with A (K, M) col-major (ld K), B (K, N) (ld K), D ld M: the
 * row-major y (N, M) = x (N, K) @ w (M, K)^T. Returns 0 when queued, -1 on error (in *st),
 * and 1 when cuBLASLt has no algorithm for the shape (the heuristic found none or the
 * matmul said NOT_SUPPORTED; nothing queued, no error recorded; the caller decides).
 * The device must be current and ready. May throw std::bad_alloc (the plan cache). */
int lt_matmul_throwing(l8_cuda_ctx *ctx, int device, int kind, const void *A, const void *B, void *D, int64_t M,
                       int64_t N, int64_t K, const void *bias, cudaStream_t s, l8_status *st) {
    const bool i8 = kind == LT_INT8;
    const int es_ab = i8 ? 1 : 2, es_d = i8 ? 4 : 2;
    const int32_t ialpha = 1, ibeta = 0;
    const float falpha = 1.0f, fbeta = 0.0f;
    const int aa = alignment(A, K * es_ab), ab_ = alignment(B, K * es_ab), ad = alignment(D, M * es_d);
    const plan_key key{kind, device, M, N, K, aa, ab_, ad, bias ? alignment(bias, 0) : 0};
    void *ws = nullptr;
    size_t wsb = 0;
    cublasStatus_t cs;

    if (M == 0 || N == 0) return 0;
    if (K == 0) { /* an empty sum: cuBLASLt takes no zero-sized layouts; D = 0 (+ bias) */
        if (bias) /* only the fp16 kind has a bias */
            L8_CUDA_CHECK(st, fill_columns(static_cast<__half *>(D), static_cast<const __half *>(bias), M, N, s));
        else
            L8_CUDA_CHECK(st, cudaMemsetAsync(D, 0, (size_t)(M * N) * (size_t)es_d, s));
        return 0;
    }
    {
        /* Held through cublasLtMatmul: the plan's descriptor is shared and the bias pointer
         * is set on it for this call. Enqueueing is host work of a few microseconds. */
        std::lock_guard<std::mutex> lock(ctx->mu);
        auto it = ctx->plans.find(key);
        if (it == ctx->plans.end()) {
            if (ctx->plans.size() >= MAX_PLANS) { /* every plan is used under the lock only */
                for (auto &kv : ctx->plans) destroy_plan(kv.second);
                ctx->plans.clear();
            }
            lt_plan p;
            if (make_plan(ctx->devs[device].lt, i8, M, N, K, bias, aa, ab_, ad, &p, st) < 0) return -1;
            try {
                it = ctx->plans.emplace(key, p).first;
            } catch (...) {
                destroy_plan(p);
                throw;
            }
        }
        lt_plan &p = it->second;
        if (!p.supported) return 1;
        wsb = p.ws;
        if (wsb > 0 && l8_cuda_alloc(&ws, wsb, s, st) < 0) return -1;
        if (bias)
            L8_CUBLAS_CHECK(st, cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                                               sizeof bias));
        cs = cublasLtMatmul(ctx->devs[device].lt, p.op, i8 ? (const void *)&ialpha : (const void *)&falpha, A, p.la,
                            B, p.lb, i8 ? (const void *)&ibeta : (const void *)&fbeta, D, p.ld, D, p.ld, &p.algo, ws,
                            wsb, s);
        if (cs == CUBLAS_STATUS_NOT_SUPPORTED) p.supported = false; /* do not try this shape again */
    }
    l8_cuda_free(ws, s); /* stream-ordered: after the matmul */
    ws = nullptr;
    if (cs == CUBLAS_STATUS_NOT_SUPPORTED) {
        (void)cudaGetLastError();
        return 1;
    }
    L8_CUBLAS_CHECK(st, cs);
    return 0;
fail:
    l8_cuda_free(ws, s);
    return -1;
}

int lt_matmul(l8_cuda_ctx *ctx, int device, int kind, const void *A, const void *B, void *D, int64_t M, int64_t N,
              int64_t K, const void *bias, cudaStream_t s, l8_status *st) {
    return no_throw(st, [&] { return lt_matmul_throwing(ctx, device, kind, A, B, D, M, N, K, bias, s, st); });
}

/* ------------------------------------------------------------------ tiled int8 GEMM */

/* The fallback when cuBLASLt has no int8 algorithm: C (m, ldc) int32 = A (m, kp) int8 @
 * W (np, kp)^T for the np columns, 64 x 64 output tiles, 64 bytes of k per step through
 * shared memory, dp4a. Exact in int32 like every other path (the sums are the same
 * integers). Rows of A and W are read as int32 words: kp % 4 == 0 and 4-byte aligned rows. */
constexpr int TL_M = 64, TL_N = 64, TL_KW = 16, TL_THREADS = 256;
static_assert(TL_THREADS == 256 && TL_M == 64 && TL_N == 64, "each thread owns a 4 x 4 block of the tile");

__global__ void __launch_bounds__(TL_THREADS)
tiled_s8_kernel(const int8_t *__restrict__ A, const int8_t *__restrict__ W, int64_t m, int64_t np, int64_t kp,
                int32_t *__restrict__ C, int64_t ldc) {
    __shared__ int As[TL_M][TL_KW + 1]; /* +1: conflict-free column reads */
    __shared__ int Ws[TL_N][TL_KW + 1];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int64_t i0 = (int64_t)blockIdx.x * TL_M, j0 = (int64_t)blockIdx.y * TL_N;
    const int64_t kw = kp / 4;
    const int *Aw = reinterpret_cast<const int *>(A), *Ww = reinterpret_cast<const int *>(W);
    int acc[4][4] = {};
    for (int64_t w0 = 0; w0 < kw; w0 += TL_KW) {
        for (int e = tid; e < TL_M * TL_KW; e += TL_THREADS) {
            const int r = e / TL_KW, c = e % TL_KW;
            const int64_t w = w0 + c, i = i0 + r, j = j0 + r;
            As[r][c] = i < m && w < kw ? Aw[i * kw + w] : 0;
            Ws[r][c] = j < np && w < kw ? Ww[j * kw + w] : 0;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < TL_KW; c++) {
            int a[4], b[4];
#pragma unroll
            for (int r = 0; r < 4; r++) a[r] = As[ty + 16 * r][c];
#pragma unroll
            for (int q = 0; q < 4; q++) b[q] = Ws[tx + 16 * q][c];
#pragma unroll
            for (int r = 0; r < 4; r++)
#pragma unroll
                for (int q = 0; q < 4; q++) acc[r][q] = __dp4a(a[r], b[q], acc[r][q]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const int64_t i = i0 + ty + 16 * r;
        if (i >= m) break;
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int64_t j = j0 + tx + 16 * q;
            if (j < np) C[i * ldc + j] = acc[r][q];
        }
    }
}

cudaError_t tiled_s8(const int8_t *A, const int8_t *W, int64_t m, int64_t np, int64_t kp, int32_t *C, int64_t ldc,
                     cudaStream_t s) {
    if (m == 0 || np == 0) return cudaSuccess;
    const int64_t gx = (m + TL_M - 1) / TL_M, gy = (np + TL_N - 1) / TL_N;
    if (kp % 4 != 0 || ldc < np || gx > 0x7fffffff || gy > 65535 || ((uintptr_t)A | (uintptr_t)W) % 4 != 0)
        return cudaErrorInvalidValue;
    tiled_s8_kernel<<<dim3((unsigned)gx, (unsigned)gy), TL_THREADS, 0, s>>>(A, W, m, np, kp, C, ldc);
    return cudaGetLastError();
}

} // namespace

int l8_lt_int8_gemm(l8_cuda_ctx *ctx, int device, const int8_t *A, const int8_t *W, int32_t *C, int64_t m,
                    int64_t np, int64_t kp, cudaStream_t s, l8_status *st) {
    const int r = lt_matmul(ctx, device, LT_INT8, W, A, C, np, m, kp, nullptr, s, st);
    if (r <= 0) return r;
    /* no cuBLASLt algorithm for this shape on this GPU: the tiled kernel, same integers */
    L8_CUDA_CHECK(st, tiled_s8(A, W, m, np, kp, C, np, s));
    return 0;
fail:
    return -1;
}

/* ================================================================== epilogue */

namespace {

/* ------------------------------------------------------------------ dequant */

constexpr int DQ_THREADS = 256, DQ_M = 32, DQ_N = 128, DQ_O = 32;
static_assert(DQ_N == 32 * 4, "a warp covers a tile row with 4 columns per lane");
static_assert(DQ_M == (DQ_THREADS / 32) * 4, "each warp owns 4 tile rows");

template <typename TY>
__device__ __forceinline__ void store4(TY *p, const float (&v)[4], int64_t nvalid, bool vec);

template <>
__device__ __forceinline__ void store4<float>(float *p, const float (&v)[4], int64_t nvalid, bool vec) {
    if (vec && nvalid >= 4) {
        *reinterpret_cast<float4 *>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        for (int c = 0; c < 4 && c < nvalid; c++) p[c] = v[c];
    }
}

template <>
__device__ __forceinline__ void store4<__half>(__half *p, const float (&v)[4], int64_t nvalid, bool vec) {
    if (vec && nvalid >= 4) {
        __half h[4] = {__float2half_rn(v[0]), __float2half_rn(v[1]), __float2half_rn(v[2]), __float2half_rn(v[3])};
        *reinterpret_cast<uint2 *>(p) = *reinterpret_cast<const uint2 *>(h);
    } else {
        for (int c = 0; c < 4 && c < nvalid; c++) p[c] = __float2half_rn(v[c]);
    }
}

template <typename TY>
__global__ void __launch_bounds__(DQ_THREADS)
dequant_kernel(const int32_t *__restrict__ C, int64_t ldc, int64_t m, int64_t n, const float *__restrict__ sx,
               const float *__restrict__ sw, const float *__restrict__ bias, const l8_outlier_ops O,
               TY *__restrict__ y, bool vec) {
    __shared__ float xs[DQ_M][DQ_O + 1];
    __shared__ __align__(16) float ws[DQ_O][DQ_N + 4];
    const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const int64_t tile_i = (int64_t)blockIdx.x * DQ_M, tile_j = (int64_t)blockIdx.y * DQ_N;
    const int64_t i0 = tile_i + ty * 4, j0 = tile_j + tx * 4;
    float os[4][4] = {};
    const int total = O.counts ? O.counts[0] : 0;
    for (int o0 = 0; o0 < total; o0 += DQ_O) {
        const int lim = total - o0 < DQ_O ? total - o0 : DQ_O;
        for (int e = threadIdx.x; e < DQ_M * DQ_O; e += DQ_THREADS) {
            const int r = e / DQ_O, oo = e % DQ_O;
            xs[r][oo] = tile_i + r < m && oo < lim ? outlier_x(O, tile_i + r, o0 + oo) : 0.0f;
        }
        for (int e = threadIdx.x; e < DQ_O * DQ_N; e += DQ_THREADS) {
            const int oo = e / DQ_N, c = e % DQ_N;
            ws[oo][c] = tile_j + c < n && oo < lim ? outlier_w(O, o0 + oo, tile_j + c, n) : 0.0f;
        }
        __syncthreads();
        for (int oo = 0; oo < lim; oo++) { /* ascending o: the CPU's summation order */
            const float4 w4 = *reinterpret_cast<const float4 *>(&ws[oo][tx * 4]);
            const float wv[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const float xv = xs[ty * 4 + r][oo];
#pragma unroll
                for (int c = 0; c < 4; c++) os[r][c] = __fadd_rn(os[r][c], __fmul_rn(xv, wv[c]));
            }
        }
        __syncthreads();
    }
    if (j0 >= n) return;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        const int64_t i = i0 + r;
        if (i >= m) break;
        /* ldc is a multiple of 4 and j0 < n <= ldc, so the 16-byte load stays in the row */
        const int4 a = *reinterpret_cast<const int4 *>(C + i * ldc + j0);
        const int32_t av[4] = {a.x, a.y, a.z, a.w};
        float v[4];
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const int64_t j = j0 + c < n ? j0 + c : n - 1; /* clamped lanes are not stored */
            v[c] = finish(av[c], sx[i], sw[j], os[r][c], bias ? bias + j : nullptr);
        }
        store4<TY>(y + i * n + j0, v, n - j0, vec);
    }
}

/* ------------------------------------------------------------------ GEMV */

constexpr int GV_WARPS = 4, GV_COLS = 4; /* a block covers 16 = L8_CUDA_PAD output columns */
constexpr int GV_OUT = 8;                 /* outlier entries gathered at once in the epilogue */
static_assert(GV_WARPS * GV_COLS == L8_CUDA_PAD, "the grid covers the padded rows exactly");

template <int MT>
__global__ void __launch_bounds__(GV_WARPS * 32)
gemv_kernel(const int8_t *__restrict__ A, const int8_t *__restrict__ W, int64_t m, int64_t kp, int64_t n,
            const float *__restrict__ sx, const float *__restrict__ sw, const float *__restrict__ bias,
            const l8_outlier_ops O, void *__restrict__ y, bool y_f16, int32_t *__restrict__ raw, int64_t ldr) {
    static_assert(MT * GV_COLS <= 32, "one lane finishes each (row, column) pair");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t j0 = ((int64_t)blockIdx.x * GV_WARPS + warp) * GV_COLS;
    const int64_t nk = kp / 16;
    const int4 *Wv = reinterpret_cast<const int4 *>(W) + j0 * nk;
    const int4 *Av = reinterpret_cast<const int4 *>(A);
    int acc[MT][GV_COLS] = {};
#pragma unroll 2
    for (int64_t c = lane; c < nk; c += 32) {
        int4 w[GV_COLS];
#pragma unroll
        for (int r = 0; r < GV_COLS; r++) w[r] = __ldg(Wv + r * nk + c);
#pragma unroll
        for (int i = 0; i < MT; i++) {
            const int4 a = i < m ? __ldg(Av + i * nk + c) : make_int4(0, 0, 0, 0);
#pragma unroll
            for (int r = 0; r < GV_COLS; r++) {
                acc[i][r] = __dp4a(a.x, w[r].x, acc[i][r]);
                acc[i][r] = __dp4a(a.y, w[r].y, acc[i][r]);
                acc[i][r] = __dp4a(a.z, w[r].z, acc[i][r]);
                acc[i][r] = __dp4a(a.w, w[r].w, acc[i][r]);
            }
        }
    }
    int mine = 0;
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int r = 0; r < GV_COLS; r++) {
            int v = acc[i][r];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == i * GV_COLS + r) mine = v; /* constant indices keep acc in registers */
        }
    const int64_t i = lane / GV_COLS, j = j0 + lane % GV_COLS;
    if (i >= MT || i >= m || j >= n) return;
    if (raw) {
        raw[i * ldr + j] = mine;
        return;
    }
    float osum = 0.0f;
    const int total = O.counts ? O.counts[0] : 0;
    int o = 0;
    /* the loads of GV_OUT entries first (independent gathers, in flight together), then
     * their products added in ascending o: the CPU's summation order */
    for (; o + GV_OUT <= total; o += GV_OUT) {
        float xv[GV_OUT], wv[GV_OUT];
#pragma unroll
        for (int u = 0; u < GV_OUT; u++) {
            xv[u] = outlier_x(O, i, o + u);
            wv[u] = outlier_w(O, o + u, j, n);
        }
#pragma unroll
        for (int u = 0; u < GV_OUT; u++) osum = __fadd_rn(osum, __fmul_rn(xv[u], wv[u]));
    }
    osum = outlier_sum(O, o, total, i, j, n, osum);
    const float v = finish(mine, sx[i], sw[j], osum, bias ? bias + j : nullptr);
    if (y_f16)
        static_cast<__half *>(y)[i * n + j] = __float2half_rn(v);
    else
        static_cast<float *>(y)[i * n + j] = v;
}

} // namespace

/* ================================================================== launchers */

cudaError_t l8_dequant_cuda(const int32_t *C, int64_t ldc, int64_t m, int64_t n, const float *sx, const float *sw,
                            const float *bias, const l8_outlier_ops *O, void *y, l8_dtype yt, cudaStream_t s) {
    if (m == 0 || n == 0) return cudaSuccess;
    const int64_t gy = (n + DQ_N - 1) / DQ_N;
    if (gy > 65535 || ldc % 4 != 0) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)((m + DQ_M - 1) / DQ_M), (unsigned)gy);
    const bool vec = n % 4 == 0;
    if (yt == L8_F16)
        dequant_kernel<__half><<<grid, DQ_THREADS, 0, s>>>(C, ldc, m, n, sx, sw, bias, *O, static_cast<__half *>(y), vec);
    else
        dequant_kernel<float><<<grid, DQ_THREADS, 0, s>>>(C, ldc, m, n, sx, sw, bias, *O, static_cast<float *>(y), vec);
    return cudaGetLastError();
}

cudaError_t l8_gemv_s8_cuda(const int8_t *A, const int8_t *W, int64_t m, int64_t np, int64_t kp, int64_t n,
                            const float *sx, const float *sw, const float *bias, const l8_outlier_ops *O, void *y,
                            l8_dtype yt, int32_t *raw, int64_t ldr, cudaStream_t s) {
    if (m == 0 || n == 0) return cudaSuccess;
    if (m > L8_CUDA_GEMV_MAX_M || np % L8_CUDA_PAD != 0 || kp % 16 != 0) return cudaErrorInvalidValue;
    const dim3 grid((unsigned)(np / L8_CUDA_PAD)), block(GV_WARPS * 32);
    const bool f16 = yt == L8_F16;
    static_assert(L8_CUDA_GEMV_MAX_M == 8, "instantiations below cover m <= 8");
    if (m <= 1)
        gemv_kernel<1><<<grid, block, 0, s>>>(A, W, m, kp, n, sx, sw, bias, *O, y, f16, raw, ldr);
    else if (m <= 2)
        gemv_kernel<2><<<grid, block, 0, s>>>(A, W, m, kp, n, sx, sw, bias, *O, y, f16, raw, ldr);
    else if (m <= 4)
        gemv_kernel<4><<<grid, block, 0, s>>>(A, W, m, kp, n, sx, sw, bias, *O, y, f16, raw, ldr);
    else
        gemv_kernel<8><<<grid, block, 0, s>>>(A, W, m, kp, n, sx, sw, bias, *O, y, f16, raw, ldr);
    return cudaGetLastError();
}

/* ================================================================== entry points */

extern "C" int l8_cuda_int8_matmul(l8_cuda_ctx *ctx, int device, const int8_t *A, const int8_t *B, int64_t m,
                                   int64_t n, int64_t k, int32_t *C, int path, cudaStream_t s, l8_status *st) {
    /* mpad: the token rows padded to a multiple of 32 for cuBLASLt, whose int8 (IMMA)
     * heuristic may find no algorithm for a few rows; the extra rows of Ap (zeroed below)
     * and Cp are computed but never copied out */
    const int64_t kp = l8_pad(k), np = l8_pad(n), mpad = (m + 31) & ~(int64_t)31;
    int8_t *Ap = nullptr, *Bp = nullptr;
    int32_t *Cp = nullptr;
    int prev = -1, rc = -1;
    l8_outlier_ops none = {};
    if (path < 0 || path > 3)
        return l8_fail(st, L8_ERR_VALUE, "path must be 0 (auto), 1 (GEMV), 2 (cuBLASLt) or 3 (tiled), got %d", path);
    if (path == 1 && m > L8_CUDA_GEMV_MAX_M)
        return l8_fail(st, L8_ERR_VALUE, "the GEMV path takes m <= %d rows, got %lld", L8_CUDA_GEMV_MAX_M,
                       (long long)m);
    if (m == 0 || n == 0) return 0;
    if (l8_cuda_ctx_device(ctx, device, st) < 0 || l8_cuda_push_device(device, &prev, st) < 0) return -1;
    /* the layouts the kernels take: rows padded to kp with zeros, np weight rows */
    if (l8_cuda_alloc((void **)&Ap, (size_t)(mpad * kp), s, st) < 0) goto fail;
    if (l8_cuda_alloc((void **)&Bp, (size_t)(np * kp), s, st) < 0) goto fail;
    if (l8_cuda_alloc((void **)&Cp, (size_t)(mpad * np) * sizeof(int32_t), s, st) < 0) goto fail;
    L8_CUDA_CHECK(st, cudaMemsetAsync(Ap, 0, (size_t)(mpad * kp), s));
    L8_CUDA_CHECK(st, cudaMemsetAsync(Bp, 0, (size_t)(np * kp), s));
    if (k > 0) { /* k == 0: nothing to copy (and zero pitches) */
        L8_CUDA_CHECK(st, cudaMemcpy2DAsync(Ap, (size_t)kp, A, (size_t)k, (size_t)k, (size_t)m,
                                            cudaMemcpyDeviceToDevice, s));
        L8_CUDA_CHECK(st, cudaMemcpy2DAsync(Bp, (size_t)kp, B, (size_t)k, (size_t)k, (size_t)n,
                                            cudaMemcpyDeviceToDevice, s));
    }
    if (path == 1 || (path == 0 && m <= L8_CUDA_GEMV_MAX_M)) {
        L8_CUDA_CHECK(st, l8_gemv_s8_cuda(Ap, Bp, m, np, kp, n, nullptr, nullptr, nullptr, &none, nullptr, L8_F32, Cp,
                                          np, s));
    } else if (path == 3) {
        L8_CUDA_CHECK(st, tiled_s8(Ap, Bp, mpad, np, kp, Cp, np, s));
    } else if (l8_lt_int8_gemm(ctx, device, Ap, Bp, Cp, mpad, np, kp, s, st) < 0) {
        goto fail;
    }
    L8_CUDA_CHECK(st, cudaMemcpy2DAsync(C, (size_t)n * 4, Cp, (size_t)np * 4, (size_t)n * 4, (size_t)m,
                                        cudaMemcpyDeviceToDevice, s));
    rc = 0;
fail:
    l8_cuda_free(Ap, s);
    l8_cuda_free(Bp, s);
    l8_cuda_free(Cp, s);
    l8_cuda_pop_device(prev);
    return rc;
}

extern "C" int l8_cuda_fp16_linear(l8_cuda_ctx *ctx, int device, const void *x, const void *w, const void *bias,
                                   void *y, int64_t m, int64_t n, int64_t k, cudaStream_t s, l8_status *st) {
    int prev = -1, rc;
    if (m == 0) return 0;
    if (l8_cuda_ctx_device(ctx, device, st) < 0 || l8_cuda_push_device(device, &prev, st) < 0) return -1;
    {
        const bool split = bias && k > 0 && alignment(bias, 0) < LT_BIAS_ALIGN;
        rc = lt_matmul(ctx, device, LT_FP16, w, x, y, n, m, k, split ? nullptr : bias, s, st);
        if (rc > 0) /* the baseline has no fallback */
            rc = l8_fail(st, L8_ERR_RUNTIME,
                         "cuBLASLt has no fp16 algorithm for (m, n, k) = (%lld, %lld, %lld) on this GPU", (long long)m,
                         (long long)n, (long long)k);
        if (rc == 0 && split) {
            const cudaError_t e = add_columns(static_cast<__half *>(y), static_cast<const __half *>(bias), n, m, s);
            if (e != cudaSuccess) rc = l8_cuda_fail(st, e, "add_columns(y, bias)", __FILE__, __LINE__);
        }
    }
    l8_cuda_pop_device(prev);
    return rc;
}
