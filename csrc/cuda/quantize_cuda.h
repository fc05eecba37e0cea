/* quantize_cuda.h: launchers of the activation quantizer and outlier detection on the
 * GPU (quantize_cuda.cu). The CPU reference is quantize.c (l8_quantize_rows,
 * l8_column_absmax); these produce bit-identical int8 values and scales.
 *
 * Included by .cu files only (C++). All launchers queue work on `s` and return the
 * launch status; none synchronizes with the host.
 */
#ifndef LLMINT8_QUANTIZE_CUDA_H
#define LLMINT8_QUANTIZE_CUDA_H

#include <cuda_fp16.h>

#include "cuda_common.h"

/* Per-call outlier bookkeeping on the device (dflag cleared by one memset before pass 1
 * when there is a threshold; counts are written by the compaction):
 *   counts[0]  number of outlier columns (known U dynamic), counts[1] dynamic ones,
 *   counts[2]  the smallest dynamic column whose dequantized weight overflows fp16 (ovf),
 *              INT_MAX when none (or ovf is NULL); counts has 4 ints
 *   dflag[k]   1 where some |x[i, j]| >= threshold (j not a known column)
 * Filled by l8_quantize_x_cuda + l8_outliers_compact_cuda:
 *   ocol[k]    the outlier columns in ascending order (the CPU backend's order), [0, counts[0])
 *   osrc[k]    for entry o: its known position (>= 0), or -(d + 1) for dynamic slot d
 *   dcol[k]    dynamic slot d -> column, [0, counts[1]) */
typedef struct {
    int *counts;
    unsigned *dflag;
    int *ocol, *osrc, *dcol;
    /* (k,) 1 in the columns whose weight, dequantized and rounded to fp16, is not finite
     * (the layer's build finds them); NULL: nothing to check (float32 x, no threshold, or
     * no such column, the usual case) */
    const uint8_t *ovf;
} l8_outlier_list;

/* Pass 1 over x (m, k), one block per row, x read from DRAM once (the second read of a
 * row hits L1/L2):
 *   - marks dynamic outlier columns in dflag (threshold > 0),
 *   - computes a provisional row scale: the absmax over the elements that are neither in
 *     a known column nor >= threshold, and the column where it occurs (rcol),
 *   - writes xq (m, kp) int8 with that scale: 0 in known columns, in this row's outliers
 *     and in the padding columns [k, kp); and zeroes the padding rows [m, mpad) of xq
 *     (mpad >= m: the rows the int8 GEMM reads).
 * The provisional scale is exact unless its column turns out to be an outlier of another
 * row; l8_outliers_fix_cuda re-quantizes exactly those rows. */
cudaError_t l8_quantize_x_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, int64_t mpad,
                               float threshold, const uint8_t *kflag, unsigned *dflag, int8_t *xq, float *sx, int *rcol,
                               cudaStream_t s);

/* One block: the outlier columns (kflag | dflag) in ascending order into the list. */
cudaError_t l8_outliers_compact_cuda(const uint8_t *kflag, const int32_t *known_pos, int64_t k,
                                     const l8_outlier_list *ol, cudaStream_t s);

/* Pass 2, one block per row, touching only outlier columns: re-quantizes the rows whose
 * provisional scale came from a dynamic outlier column, zeroes the dynamic columns in
 * the other rows, and gathers x's outlier columns (x's values, in fp32) into xo (m, ldo) for
 * the first min(counts[0], ldo) entries.
 * In the same launch (extra blocks, when dcap > 0): wd (dcap, n) fp32, for the first
 * min(counts[1], dcap) dynamic slots the weight column dequantized as the CPU backend
 * does: wq[j, col] * (wscale[j] / 127), rounded to fp16 for float16 x (the outlier product
 * keeps x's precision), wq (n, ldw) int8. */
cudaError_t l8_outliers_fix_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, float threshold,
                                 const uint8_t *kflag, const l8_outlier_list *ol, int8_t *xq, float *sx,
                                 const int *rcol, float *xo, int64_t ldo, const int8_t *wq, int64_t ldw,
                                 const float *wscale, int64_t n, int dcap, float *wd, cudaStream_t s);

/* The fused prefill quantizer (opt-in, L8_FUSED_PREFILL), in place of pass 1 +
 * compaction + pass 2, after one memset that zeroes counts[0..3] and dflag:
 *   l8_prefill_flags_cuda: dflag for every column (any |x[i, j]| >= threshold, known
 *     columns left out), then, in the last block to finish (counter *done, zeroed by that
 *     memset: counts + 3), the outlier list and counts as l8_outliers_compact_cuda makes them;
 *   l8_prefill_quantize_cuda: xq and sx with the exact scales (no provisional ones), the
 *     padding rows of xq below mpad zeroed, xo and wd as l8_outliers_fix_cuda fills them.
 * Two launches; x is read twice (the second time mostly from L2). */
#define L8_PREFILL_MAX_M ((int64_t)65535 * 64) /* the flag pass's grid: 64-row chunks in gridDim.y */
cudaError_t l8_prefill_flags_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, float threshold,
                                  const uint8_t *kflag, const int32_t *known_pos, const l8_outlier_list *ol,
                                  unsigned *done, cudaStream_t s);
cudaError_t l8_prefill_quantize_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, int64_t mpad,
                                     float threshold, const uint8_t *kflag, const l8_outlier_list *ol, int8_t *xq,
                                     float *sx, float *xo, int64_t ldo, const int8_t *wq, int64_t ldw,
                                     const float *wscale, int64_t n, int dcap, float *wd, cudaStream_t s);

/* Rows up to which l8_quantize_small_m_cuda serves (the GEMV path's m). */
#define L8_CUDA_SMALL_M L8_CUDA_GEMV_MAX_M

/* For m <= L8_CUDA_SMALL_M: everything above (pass 1 with the rows in parallel,
 * compaction, pass 2) in one single-block launch, without the compact copy xo; clears
 * dflag itself (no memset). */
cudaError_t l8_quantize_small_m_cuda(const void *x, l8_dtype xt, int64_t m, int64_t k, int64_t kp, float threshold,
                                     const uint8_t *kflag, const int32_t *known_pos, const l8_outlier_list *ol,
                                     int8_t *xq, float *sx, cudaStream_t s);

#endif
