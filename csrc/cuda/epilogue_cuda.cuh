/* epilogue_cuda.cuh: the dequantization epilogue's arithmetic, element by element, shared
 * by the kernels that finish an int8 product (gemm_cuda.cu's dequant and GEMV kernels,
 * gemm_sm90.cuh's CUTLASS epilogue). CPU reference: linear_cpu.c (linear_epilogue) and
 * gemm.c (l8_outlier_product): every float operation is a __fmul_rn / __fadd_rn in the
 * CPU's order, so no fused multiply-add changes a bit. nvcc only. */
#ifndef LLMINT8_EPILOGUE_CUDA_CUH
#define LLMINT8_EPILOGUE_CUDA_CUH

#ifndef __CUDACC__
#error "epilogue_cuda.cuh holds device code: include it from .cu files only"
#endif

#include <cuda_fp16.h>
#include <stdint.h>

#include "gemm_cuda.h"

static __device__ __forceinline__ float round_h(float v) { return __half2float(__float2half_rn(v)); }

/* The outlier product keeps x's precision (linear_cpu.c): for float16 x the activations
 * are fp16 and the dequantized weights of dynamic columns are rounded to fp16; for float32
 * x both stay fp32 (an fp16 copy would turn a finite |x| > 65504 into inf). Known columns
 * use their stored fp16 weights either way. */

/* Outlier activation of row i, entry o: x's value. */
static __device__ __forceinline__ float outlier_x(const l8_outlier_ops &O, int64_t i, int o) {
    if (o < O.ldo) return O.xo[i * O.ldo + o];
    const int64_t col = O.ocol[o];
    return O.x_f16 ? __half2float(static_cast<const __half *>(O.x)[i * O.ldx + col])
                   : static_cast<const float *>(O.x)[i * O.ldx + col];
}

/* Outlier weight of output j, entry o. WDIV: take the dequantization step wscale[j] / 127
 * from O.wdiv (the same IEEE quotient, computed on the host) instead of dividing here: a
 * correctly rounded division is a called subroutine in device code, and a call in the
 * sm90 kernel would serialize its wgmma pipeline. */
template <bool WDIV = false>
static __device__ __forceinline__ float outlier_w(const l8_outlier_ops &O, int o, int64_t j, int64_t n) {
    const int src = O.osrc[o];
    if (src >= 0) return __half2float(O.wk[(int64_t)src * n + j]);
    const int d = -src - 1;
    if (d < O.dcap) return O.wd[(int64_t)d * n + j];
    const int64_t col = O.ocol[o];
    const float step = WDIV ? O.wdiv[j] : __fdiv_rn(O.wscale[j], 127.0f);
    const float v = __fmul_rn((float)O.wq[j * O.ldw + col], step);
    return O.x_f16 ? round_h(v) : v;
}

/* The outlier terms of output (i, j) for entries [from, total), added to s in ascending
 * entry order: l8_outlier_product's order when the sum starts from 0 at entry 0, or goes on
 * from the entries a caller added itself. */
template <bool WDIV = false>
static __device__ __forceinline__ float outlier_sum(const l8_outlier_ops &O, int from, int total, int64_t i,
                                                    int64_t j, int64_t n, float s) {
    for (int o = from; o < total; o++) s = __fadd_rn(s, __fmul_rn(outlier_x(O, i, o), outlier_w<WDIV>(O, o, j, n)));
    return s;
}

/* linear_cpu.c's linear_epilogue, operation for operation. b: this output's bias, or NULL
 * (then nothing is added: -0 stays -0). */
static __device__ __forceinline__ float finish(int32_t acc, float sx, float sw, float osum, const float *b) {
    const float sxi = __fmul_rn(sx, 1.0f / (127.0f * 127.0f));
    float v = __fmul_rn((float)acc, __fmul_rn(sxi, sw));
    v = __fadd_rn(v, osum);
    if (b) v = __fadd_rn(v, *b);
    return v;
}

#endif
