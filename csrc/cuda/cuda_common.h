/* cuda_common.h: what the CUDA backend's C and CUDA files share.
 *
 * - One status check (L8_CHECK_GEN) for cudaError_t and cublasStatus_t: it records the
 *   failing expression, file and line in an l8_status (MemoryError for out-of-memory,
 *   RuntimeError otherwise) and jumps to the function's `fail:` label.
 * - The CUDA context (l8_cuda_ctx): everything the module holds for CUDA (per-device
 *   cuBLASLt handle, the matmul plans cached per shape, current stream). It lives in the
 *   module state (l8_state.cuda); there are no process globals.
 * - The C API of the CUDA files, callable from C (module.c, device_array.c).
 *
 * Every function here runs without the GIL and never touches Python objects.
 * Build with LLMINT8_CUDA=1 (setup.py defines it when nvcc is found).
 */
#ifndef LLMINT8_CUDA_COMMON_H
#define LLMINT8_CUDA_COMMON_H

#ifdef LLMINT8_CUDA

#include <cuda_runtime_api.h>
#include <cublasLt.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "common.h"
#include "linear.h"

/* ---------------------------------------------------------------- status checks */

/* Fill *st from a failed CUDA / cuBLAS status; both return -1. */
int l8_cuda_fail(l8_status *st, cudaError_t e, const char *expr, const char *file, int line);
int l8_cublas_fail(l8_status *st, cublasStatus_t e, const char *expr, const char *file, int line);

/* Evaluate expr once; on failure record it and `goto fail`. */
#define L8_CHECK_GEN(T, OK, FAILFN, st, expr)                        \
    do {                                                             \
        T l8_rc_ = (expr);                                           \
        if (l8_rc_ != (OK)) {                                        \
            FAILFN((st), l8_rc_, #expr, __FILE__, __LINE__);         \
            goto fail;                                               \
        }                                                            \
    } while (0)
#define L8_CUDA_CHECK(st, expr) L8_CHECK_GEN(cudaError_t, cudaSuccess, l8_cuda_fail, st, expr)
#define L8_CUBLAS_CHECK(st, expr) L8_CHECK_GEN(cublasStatus_t, CUBLAS_STATUS_SUCCESS, l8_cublas_fail, st, expr)
/* after every kernel launch */
#define L8_LAUNCH_CHECK(st) L8_CUDA_CHECK(st, cudaGetLastError())

/* ---------------------------------------------------------------- context */

typedef struct l8_cuda_ctx l8_cuda_ctx;

/* Number of usable devices, 0 when there is no device or driver (never fails).
 * When 0 and why != NULL, *why gets the CUDA error text. */
int l8_cuda_device_count(const char **why);

/* A new, empty context (no CUDA call is made until a device is first used). NULL when
 * out of host memory. */
l8_cuda_ctx *l8_cuda_ctx_new(void);
/* Destroy handles and cached plans. Safe on NULL. */
void l8_cuda_ctx_free(l8_cuda_ctx *ctx);
/* Make `device` ready (cuBLASLt handle, memory pool threshold): fails with a
 * RuntimeError naming the CUDA error when the device cannot be used. */
int l8_cuda_ctx_device(l8_cuda_ctx *ctx, int device, l8_status *st);
/* The stream all work is queued on (0: the legacy default stream). */
cudaStream_t l8_cuda_ctx_stream(const l8_cuda_ctx *ctx);
void l8_cuda_ctx_set_stream(l8_cuda_ctx *ctx, cudaStream_t s);
/* Wait on the host for the current stream; for the legacy default stream, for that stream
 * of every device the context has made ready (RuntimeError when none was and CUDA cannot
 * be used). */
int l8_cuda_ctx_synchronize(l8_cuda_ctx *ctx, l8_status *st);

/* Stream-ordered temporaries from the device's default memory pool (device must be
 * current). l8_cuda_free ignores NULL and errors (it runs on cleanup paths). */
int l8_cuda_alloc(void **p, size_t bytes, cudaStream_t s, l8_status *st);
void l8_cuda_free(void *p, cudaStream_t s);

/* Switch the calling thread to `device`, returning the previous device in *prev. */
int l8_cuda_push_device(int device, int *prev, l8_status *st);
void l8_cuda_pop_device(int prev);

/* ---------------------------------------------------------------- ops */

/* The CUDA Int8Linear backend (linear_cuda.cu). Its forward_host copies through the
 * context's current stream and synchronizes it. */
extern const l8_backend l8_cuda_backend;

/* y (m, out) = layer(x (m, in)) with x and y in device memory on L->device, all work
 * queued on `s`, no host synchronization, no event and no synchronous allocation: a call
 * can be captured in a CUDA graph. x float16/float32, y float16/float32.
 * Non-finite x is not checked (that would need a host synchronization); what it gives
 * (linear_cuda.cu): a row holding NaN gives NaN in every output of that row; a row
 * holding +-Inf gives non-finite outputs in that row (NaN, or +-Inf where the Inf column
 * is an outlier column); the other rows are what the CPU backend gives for the finite
 * rows alone (an Inf at or above the threshold makes its column an outlier column, as a
 * large finite value would). Never a crash or an out-of-bounds access.
 * float16 x and a weight column whose dequantized value is beyond fp16's range: as on the
 * CPU, a ValueError when this call finds that column as a dynamic outlier. The layer
 * knows from its build whether it has such a column (rarely: only float32 weights beyond
 * 65504 make one); only then does a float16 forward end with one small host
 * synchronization (reading the device's verdict), and it refuses to run while its stream
 * is being captured in a CUDA graph. Every other forward stays free of synchronization. */
int l8_cuda_linear_forward(const l8_layer *L, const void *x, l8_dtype xt, int64_t m, void *y, l8_dtype yt,
                           cudaStream_t s, l8_status *st);

/* Exact int8 GEMM on device memory: C (m, n) int32 = A (m, k) int8 @ B (n, k)^T.
 * path: 0 auto, 1 the small-m GEMV kernel (m <= L8_CUDA_GEMV_MAX_M), 2 cuBLASLt (the
 * tiled kernel when cuBLASLt has no algorithm for the shape), 3 the tiled kernel. */
int l8_cuda_int8_matmul(l8_cuda_ctx *ctx, int device, const int8_t *A, const int8_t *B, int64_t m, int64_t n,
                        int64_t k, int32_t *C, int path, cudaStream_t s, l8_status *st);

/* fp16 linear through cuBLASLt: y (m, n) = x (m, k) @ w (n, k)^T + bias (n,) (bias may
 * be NULL), fp16 in and out, fp32 accumulation, bias fused as a cuBLASLt epilogue. */
int l8_cuda_fp16_linear(l8_cuda_ctx *ctx, int device, const void *x, const void *w, const void *bias, void *y,
                        int64_t m, int64_t n, int64_t k, cudaStream_t s, l8_status *st);

/* Largest m served by the GEMV kernel instead of cuBLASLt. */
#define L8_CUDA_GEMV_MAX_M 8

/* The fused forward paths, a bit set: L8_FUSED_DECODE, the one-launch forward for
 * m <= L8_CUDA_FUSED_MAX_M (fused_cuda.h); L8_FUSED_PREFILL, the two-launch quantizer of
 * longer inputs (quantize_cuda.h); L8_FUSED_GEMM, the sm90 GEMM with the dequantization in
 * its epilogue in place of cuBLASLt + l8_dequant_cuda (gemm_cuda.h; Hopper, when built).
 * Opt-in until checked on a GPU (benchmarks/gpu_check.sh runs the tests with them forced):
 * a context starts with L8_CUDA_FUSED_DEFAULT, or with what the environment variable
 * LLMINT8_CUDA_FUSED says ("decode", "prefill", "gemm", joined with '+', or "all",
 * "none"); to make them the default once checked, set L8_CUDA_FUSED_DEFAULT to
 * L8_FUSED_ALL (the one-line switch). */
#define L8_FUSED_DECODE 1
#define L8_FUSED_PREFILL 2
#define L8_FUSED_GEMM 4
#define L8_FUSED_ALL (L8_FUSED_DECODE | L8_FUSED_PREFILL | L8_FUSED_GEMM)
#define L8_CUDA_FUSED_DEFAULT 0
#define L8_CUDA_FUSED_MAX_M 16
int l8_cuda_ctx_fused(const l8_cuda_ctx *ctx);
void l8_cuda_ctx_set_fused(l8_cuda_ctx *ctx, int fused);
/* "decode" / "prefill" / "gemm", several joined with '+' (e.g. "prefill+gemm"), "all",
 * or "none" (or "0") -> the bit set; -1 for anything else. */
int l8_cuda_fused_parse(const char *s);
/* The name of a bit set, as l8_cuda_fused_parse reads it ("none", "all", "decode+gemm"). */
const char *l8_cuda_fused_name(int fused);
/* Forwards that ran the sm90 GEMM, counted per context (the tests check the path). */
void l8_cuda_ctx_note_sm90(l8_cuda_ctx *ctx);
long long l8_cuda_ctx_sm90_calls(const l8_cuda_ctx *ctx);

#ifdef __cplusplus
}
#endif

#endif /* LLMINT8_CUDA */
#endif /* LLMINT8_CUDA_COMMON_H */
