/* linear_cuda.cu: the CUDA backend of Int8Linear (the l8_backend table) and its
 * forward on device memory. CPU reference: linear_cpu.c, which this matches bit for bit.
 *
 * Forward, for x (m, in) on the device, all on one stream, no host synchronization:
 *   1. l8_quantize_x_cuda: int8 x with provisional row scales, dynamic outlier flags;
 *   2. (outliers) l8_outliers_compact_cuda / l8_outliers_fix_cuda: the sorted outlier
 *      list, exact scales, the compact fp16 outlier activations and (same launch) the
 *      dequantized weight columns of dynamic outliers;
 *   3. the cuBLASLt int8 GEMM and one l8_dequant_cuda pass over its int32 result, in row
 *      chunks whose int32 product stays under I32_CHUNK_BYTES (256 MiB); or, on Hopper
 *      with the sm90 GEMM built and selected (L8_FUSED_GEMM), one CUTLASS GEMM whose
 *      epilogue writes y (gemm_sm90.cuh; sm90_fits says when).
 * For m <= L8_CUDA_GEMV_MAX_M (decoding) steps 1-2 run as one single-block launch
 * (l8_quantize_small_m_cuda) and 3 is the GEMV kernel with the epilogue fused: two
 * launches per forward.
 * Launches for m > L8_CUDA_GEMV_MAX_M: with a threshold, memset (dflag), quantize,
 * compact, fix, then GEMM + dequant per row chunk; without a threshold but with known
 * outlier columns: no memset; with neither: quantize, GEMM, dequant.
 * Temporaries come from the device's memory pool in one stream-ordered allocation per
 * call (the GEMM's workspace in another, only when its algorithm needs one). The layer's
 * weights are plain cudaMalloc memory, padded (gemm_cuda.h).
 *
 * Graph capture: a forward queues only kernels, memsets, cuBLASLt calls and
 * stream-ordered allocations on its stream; no host synchronization, event or
 * synchronous allocation, so it can be captured in a CUDA graph.
 *
 * Non-finite x on the device is not checked (it would take a host synchronization); the
 * result is defined in cuda_common.h (l8_cuda_linear_forward): NaN / Inf stay in the
 * rows that hold them, never a crash. forward_host (x in host memory) checks and raises,
 * as the CPU backend does.
 *
 * Build: setup.py compiles every .cu file in csrc with nvcc (python setup.py build_ext --inplace).
 * Check: pytest tests/test_cuda.py (CUDA against the CPU backend). Time: benchmarks/bench_linear.py.
 */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <stdlib.h>

#include <algorithm>
#include <new>

#include "gemm_cuda.h"
#include "fused_cuda.h"
#include "quantize_cuda.h"

extern "C" {
#include "quantize.h"
}

namespace {

/* Dynamic outlier columns whose weights and activations get compact fp16 copies; more
 * than this in one call is still exact, only slower (gathered from x and the int8
 * weight). LLM activations have a handful to a few dozen. */
constexpr int DYN_CAP = 256;

/* The int32 product of the cuBLASLt path is at most this big: longer inputs run the GEMM
 * and its epilogue in row chunks, which bounds the scratch memory of a long prefill. */
constexpr int64_t I32_CHUNK_BYTES = 256ll << 20;

/* The token rows handed to the cuBLASLt int8 GEMM: padded to a multiple of 32, since its
 * IMMA heuristic may find no algorithm (or NOT_SUPPORTED) for a few rows. The quantize
 * kernel zeroes the padding rows of xq (the GEMM reads them; uninitialized reads would be
 * harmless for the result, but every prefill would trip compute-sanitizer initcheck);
 * their int32 results land in the padding rows of C, which l8_dequant_cuda never reads. */
int64_t gemm_rows(int64_t rows) { return (rows + 31) & ~(int64_t)31; }

/* Rows per chunk: equal chunks, a multiple of 128 rows (whole GEMM tiles). */
int64_t chunk_rows(int64_t m, int64_t np) {
    const int64_t bytes = m * np * 4;
    if (bytes <= I32_CHUNK_BYTES) return m;
    const int64_t chunks = (bytes + I32_CHUNK_BYTES - 1) / I32_CHUNK_BYTES;
    const int64_t rows = ((m + chunks - 1) / chunks + 127) / 128 * 128;
    return rows < m ? rows : m;
}

struct cuda_impl {
    l8_cuda_ctx *ctx;
    int64_t kp, np;
    int8_t *wq;          /* (np, kp), zero padding */
    float *wscale;       /* (n,) */
    float *bias;         /* (n,) or NULL */
    __half *wk;          /* (n_known, n): the known columns' weights, transposed */
    uint8_t *kflag;      /* (k,) 1 in known columns; NULL without known columns */
    int32_t *known_pos;  /* (k,) position in the known list or -1; NULL likewise */
    /* Columns whose int8 weight, dequantized (wq * (wscale / 127)) and rounded to fp16, is
     * not finite in some row: a float16 forward that finds one of them as a dynamic
     * outlier fails, as the CPU backend does. Found when the layer is built; all NULL
     * (nothing to check at run time) when there is none, the usual case. */
    uint8_t *ovf;        /* device (k,) */
    int32_t *ovf_row;    /* host (k,): the first such row of each column, or -1 */
    double *ovf_val;     /* host (k,): its dequantized value (for the message) */
    float *wdiv;         /* (n,) wscale / 127 for the sm90 GEMM's epilogue; NULL without it or a threshold */
    /* the device's, read once when the layer is built (the dispatch needs them every call) */
    int sms;             /* multiprocessors */
    int smem_optin;      /* a block's shared memory limit, opted in */
    bool cc90;           /* compute capability 9.0: what the sm_90a cubin runs on */
};

void free_impl(cuda_impl *c) {
    cudaFree(c->wq);
    cudaFree(c->wscale);
    cudaFree(c->bias);
    cudaFree(c->wk);
    cudaFree(c->kflag);
    cudaFree(c->known_pos);
    cudaFree(c->ovf);
    cudaFree(c->wdiv);
    free(c->ovf_row);
    free(c->ovf_val);
    (void)cudaGetLastError();
    delete c;
}

void cuda_destroy(l8_layer *L) {
    cuda_impl *c = static_cast<cuda_impl *>(L->impl);
    if (!c) return;
    l8_status ignore = {};
    int prev = -1;
    const bool pushed = l8_cuda_push_device(L->device, &prev, &ignore) == 0;
    free_impl(c); /* cudaFree waits for work still using the weights */
    if (pushed) l8_cuda_pop_device(prev);
    L->impl = nullptr;
}

/* The columns (not known ones: their weights are kept in fp16, checked when quantized)
 * whose dequantized weight rounds to a non-finite fp16 value in some row, computed as the
 * CPU backend's forward does (linear_cpu.c: wq * (wscale / 127.0f), then l8_round_f16).
 * Only a row whose scale is at least 65504 can hold one, so most layers skip every row.
 * Fills c->ovf_row / c->ovf_val when some column can overflow, else leaves them NULL.
 * -1 when out of host memory. */
int find_fp16_overflow(const l8_layer *L, const l8_weights *w, const uint8_t *known, cuda_impl *c) {
    const int64_t n = L->out_features, k = L->in_features;
    for (int64_t j = 0; j < n; j++) {
        const float sj = w->wscale[j] / 127.0f;
        if (!(128.0f * sj >= 65504.0f)) continue; /* |wq| <= 128: every value of this row fits */
        for (int64_t p = 0; p < k; p++) {
            if (known && known[p]) continue;
            const int8_t q = w->wq[j * k + p];
            if (l8_isfinite(l8_round_f16((float)q * sj))) continue;
            if (!c->ovf_row) {
                c->ovf_row = static_cast<int32_t *>(l8_malloc_array((size_t)k, sizeof(int32_t)));
                c->ovf_val = static_cast<double *>(l8_malloc_array((size_t)k, sizeof(double)));
                if (!c->ovf_row || !c->ovf_val) return -1;
                for (int64_t i = 0; i < k; i++) c->ovf_row[i] = -1;
            }
            if (c->ovf_row[p] < 0) { /* rows ascend: the first row is the CPU's */
                c->ovf_row[p] = (int32_t)j;
                c->ovf_val[p] = (double)q * sj;
            }
        }
    }
    return 0;
}

int cuda_create(l8_layer *L, const l8_weights *w, l8_status *st) {
    l8_cuda_ctx *ctx = static_cast<l8_cuda_ctx *>(L->backend_ctx);
    const int64_t n = L->out_features, k = L->in_features, no = L->n_outliers;
    const int64_t kp = l8_pad(k), np = l8_pad(n);
    int8_t *hq = nullptr;
    uint16_t *hk = nullptr;
    uint8_t *hf = nullptr;
    int32_t *hp = nullptr;
    int prev = -1, rc = -1;
    cuda_impl *c = nullptr;
    if (l8_cuda_ctx_device(ctx, L->device, st) < 0) return -1;
    if (!(c = new (std::nothrow) cuda_impl())) return l8_fail(st, L8_ERR_NOMEM, "could not allocate the layer");
    c->ctx = ctx;
    c->kp = kp;
    c->np = np;
    /* host staging in the device layouts */
    hq = static_cast<int8_t *>(calloc((size_t)(np * kp), 1));
    hk = static_cast<uint16_t *>(l8_malloc_array((size_t)(no * n), sizeof(uint16_t)));
    if (no) {
        hf = static_cast<uint8_t *>(calloc((size_t)k, 1));
        hp = static_cast<int32_t *>(l8_malloc_array((size_t)k, sizeof(int32_t)));
    }
    if (!hq || !hk || (no && (!hf || !hp))) {
        l8_fail(st, L8_ERR_NOMEM, "could not allocate host staging for a %lld x %lld weight", (long long)n,
                (long long)k);
        goto fail;
    }
    for (int64_t j = 0; j < n; j++) memcpy(hq + j * kp, w->wq + j * k, (size_t)k);
    for (int64_t j = 0; j < n; j++)
        for (int64_t o = 0; o < no; o++) hk[o * n + j] = w->wout[j * no + o];
    if (no) {
        for (int64_t j = 0; j < k; j++) hp[j] = -1;
        for (int64_t o = 0; o < no; o++) {
            hf[L->outlier_cols[o]] = 1;
            hp[L->outlier_cols[o]] = (int32_t)o;
        }
    }
    if (find_fp16_overflow(L, w, hf, c) < 0) {
        l8_fail(st, L8_ERR_NOMEM, "could not allocate %lld bytes of overflow flags", (long long)(k * 13));
        goto fail;
    }
    if (l8_cuda_push_device(L->device, &prev, st) < 0) goto fail;
    {
        int major = 0, minor = 0;
        L8_CUDA_CHECK(st, cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, L->device));
        L8_CUDA_CHECK(st, cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, L->device));
        L8_CUDA_CHECK(st, cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, L->device));
        L8_CUDA_CHECK(st, cudaDeviceGetAttribute(&c->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, L->device));
        c->cc90 = major == 9 && minor == 0;
    }
    L8_CUDA_CHECK(st, cudaMalloc(&c->wq, (size_t)(np * kp)));
    L8_CUDA_CHECK(st, cudaMalloc(&c->wscale, (size_t)n * sizeof(float)));
    L8_CUDA_CHECK(st, cudaMemcpy(c->wq, hq, (size_t)(np * kp), cudaMemcpyHostToDevice));
    L8_CUDA_CHECK(st, cudaMemcpy(c->wscale, w->wscale, (size_t)n * sizeof(float), cudaMemcpyHostToDevice));
    if (L->has_bias) {
        L8_CUDA_CHECK(st, cudaMalloc(&c->bias, (size_t)n * sizeof(float)));
        L8_CUDA_CHECK(st, cudaMemcpy(c->bias, w->bias, (size_t)n * sizeof(float), cudaMemcpyHostToDevice));
    }
    if (no) {
        L8_CUDA_CHECK(st, cudaMalloc(&c->wk, (size_t)(no * n) * sizeof(__half)));
        L8_CUDA_CHECK(st, cudaMalloc(&c->kflag, (size_t)k));
        L8_CUDA_CHECK(st, cudaMalloc(&c->known_pos, (size_t)k * sizeof(int32_t)));
        L8_CUDA_CHECK(st, cudaMemcpy(c->wk, hk, (size_t)(no * n) * sizeof(__half), cudaMemcpyHostToDevice));
        L8_CUDA_CHECK(st, cudaMemcpy(c->kflag, hf, (size_t)k, cudaMemcpyHostToDevice));
        L8_CUDA_CHECK(st, cudaMemcpy(c->known_pos, hp, (size_t)k * sizeof(int32_t), cudaMemcpyHostToDevice));
    }
#ifdef LLMINT8_SM90_GEMM
    if (L->threshold > 0.0f) { /* the quotient the other paths compute in device code (__fdiv_rn): IEEE on both */
        float *hd = static_cast<float *>(l8_malloc_array((size_t)n, sizeof(float)));
        if (!hd) {
            l8_fail(st, L8_ERR_NOMEM, "could not allocate %lld weight scales", (long long)n);
            goto fail;
        }
        for (int64_t j = 0; j < n; j++) hd[j] = w->wscale[j] / 127.0f;
        const cudaError_t e1 = cudaMalloc(&c->wdiv, (size_t)n * sizeof(float));
        const cudaError_t e2 = e1 == cudaSuccess ? cudaMemcpy(c->wdiv, hd, (size_t)n * sizeof(float), cudaMemcpyHostToDevice) : e1;
        free(hd);
        L8_CUDA_CHECK(st, e2);
    }
#endif
    if (c->ovf_row) {
        uint8_t *hv = static_cast<uint8_t *>(calloc((size_t)k, 1));
        if (!hv) {
            l8_fail(st, L8_ERR_NOMEM, "could not allocate %lld bytes of overflow flags", (long long)k);
            goto fail;
        }
        for (int64_t p = 0; p < k; p++) hv[p] = c->ovf_row[p] >= 0;
        const cudaError_t e1 = cudaMalloc(&c->ovf, (size_t)k);
        const cudaError_t e2 = e1 == cudaSuccess ? cudaMemcpy(c->ovf, hv, (size_t)k, cudaMemcpyHostToDevice) : e1;
        free(hv);
        L8_CUDA_CHECK(st, e2);
    }
    /* cudaMemcpy from pageable memory may return before its DMA lands, and a forward on a
     * non-blocking stream is not ordered after the legacy stream: finish the uploads here. */
    L8_CUDA_CHECK(st, cudaDeviceSynchronize());
    L->impl = c;
    L->nbytes = (size_t)(np * kp) + (size_t)n * sizeof(float) * (L->has_bias ? 2 : 1) +
                (size_t)(no * n) * sizeof(__half) + (no ? (size_t)k * 5 : 0) + (c->ovf ? (size_t)k : 0) +
                (c->wdiv ? (size_t)n * sizeof(float) : 0);
    c = nullptr;
    rc = 0;
fail:
    if (c) free_impl(c);
    l8_cuda_pop_device(prev);
    free(hq);
    free(hk);
    free(hf);
    free(hp);
    return rc;
}

int cuda_export(const l8_layer *L, l8_weights *out, l8_status *st) {
    const cuda_impl *c = static_cast<const cuda_impl *>(L->impl);
    const int64_t n = L->out_features, k = L->in_features, no = L->n_outliers;
    uint16_t *hk = nullptr;
    int prev = -1, rc = -1;
    if (l8_cuda_push_device(L->device, &prev, st) < 0) return -1;
    if (!(hk = static_cast<uint16_t *>(l8_malloc_array((size_t)(no * n), sizeof(uint16_t))))) {
        l8_fail(st, L8_ERR_NOMEM, "could not allocate %lld bytes", (long long)(no * n * 2));
        goto fail;
    }
    L8_CUDA_CHECK(st, cudaMemcpy2D(out->wq, (size_t)k, c->wq, (size_t)c->kp, (size_t)k, (size_t)n,
                                   cudaMemcpyDeviceToHost));
    L8_CUDA_CHECK(st, cudaMemcpy(out->wscale, c->wscale, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost));
    if (L->has_bias && out->bias)
        L8_CUDA_CHECK(st, cudaMemcpy(out->bias, c->bias, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost));
    if (no) {
        L8_CUDA_CHECK(st, cudaMemcpy(hk, c->wk, (size_t)(no * n) * sizeof(uint16_t), cudaMemcpyDeviceToHost));
        for (int64_t j = 0; j < n; j++)
            for (int64_t o = 0; o < no; o++) out->wout[j * no + o] = hk[o * n + j];
    }
    rc = 0;
fail:
    free(hk);
    l8_cuda_pop_device(prev);
    return rc;
}

/* Carve one pool allocation into 256-byte aligned pieces. */
struct carver {
    size_t off = 0;
    size_t take(size_t bytes) {
        size_t o = off;
        off += (bytes + 255) / 256 * 256;
        return o;
    }
};

int cuda_forward_host(const l8_layer *L, const void *x, l8_dtype xt, int64_t m, void *y, l8_dtype yt, int nthreads,
                      l8_status *st) {
    (void)nthreads;
    const cuda_impl *c = static_cast<const cuda_impl *>(L->impl);
    const int64_t k = L->in_features, n = L->out_features;
    const cudaStream_t s = l8_cuda_ctx_stream(c->ctx);
    const size_t xb = (size_t)(m * k) * l8_dtype_size(xt), yb = (size_t)(m * n) * l8_dtype_size(yt);
    void *xd = nullptr, *yd = nullptr;
    int prev = -1, rc = -1;
    if (m == 0) return 0;
    const int64_t bad = l8_find_nonfinite(x, xt, m * k);
    if (bad >= 0)
        return l8_fail(st, L8_ERR_VALUE, "x contains NaN or Inf at row %lld, column %lld; expected finite values",
                       (long long)(bad / k), (long long)(bad % k));
    if (l8_cuda_push_device(L->device, &prev, st) < 0) return -1;
    if (l8_cuda_alloc(&xd, xb, s, st) < 0 || l8_cuda_alloc(&yd, yb, s, st) < 0) goto fail;
    L8_CUDA_CHECK(st, cudaMemcpyAsync(xd, x, xb, cudaMemcpyHostToDevice, s));
    if (l8_cuda_linear_forward(L, xd, xt, m, yd, yt, s, st) < 0) goto fail;
    L8_CUDA_CHECK(st, cudaMemcpyAsync(y, yd, yb, cudaMemcpyDeviceToHost, s));
    L8_CUDA_CHECK(st, cudaStreamSynchronize(s));
    rc = 0;
fail:
    l8_cuda_free(xd, s);
    l8_cuda_free(yd, s);
    l8_cuda_pop_device(prev);
    return rc;
}

bool capturing(cudaStream_t s) {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(s, &cs) != cudaSuccess) { /* e.g. the legacy stream while another captures */
        (void)cudaGetLastError();
        return true;
    }
    return cs != cudaStreamCaptureStatusNone;
}

int first_ovf_column(const l8_layer *L, const cuda_impl *c) {
    for (int64_t p = 0; p < L->in_features; p++)
        if (c->ovf_row[p] >= 0) return (int)p;
    return -1;
}

/* The CPU backend's error (l8_fail_f16_weight) for dynamic outlier column col. */
int ovf_error(const l8_layer *L, const cuda_impl *c, int col, l8_status *st) {
    (void)L;
    return l8_fail_f16_weight(st, col, c->ovf_row[col], c->ovf_val[col]);
}

/* Whether the one-launch decoding kernel takes this call: selected in the context, few
 * enough rows, and int8 x fits in a block's shared memory on this device. */
bool fused_decode_fits(const l8_layer *L, const cuda_impl *c, int64_t m) {
    if (!(l8_cuda_ctx_fused(c->ctx) & L8_FUSED_DECODE) || m > L8_CUDA_FUSED_MAX_M) return false;
    const size_t smem = l8_fused_decode_smem(m, L->in_features, c->kp);
    return smem <= (size_t)c->smem_optin && smem <= L8_FUSED_DECODE_SMEM_MAX;
}

#ifdef LLMINT8_SM90_GEMM
/* Known outlier columns beyond which a layer keeps the cuBLASLt path: the sm90 GEMM's
 * epilogue sums the outlier terms of every output element itself (m x n x c terms, past
 * the first 16 gathered from global memory), which costs more than the int32 round trip
 * it saves once c is large.
 * Dynamic columns are found on the device, so a call with many of them stays exact
 * there, only slower. */
constexpr int64_t SM90_MAX_KNOWN = 64;
#endif

/* Whether the sm90 GEMM takes this call (m > L8_CUDA_GEMV_MAX_M): built, selected in the
 * context, a compute capability 9.0 device, TMA-storable y (16-byte aligned rows) and
 * sizes in CUTLASS's int problem shape. */
bool sm90_fits(const l8_layer *L, const cuda_impl *c, int64_t m, const void *y, l8_dtype yt) {
#ifdef LLMINT8_SM90_GEMM
    if (!c->cc90 || !(l8_cuda_ctx_fused(c->ctx) & L8_FUSED_GEMM) || L->n_outliers > SM90_MAX_KNOWN) return false;
    const int64_t ys = (int64_t)l8_dtype_size(yt), n = L->out_features;
    return (uintptr_t)y % 16 == 0 && (n * ys) % 16 == 0 && m <= INT_MAX && c->kp <= INT_MAX && n <= INT_MAX;
#else
    (void)L, (void)c, (void)m, (void)y, (void)yt;
    return false;
#endif
}

/* The forward through the decoding kernel (one launch; with check_ovf, a 4-byte verdict
 * read back with one synchronization, as on the other paths). Device current. */
int fused_decode_forward(const l8_layer *L, const cuda_impl *c, const void *x, l8_dtype xt, int64_t m, void *y,
                         l8_dtype yt, bool check_ovf, cudaStream_t s, l8_status *st) {
    int *ovf_dev = nullptr, ovf_col = INT_MAX, rc = -1;
    if (check_ovf && l8_cuda_alloc((void **)&ovf_dev, sizeof(int), s, st) < 0) return -1;
    L8_CUDA_CHECK(st, l8_fused_decode_cuda(x, xt, m, L->in_features, c->kp, c->np, L->out_features, L->threshold,
                                           c->kflag, c->known_pos, c->wq, c->wscale, c->bias, c->wk, y, yt,
                                           check_ovf ? c->ovf : nullptr, ovf_dev, c->sms, s));
    if (check_ovf) {
        L8_CUDA_CHECK(st, cudaMemcpyAsync(&ovf_col, ovf_dev, sizeof(int), cudaMemcpyDeviceToHost, s));
        L8_CUDA_CHECK(st, cudaStreamSynchronize(s));
        if (ovf_col >= 0 && ovf_col < L->in_features) {
            ovf_error(L, c, ovf_col, st);
            goto fail;
        }
    }
    rc = 0;
fail:
    l8_cuda_free(ovf_dev, s);
    return rc;
}

} // namespace

extern "C" int l8_cuda_linear_forward(const l8_layer *L, const void *x, l8_dtype xt, int64_t m, void *y,
                                      l8_dtype yt, cudaStream_t s, l8_status *st) {
    const cuda_impl *c = static_cast<const cuda_impl *>(L->impl);
    const int64_t k = L->in_features, n = L->out_features, no = L->n_outliers, kp = c->kp, np = c->np;
    const bool dyn = L->threshold > 0.0f, any = dyn || no > 0, small = m <= L8_CUDA_GEMV_MAX_M;
    /* small m: no compact copies (the GEMV epilogue gathers the few values it needs) */
    const int dcap = dyn && !small ? (int)std::min<int64_t>(k, DYN_CAP) : 0;
    const int64_t ldo = any && !small ? std::min<int64_t>(k, no + dcap) : 0;
    /* float16 x rounds the dynamic columns' dequantized weights to fp16: a layer with a
     * column where that overflows (known at build time, rare) must check which columns
     * this call found, which takes one small host synchronization (see ovf_error) */
    const bool check_ovf = dyn && xt == L8_F16 && c->ovf != nullptr;
    char *buf = nullptr;
    int prev = -1, rc = -1, ovf_col = INT_MAX;
    if (m == 0) return 0;
    if (l8_cuda_push_device(L->device, &prev, st) < 0) return -1;
    (void)cudaGetLastError(); /* a stale error of someone else's must not read as ours */
    if (check_ovf && capturing(s)) {
        l8_cuda_pop_device(prev);
        return l8_fail(st, L8_ERR_VALUE,
                "x is float16 and some of this layer's weights are beyond float16's range when dequantized "
                "(column %d, among others maybe), so a float16 forward checks its outlier columns on the host, "
                "which cannot be done while a CUDA graph is being captured; pass x as float32",
                first_ovf_column(L, c));
    }
    if (fused_decode_fits(L, c, m)) {
        rc = fused_decode_forward(L, c, x, xt, m, y, yt, check_ovf, s, st);
        l8_cuda_pop_device(prev);
        return rc;
    }

    const bool sm90 = !small && sm90_fits(L, c, m, y, yt);
    carver cv;
    /* xq has the padding rows of the last chunk too: chunks start at multiples of mc, a
     * multiple of 128 when there are several, so they end by gemm_rows(m) */
    const size_t o_xq = cv.take((size_t)((small ? m : gemm_rows(m)) * kp));
    const size_t o_sx = cv.take((size_t)m * 4), o_rc = cv.take((size_t)m * 4);
    const size_t o_fl = cv.take(any ? (size_t)(4 + k) * 4 : 0); /* counts[4], then dflag */
    const size_t o_oc = cv.take(any ? (size_t)k * 4 : 0), o_os = cv.take(any ? (size_t)k * 4 : 0),
                 o_dc = cv.take(any ? (size_t)k * 4 : 0);
    const size_t o_xo = cv.take((size_t)(m * ldo) * 4), o_wd = cv.take((size_t)dcap * (size_t)n * 4);
    const int64_t mc = small || sm90 ? 0 : chunk_rows(m, np); /* the sm90 GEMM needs no int32 product */
    const size_t o_c = cv.take((size_t)(gemm_rows(mc) * np) * 4);
    if (l8_cuda_alloc((void **)&buf, cv.off, s, st) < 0) goto fail;
    {
        int8_t *xq = (int8_t *)(buf + o_xq);
        float *sx = (float *)(buf + o_sx);
        int *rcol = (int *)(buf + o_rc);
        l8_outlier_list ol = {};
        l8_outlier_ops ops = {};
        if (any) {
            ol.counts = (int *)(buf + o_fl);
            ol.dflag = dyn ? (unsigned *)(buf + o_fl) + 4 : nullptr;
            ol.ovf = check_ovf ? c->ovf : nullptr;
            ol.ocol = (int *)(buf + o_oc);
            ol.osrc = (int *)(buf + o_os);
            ol.dcol = (int *)(buf + o_dc);
            ops.counts = ol.counts;
            ops.ocol = ol.ocol;
            ops.osrc = ol.osrc;
            ops.xo = (const float *)(buf + o_xo);
            ops.ldo = ldo;
            ops.wk = c->wk;
            ops.wd = (const float *)(buf + o_wd);
            ops.dcap = dcap;
            ops.x = x;
            ops.x_f16 = xt == L8_F16;
            ops.ldx = k;
            ops.wq = c->wq;
            ops.ldw = kp;
            ops.wscale = c->wscale;
            ops.wdiv = c->wdiv;
        }
        if (small) {
            L8_CUDA_CHECK(st, l8_quantize_small_m_cuda(x, xt, m, k, kp, L->threshold, c->kflag, c->known_pos, &ol, xq,
                                                       sx, s));
            L8_CUDA_CHECK(st, l8_gemv_s8_cuda(xq, c->wq, m, np, kp, n, sx, c->wscale, c->bias, &ops, y, yt, nullptr, 0, s));
        } else {
            if (any && (l8_cuda_ctx_fused(c->ctx) & L8_FUSED_PREFILL) && m <= L8_PREFILL_MAX_M) {
                /* the fused prefill quantizer: flags (+ the list, by the last block), then
                 * exact scales; one memset zeroes counts (counts[3] is its block counter) and dflag */
                L8_CUDA_CHECK(st, cudaMemsetAsync(ol.counts, 0, (size_t)(4 + (dyn ? k : 0)) * 4, s));
                L8_CUDA_CHECK(st, l8_prefill_flags_cuda(x, xt, m, k, L->threshold, c->kflag, c->known_pos, &ol,
                                                        (unsigned *)ol.counts + 3, s));
                L8_CUDA_CHECK(st, l8_prefill_quantize_cuda(x, xt, m, k, kp, gemm_rows(m), L->threshold, c->kflag, &ol,
                                                           xq, sx, (float *)(buf + o_xo), ldo, c->wq, kp, c->wscale, n,
                                                           dcap, (float *)(buf + o_wd), s));
            } else {
            /* dflag must be 0 before pass 1 marks it; counts are written by the compaction */
            if (dyn) L8_CUDA_CHECK(st, cudaMemsetAsync(ol.dflag, 0, (size_t)k * 4, s));
            L8_CUDA_CHECK(st, l8_quantize_x_cuda(x, xt, m, k, kp, gemm_rows(m), L->threshold, c->kflag, ol.dflag, xq,
                                                 sx, rcol, s));
            if (any) {
                L8_CUDA_CHECK(st, l8_outliers_compact_cuda(c->kflag, c->known_pos, k, &ol, s));
                L8_CUDA_CHECK(st, l8_outliers_fix_cuda(x, xt, m, k, kp, L->threshold, c->kflag, &ol, xq, sx, rcol,
                                                       (float *)(buf + o_xo), ldo, c->wq, kp, c->wscale, n, dcap,
                                                       (float *)(buf + o_wd), s));
            }
            }
            int32_t *C = (int32_t *)(buf + o_c);
            const size_t ys = l8_dtype_size(yt);
#ifdef LLMINT8_SM90_GEMM
            if (sm90) {
                const l8_outlier_ops *op = any ? &ops : nullptr;
                L8_CUDA_CHECK(st, yt == L8_F16 ? l8_gemm_sm90_f16(xq, c->wq, (int)m, (int)n, (int)kp, sx, c->wscale,
                                                                  c->bias, op, static_cast<__half *>(y), L->device,
                                                                  c->sms, s)
                                               : l8_gemm_sm90_f32(xq, c->wq, (int)m, (int)n, (int)kp, sx, c->wscale,
                                                                  c->bias, op, static_cast<float *>(y), L->device,
                                                                  c->sms, s));
                l8_cuda_ctx_note_sm90(c->ctx);
            }
#endif
            for (int64_t r0 = 0; r0 < m && !sm90; r0 += mc) {
                const int64_t rows = std::min(mc, m - r0);
                l8_outlier_ops oc = ops; /* the same terms, seen from row r0 */
                if (any) {
                    oc.xo = ops.xo + r0 * ldo;
                    oc.x = static_cast<const char *>(x) + (size_t)(r0 * k) * l8_dtype_size(xt);
                }
                if (l8_lt_int8_gemm(c->ctx, L->device, xq + r0 * kp, c->wq, C, gemm_rows(rows), np, kp, s, st) < 0)
                    goto fail;
                L8_CUDA_CHECK(st, l8_dequant_cuda(C, np, rows, n, sx + r0, c->wscale, c->bias, &oc,
                                                  static_cast<char *>(y) + (size_t)(r0 * n) * ys, yt, s));
            }
        }
        if (check_ovf) {
            L8_CUDA_CHECK(st, cudaMemcpyAsync(&ovf_col, ol.counts + 2, sizeof(int), cudaMemcpyDeviceToHost, s));
            L8_CUDA_CHECK(st, cudaStreamSynchronize(s));
            if (ovf_col >= 0 && ovf_col < k) {
                ovf_error(L, c, ovf_col, st);
                goto fail;
            }
        }
    }
    rc = 0;
fail:
    l8_cuda_free(buf, s);
    l8_cuda_pop_device(prev);
    return rc;
}

extern "C" const l8_backend l8_cuda_backend = {
    "cuda", cuda_create, cuda_destroy, cuda_export, cuda_forward_host,
};
