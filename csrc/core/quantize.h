/* quantize.h: the CPU reference quantizers and outlier detection (the oracle for
 * every backend; see quantize.c). Inputs are float16 or float32, already validated
 * by the entry point (contiguous, native byte order). */
#ifndef LLMINT8_QUANTIZE_H
#define LLMINT8_QUANTIZE_H

#include "common.h"

/* Index of the first NaN or Inf among n elements, or -1 when all are finite. */
int64_t l8_find_nonfinite(const void *x, l8_dtype t, int64_t n);

/* Largest |x| over n elements. */
float l8_absmax(const void *x, l8_dtype t, int64_t n);

/* q[i] = round(127 * x[i] / absmax), q in [-127, 127]; absmax 0 gives q = 0. */
void l8_quantize_absmax(const void *x, l8_dtype t, int64_t n, float absmax, int8_t *q);

/* Vector-wise (row-wise) quantization of x (m, k): scales[i] = max_j |x[i, j]| over the
 * columns with skip[j] == 0 (skip may be NULL), and q[i, j] = round(127 x[i, j] / scales[i])
 * for those columns, 0 for the skipped ones. An all-zero row gets scale 0 and q 0. */
void l8_quantize_rows(const void *x, l8_dtype t, int64_t m, int64_t k, const uint8_t *skip,
                      int8_t *q, float *scales, int nthreads);

/* Asymmetric per-tensor quantization over the full int8 range [-128, 127]:
 * x ~= (q - zp) * scale, with the range widened to include 0 so that 0 is exact and
 * zp fits int8. Constant-zero input gives scale 0, zp 0. */
void l8_quantize_zeropoint(const void *x, l8_dtype t, int64_t n, int8_t *q, float *scale, int32_t *zp);

/* colmax[j] = max_i |x[i, j]| for x (m, k). */
void l8_column_absmax(const void *x, l8_dtype t, int64_t m, int64_t k, float *colmax, int nthreads);

/* ---- SIMD versions (quantize_x86.c) -----------------------------------------------
 * AVX2 + F16C; call only when a SIMD GEMM kernel is selected (which implies both).
 * Results are bitwise equal to the reference functions above. */

/* l8_column_absmax that also checks x: returns 1 when x holds a NaN or Inf, else 0. */
int l8_column_absmax_simd(const void *x, l8_dtype t, int64_t m, int64_t k, float *colmax, int nthreads);

/* l8_quantize_rows; -1 when out of memory. */
int l8_quantize_rows_simd(const void *x, l8_dtype t, int64_t m, int64_t k, const uint8_t *skip, int8_t *q,
                          float *scales, int nthreads);

/* v[i] = l8_round_f16(v[i]) for n values (round to the nearest fp16, back to fp32). */
void l8_round_f16_simd(float *v, int64_t n);

/* One output row of the Int8Linear epilogue, for nb columns:
 *   y[c] = (acc[c] * (sxi * sw[c]) + s[c]) (+ bias[c])
 * in fp32 with the epilogue's operation order (s: the row's outlier sums, or NULL for +0),
 * stored as fp32 or fp16. */
void l8_dequantize_row_simd(const int32_t *acc, int64_t nb, float sxi, const float *sw, const float *bias,
                            const float *s, void *y, l8_dtype yt);

#endif
