/* gemm.h: int8 x int8 -> int32 GEMM on the CPU, C = A @ B.T.
 *
 * A is (m, k) and B is (n, k), both row-major int8, so every output is a dot product
 * of two contiguous rows (the layout of activations and nn.Linear weights). The
 * driver walks (MB x NB) output tiles in parallel and hands each finished int32 tile
 * to an epilogue, which is where dequantization, bias and the fp16 outlier product
 * are applied (linear_cpu.c): the int32 product never exists as a whole matrix. */
#ifndef LLMINT8_GEMM_H
#define LLMINT8_GEMM_H

#include "common.h"
#include "cpu_features.h"

#define L8_GEMM_MB 32
#define L8_GEMM_NB 64
#define L8_GEMM_KC 2048 /* k is processed in slices that keep both panels in L2 */

/* Called once per finished tile: acc[r * ldacc + c] holds C[i0 + r, j0 + c] for
 * r < mb, c < nb. Runs on the thread that computed the tile. */
typedef void (*l8_epilogue)(void *ctx, int64_t i0, int64_t j0, int64_t mb, int64_t nb,
                            const int32_t *acc, int64_t ldacc);

/* Blocked driver, parallel over tiles (threadpool.h). Exact for any m, n, k >= 0 (int32 holds the sum
 * for k < 2^17 at the worst case 127 * 127 * k; the entry point checks k). */
void l8_gemm_s8(const int8_t *A, const int8_t *B, int64_t m, int64_t n, int64_t k,
                l8_epilogue ep, void *ctx, int nthreads);

/* The plain triple loop: the oracle for l8_gemm_s8 and every other backend. */
void l8_gemm_s8_ref(const int8_t *A, const int8_t *B, int64_t m, int64_t n, int64_t k, int32_t *C);

/* Epilogue that stores the int32 tile into ctx, an (m, n) int32 matrix (ld = n). */
typedef struct { int32_t *C; int64_t ldc; } l8_store_ctx;
void l8_epilogue_store(void *ctx, int64_t i0, int64_t j0, int64_t mb, int64_t nb,
                       const int32_t *acc, int64_t ldacc);

/* Largest k for which the int32 accumulator cannot overflow. */
#define L8_GEMM_MAX_K ((int64_t)(INT32_MAX / (128 * 128)))

/* ---- packed weights and kernel dispatch ---------------------------------------
 * B (n, k) is packed once (at layer creation) into the layout its kernel reads:
 *   portable:            the canonical (n, k) rows, unpadded.
 *   avx2:                panels of 16 rows, [np/16][kp/2][16][2]: for every pair of k,
 *                        the 16 rows' two bytes side by side (one vpmovsxbw per 8 rows).
 *   avxvnni, avx512vnni: panels of 16 rows, [np/16][kp/4][16][4]: four k per int32
 *                        lane, the vpdpbusd operand; corr[j] = 128 * sum_p B[j, p]
 *                        undoes the +128 that makes A unsigned.
 * np = n rounded up to 16, kp = k rounded up to 4; the padding is zero. */
#define L8_PACK_NR 16 /* rows of B per panel: the micro-kernel's output columns */
#define L8_PACK_KQ 4  /* k is padded to a multiple of this */

typedef struct {
    l8_kernel kernel;
    int64_t n, k;   /* logical shape */
    int64_t np, kp; /* padded shape (portable: n, k) */
    int8_t *data;
    int32_t *corr;  /* (np,) for the vnni kernels, else NULL */
    size_t nbytes;  /* bytes held by data and corr */
} l8_packed_b;

/* Pack B (n, k) for kernel `kern` into *pb (allocated here). -1 when out of memory. */
int l8_pack_b(l8_kernel kern, const int8_t *B, int64_t n, int64_t k, l8_packed_b *pb);
void l8_packed_b_free(l8_packed_b *pb);
/* The canonical (n, k) matrix read back from the packed layout. */
void l8_unpack_b(const l8_packed_b *pb, int8_t *B);

/* C = A (m, k) @ B.T with B packed, through the epilogue (same contract as l8_gemm_s8).
 * Exact for every int8 value of A and B, -128 included. -1 when out of memory
 * (the SIMD kernels stage A in their own layout). */
int l8_gemm_s8_packed(const int8_t *A, int64_t m, const l8_packed_b *B, l8_epilogue ep, void *ctx, int nthreads);

/* The SIMD kernels (gemm_x86.c); each function is compiled for its own instruction set
 * and must only be called when l8_kernels_supported() has that kernel. */
typedef struct {
    size_t a_elem; /* bytes per staged A element */
    /* A (m, k) int8 -> dst (m, kp) in the kernel's element type, padding zero. */
    void (*stage_a)(const int8_t *A, int64_t m, int64_t k, int64_t kp, void *dst);
    /* acc (mb x nb of the (L8_GEMM_MB x L8_GEMM_NB) tile) = staged A rows [i0, i0 + mb) @ B
     * rows [j0, j0 + nb).T, exact int32; j0 is a multiple of L8_PACK_NR. */
    void (*tile)(const void *As, const l8_packed_b *B, int64_t i0, int64_t mb, int64_t j0, int64_t nb,
                 int32_t *acc);
    /* Pack B (n, k) into pb->data (np * kp bytes, zeroed by the caller) and pb->corr. */
    void (*pack)(const int8_t *B, l8_packed_b *pb);
} l8_kernel_ops;

/* The ops of a SIMD kernel, or NULL for portable and for kernels not compiled in. */
const l8_kernel_ops *l8_x86_kernel_ops(l8_kernel kern);

/* Rows [j, j + 16) of column p of B (a panel's slice; j a multiple of 16): col[r] = B[j + r, p]
 * for j + r < n, 0 beyond. */
void l8_packed_b_panel_column(const l8_packed_b *pb, int64_t j, int64_t p, int8_t col[16]);

/* dst[r] = B[j + r, p] * scale[r] for r < 16 (0 in the padding rows), j a multiple of 16,
 * computed as (float)B * scale; B packed for a SIMD kernel (gemm_x86.c, AVX2). */
void l8_panel_column_f32_avx2(const l8_packed_b *pb, int64_t j, int64_t p, const float *scale, float *dst);

/* The outlier product of mr <= L8_OUT_MR rows against the 16 columns [j0, j0 + 16) when every
 * outlier column is a column of B dequantized (W[o, j] = (float)B[j, cols[o]] * scale[j - j0],
 * rounded to fp16 when round16): S as l8_outlier_product computes it, bit for bit, without
 * storing W. Returns 1 when round16 and a rounded weight is infinite (S is then garbage).
 * B packed for a SIMD kernel (AVX2). */
int l8_outlier_fused_avx2(const l8_packed_b *pb, int64_t j0, const float *scale, const int32_t *cols,
                          int64_t no, const float *X, int64_t ldx, int64_t mr, int round16, float *S,
                          int64_t lds);

/* *out = B's columns cols[0..nc) (in that order) packed for B's kernel: an (n, nc) weight.
 * The int8 GEMM of the same columns of A gives the same int32 as the full one when A is 0
 * in every other column. Panels split over up to nthreads threads. -1 when out of memory. */
int l8_packed_b_select(const l8_packed_b *pb, const int32_t *cols, int64_t nc, l8_packed_b *out, int nthreads);

/* Run the epilogue over every (MB x NB) tile of an (m, n) output with an all-zero int32
 * tile: the GEMM's result when A is zero (no column left for the int8 product). */
void l8_epilogue_zero(int64_t m, int64_t n, l8_epilogue ep, void *ctx, int nthreads);

/* ---- the fp32 outlier product ----------------------------------------------------
 * S (m, n) = X (m, no) @ W (no, n), X row-major with leading dimension ldx, W packed in
 * panels of L8_OUT_NR columns: W[o, j] at Wp[(j / NR) * no * NR + o * NR + j % NR], the
 * padding columns up to np = n rounded up to NR are zero; S has leading dimension lds >= np
 * and its padding columns are written too.
 *
 * Summation order, the one definition every kernel (and the CUDA backend) follows:
 *   s = +0; for o = 0, 1, ..., no - 1: s = fl(s + fl(X[i, o] * W[o, j]))
 * every product rounded to fp32 before the add (no fused multiply-add), o ascending. So the
 * result is the same for every kernel, blocking and thread count. simd: the AVX2 kernel
 * (only when a SIMD GEMM kernel is supported), else the portable one. */
#define L8_OUT_NR 16
#define L8_OUT_MR 6 /* rows per micro-tile: 6 x 16 fp32 sums fill 12 of AVX2's 16 registers */
void l8_outlier_product(const float *X, int64_t ldx, int64_t m, int64_t no, const float *Wp, int64_t n, float *S,
                        int64_t lds, int simd, int nthreads);
/* The AVX2 kernel's tile (gemm_x86.c): rows [0, mr) of X against no rows of one panel
 * (Wpanel: no x 16), mr <= L8_OUT_MR; accumulate: continue the sums already in S. */
void l8_outlier_tile_avx2(const float *X, int64_t ldx, int64_t mr, int64_t no, const float *Wpanel, float *S,
                          int64_t lds, int accumulate);

#endif
