/* gemm_cuda.h: the int8 GEMM family on the GPU (gemm_cuda.cu): the cuBLASLt wrapper,
 * the small-m GEMV kernel, and the dequantization epilogue. The CPU reference is gemm.c
 * (l8_gemm_s8_ref) plus linear_cpu.c's linear_epilogue.
 *
 * Layouts: the weight is (np, kp) int8 row-major and the activations (m, kp), with kp and
 * np multiples of L8_CUDA_PAD and the padding zero, so every row starts 16-byte aligned
 * and cuBLASLt's int8 (IMMA) requirements hold for any layer shape. The int32 product is
 * (m, np) row-major. Included by .cu files only (C++).
 */
#ifndef LLMINT8_GEMM_CUDA_H
#define LLMINT8_GEMM_CUDA_H

#include <cuda_fp16.h>

#include "cuda_common.h"

#define L8_CUDA_PAD 16

static inline int64_t l8_pad(int64_t v) { return (v + L8_CUDA_PAD - 1) / L8_CUDA_PAD * L8_CUDA_PAD; }

/* Where the epilogue finds the outlier terms sum_o f16(x[i, col_o]) * w16[j, col_o], for
 * the columns listed in ascending order (quantize_cuda.h). Entries past the compact
 * copies' capacity are read from x and the int8 weight directly. */
typedef struct {
    const int *counts;     /* device [total, dynamic]; NULL: no outlier terms */
    const int *ocol;       /* entry -> column */
    const int *osrc;       /* entry -> known position (>= 0) or -(dynamic slot + 1) */
    const float *xo;       /* (m, ldo) outlier activations as x holds them, entries [0, ldo) */
    int64_t ldo;
    const __half *wk;      /* (n_known, n) the known columns' fp16 weights */
    const float *wd;       /* (dcap, n) the dynamic columns' dequantized weights (fp16 values for float16 x) */
    int dcap;
    const void *x;         /* the input (m, ldx) for entries >= ldo */
    int x_f16;
    int64_t ldx;
    const int8_t *wq;      /* (np, ldw) int8 weight for dynamic slots >= dcap */
    int64_t ldw;
    const float *wscale;
    const float *wdiv;     /* (n,) wscale / 127, for the sm90 GEMM's epilogue (epilogue_cuda.cuh) */
} l8_outlier_ops;

/* y (m, n) = C * sx[i] * sw[j] / 127^2 + outlier terms + bias[j], written as fp16 or fp32;
 * C (m, ldc) int32. One pass over C. */
cudaError_t l8_dequant_cuda(const int32_t *C, int64_t ldc, int64_t m, int64_t n, const float *sx, const float *sw,
                            const float *bias, const l8_outlier_ops *O, void *y, l8_dtype yt, cudaStream_t s);

/* m <= L8_CUDA_GEMV_MAX_M: A (m, kp) x W (np, kp)^T with dp4a, every weight byte read
 * once, and the epilogue above fused. raw != NULL: store the int32 sums in raw (m, ldr)
 * instead (the exactness tests). */
cudaError_t l8_gemv_s8_cuda(const int8_t *A, const int8_t *W, int64_t m, int64_t np, int64_t kp, int64_t n,
                            const float *sx, const float *sw, const float *bias, const l8_outlier_ops *O, void *y,
                            l8_dtype yt, int32_t *raw, int64_t ldr, cudaStream_t s);

/* C (m, np) int32 = A (m, kp) int8 @ W (np, kp)^T through cuBLASLt (TN, int32 compute),
 * descriptors and algorithm cached per shape in ctx, workspace from the stream-ordered
 * pool on s. When cuBLASLt has no algorithm for the shape, the tiled dp4a kernel computes
 * the same integers. The device must be current and ready (l8_cuda_ctx_device). The
 * callers pass m rounded up to a multiple of 32 (buffers A and C sized for it, the
 * padding rows of A zeroed): the int8 heuristic may find no algorithm for a few rows;
 * the padding rows' results are never read. */
int l8_lt_int8_gemm(l8_cuda_ctx *ctx, int device, const int8_t *A, const int8_t *W, int32_t *C, int64_t m,
                    int64_t np, int64_t kp, cudaStream_t s, l8_status *st);

/* Hopper (sm_90a) only, built when setup.py finds an sm_90a target and CUTLASS's headers
 * (LLMINT8_SM90_GEMM defined): y (m, n) = the l8_dequant_cuda epilogue of A (m, kp) @
 * W (n.., kp)^T, applied inside a CUTLASS int8 tensor-core GEMM, so the int32 product never
 * reaches memory (gemm_sm90.cuh). One launch, no workspace; graph-capturable. y must be
 * 16-byte aligned with n a multiple of 16 bytes' worth of elements (TMA stores);
 * cudaErrorNotSupported when CUTLASS refuses the shape. sms: the device's multiprocessor
 * count. The device must be compute capability 9.0. */
#ifdef __cplusplus
extern "C" {
#endif
cudaError_t l8_gemm_sm90_f16(const int8_t *A, const int8_t *W, int m, int n, int kp, const float *sx, const float *sw,
                             const float *bias, const l8_outlier_ops *O, __half *y, int device, int sms,
                             cudaStream_t s);
cudaError_t l8_gemm_sm90_f32(const int8_t *A, const int8_t *W, int m, int n, int kp, const float *sx, const float *sw,
                             const float *bias, const l8_outlier_ops *O, float *y, int device, int sms,
                             cudaStream_t s);
#ifdef __cplusplus
}
#endif

#endif
