/* fused_cuda.h: the fused forward paths of the CUDA backend (fused_cuda.cu).
 *
 * Decoding (m <= L8_CUDA_FUSED_MAX_M): the whole Int8Linear forward in one launch. Every
 * block recomputes from x (a few KB, read from L2) the outlier columns, the exact row
 * scales and int8 x into shared memory, then streams its weight rows with dp4a and
 * finishes each output (dequantization, outlier sum in ascending column order, bias)
 * with one owner lane. Bit-identical to the CPU backend (linear_cpu.c, quantize.c).
 *
 * Opt-in until verified on a GPU: l8_cuda_ctx_fused (cuda_common.h) selects it. Included
 * by .cu files only (C++).
 */
#ifndef LLMINT8_FUSED_CUDA_H
#define LLMINT8_FUSED_CUDA_H

#include <cuda_fp16.h>

#include "cuda_common.h"

/* The most dynamic shared memory the decoding kernel asks for; callers take the two-launch
 * path when l8_fused_decode_smem is above this or above the device's opt-in limit. */
#define L8_FUSED_DECODE_SMEM_MAX ((size_t)200 << 10)

/* Shared memory of one block of the decoding kernel for m rows of k (kp padded) columns. */
size_t l8_fused_decode_smem(int64_t m, int64_t k, int64_t kp);

/* y (m, n) = layer(x (m, k)), x float16/float32 (row stride k), y float16/float32; the
 * layer as the CUDA backend holds it (wq (np, kp) int8, wscale, bias or NULL, wk
 * (n_known, n) fp16, kflag / known_pos (k,) or NULL). ovf != NULL (float16 x only): the
 * columns whose dequantized weight overflows fp16; *ovf_out gets the smallest dynamic
 * outlier column among them, or INT_MAX. sms: the device's multiprocessor count.
 * cudaErrorInvalidValue when m > L8_CUDA_FUSED_MAX_M or the shared memory does not fit. */
cudaError_t l8_fused_decode_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, int64_t np, int64_t n,
                                 float threshold, const uint8_t *kflag, const int32_t *known_pos, const int8_t *wq,
                                 const float *wscale, const float *bias, const __half *wk, void *y, l8_dtype yt,
                                 const uint8_t *ovf, int *ovf_out, int sms, cudaStream_t s);

#endif
