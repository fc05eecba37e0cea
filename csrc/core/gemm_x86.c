/* gemm_x86.c: the x86 SIMD int8 GEMM kernels (AVX2, AVX-VNNI, AVX-512 VNNI).
 *
 * C = A @ B.T with B packed by l8_pack_b (layouts in gemm.h), exact int32 for every
 * int8 value, -128 included. Each function carries its own target attribute, so this
 * file builds without -march flags and the wheel runs on any x86-64; gemm.c calls a
 * kernel only after cpu_features.c has found it supported. Oracle: l8_gemm_s8_ref.
 *
 * Micro-kernel: MR = 4 rows of A times one panel of NR = 16 rows of B, accumulated
 * in registers over a k slice of at most KC (the 16 x KC panel slice stays in L1
 * while the rows of the tile stream past it).
 *
 *   avx2:   A staged as int16; per pair of k, two vpmovsxbw widen the panel's 32 bytes
 *           and vpmaddwd (a[p], a[p+1]) x (b[j][p], b[j][p+1]) adds both products into
 *           int32 lane j. int16 x int16 cannot saturate (|pair| <= 2 * 128 * 128), so
 *           -128 needs no special case. vpmaddubsw would need a sign trick (abs(a),
 *           sign(b, a)) that is wrong for -128 and issues as many multiplies per
 *           product (vpmaddubsw + vpmaddwd per 32 products, like two vpmaddwd); on
 *           Zen 3 it ran at 68 int8 multiply-adds/ns per core against 77 for this one
 *           (L1-resident operands; benchmarks/avx2_microkernels.c).
 *   vnni:   A staged as a + 128 (u8); vpdpbusd adds four u8 x s8 products per lane,
 *           without saturation; the tile subtracts corr[j] = 128 * sum_p B[j, p]. Sums
 *           may pass INT32_MAX midway, but int32 lanes wrap and the true result fits,
 *           so the result is exact.
 */
#include <math.h>
#include <stdlib.h>

#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define MR 4
#define KC 1024
#define PREFETCH 1024 /* bytes ahead in the panel: streaming the weight from DRAM at 1-4 tokens */
/* the same for each of gemv4_avx2's four panel streams: 4 x 512 bytes ahead in all ran at
 * 26.5 GB/s on Zen 3 at one token, 4 x 1024 at 22.6 (4096 x 4096 and 4096 x 14336, weights
 * from DRAM; benchmarks/RESULTS.md); the one-stream micro-kernel is best at 1024 */
#define PREFETCH_GEMV 512
_Static_assert(KC % L8_PACK_KQ == 0, "k slices keep whole k groups");
_Static_assert(L8_GEMM_NB % L8_PACK_NR == 0 && L8_PACK_NR == 16, "tile and panel widths");
_Static_assert(L8_GEMM_NB == 4 * L8_PACK_NR, "gemv4_avx2 covers a tile with four panels");

/* AVX-VNNI intrinsics arrived in GCC 11 and Clang 12. */
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define L8_HAVE_AVXVNNI 1
#endif

/* ------------------------------------------------------------------ staging and packing */
static void stage_a_i16(const int8_t *A, int64_t m, int64_t k, int64_t kp, void *dst) {
    int16_t *d = dst;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t p = 0; p < k; p++) d[i * kp + p] = A[i * k + p];
        for (int64_t p = k; p < kp; p++) d[i * kp + p] = 0;
    }
}

static void stage_a_u8(const int8_t *A, int64_t m, int64_t k, int64_t kp, void *dst) {
    uint8_t *d = dst;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t p = 0; p < k; p++) d[i * kp + p] = (uint8_t)((uint8_t)A[i * k + p] ^ 0x80u); /* a + 128 */
        for (int64_t p = k; p < kp; p++) d[i * kp + p] = 0x80u; /* B is zero there */
    }
}

/* Panels of 16 rows, k in groups of G: [np/16][kp/G][16][G]; padding stays zero.
 * G is a constant in each caller, so the index arithmetic is shifts. */
static inline __attribute__((always_inline)) void pack_groups(const int8_t *B, l8_packed_b *pb, const int64_t G) {
    const int64_t n = pb->n, k = pb->k, kp = pb->kp;
    for (int64_t j = 0; j < n; j++) {
        int8_t *panel = pb->data + (j / L8_PACK_NR) * L8_PACK_NR * kp + (j % L8_PACK_NR) * G;
        const int8_t *row = B + j * k;
        for (int64_t p = 0; p < k; p++) panel[(p / G) * (L8_PACK_NR * G) + p % G] = row[p];
    }
}

static void pack_pairs(const int8_t *B, l8_packed_b *pb) { pack_groups(B, pb, 2); }

static void pack_quads(const int8_t *B, l8_packed_b *pb) {
    pack_groups(B, pb, 4);
    for (int64_t j = 0; j < pb->np; j++) {
        int32_t s = 0;
        for (int64_t p = 0; j < pb->n && p < pb->k; p++) s += B[j * pb->k + p];
        pb->corr[j] = 128 * s; /* |s| <= 128 k, so 128 s fits int32 for k <= L8_GEMM_MAX_K */
    }
}

static inline int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The tile loop shared by all kernels: k slices, then panels, then MR-row blocks. */
#define TILE_LOOP(UKR, ATYPE)                                                                        \
    const ATYPE *A = As;                                                                             \
    const int64_t kp = B->kp;                                                                        \
    /* one row block: no panel slice is reused, so stream each panel whole */                     \
    const int64_t kcmax = mb <= MR ? kp : KC;                                                        \
    for (int64_t p0 = 0; p0 < kp; p0 += kcmax) {                                                     \
        const int64_t kc = kp - p0 < kcmax ? kp - p0 : kcmax;                                        \
        for (int64_t jb = 0; jb < nb; jb += L8_PACK_NR) {                                            \
            const int8_t *b = B->data + (j0 + jb) * kp + p0 * L8_PACK_NR;                            \
            for (int64_t ib = 0; ib < mb; ib += MR) {                                                \
                const ATYPE *a = A + (i0 + ib) * kp + p0;                                            \
                int32_t *c = acc + ib * L8_GEMM_NB + jb;                                             \
                switch (mb - ib < MR ? mb - ib : MR) {                                               \
                case 1: UKR(a, kp, b, kc, c, 1, p0 > 0); break;                                      \
                case 2: UKR(a, kp, b, kc, c, 2, p0 > 0); break;                                      \
                case 3: UKR(a, kp, b, kc, c, 3, p0 > 0); break;                                      \
                default: UKR(a, kp, b, kc, c, 4, p0 > 0); break;                                     \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

/* acc[r, c] -= corr[j0 + c]: undo the +128 on A (wrapping, see the top comment). */
static void subtract_corr(const l8_packed_b *B, int64_t mb, int64_t j0, int64_t nb, int32_t *acc) {
    for (int64_t r = 0; r < mb; r++)
        for (int64_t c = 0; c < nb; c++)
            acc[r * L8_GEMM_NB + c] = (int32_t)((uint32_t)acc[r * L8_GEMM_NB + c] - (uint32_t)B->corr[j0 + c]);
}

/* ------------------------------------------------------------------ AVX2 */
#define T_AVX2 __attribute__((target("avx2,fma,f16c")))

/* 16 int32 results of one row into the tile, added to what the previous k slices left. */
static inline __attribute__((always_inline)) T_AVX2 void store_row(int32_t *c, __m256i v0, __m256i v1,
                                                                     int accumulate) {
    __m256i *o = (__m256i *)c;
    if (accumulate) {
        v0 = _mm256_add_epi32(v0, _mm256_loadu_si256(o));
        v1 = _mm256_add_epi32(v1, _mm256_loadu_si256(o + 1));
    }
    _mm256_storeu_si256(o, v0);
    _mm256_storeu_si256(o + 1, v1);
}

/* Accumulators are named variables (GCC spills an array of vectors), pinned to registers
 * after each step: otherwise GCC reassociates the sums across steps, which needs more
 * registers than AVX2 has and spills. */
#define PIN(v) __asm__("" : "+x"(v))

#define AVX2_STEP(q)                                                                                   \
    do {                                                                                               \
        const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + (q) * L8_PACK_NR)));      \
        const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + (q) * L8_PACK_NR + 16))); \
        __m256i av = _mm256_set1_epi32(load_i32(a0 + (q)));                                            \
        c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(av, b0));                                        \
        c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(av, b1));                                        \
        PIN(c00); PIN(c01);                                                                            \
        if (mr > 1) {                                                                                  \
            av = _mm256_set1_epi32(load_i32(a1 + (q)));                                                \
            c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(av, b0));                                    \
            c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(av, b1));                                    \
            PIN(c10); PIN(c11);                                                                        \
        }                                                                                              \
        if (mr > 2) {                                                                                  \
            av = _mm256_set1_epi32(load_i32(a2 + (q)));                                                \
            c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(av, b0));                                    \
            c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(av, b1));                                    \
            PIN(c20); PIN(c21);                                                                        \
        }                                                                                              \
        if (mr > 3) {                                                                                  \
            av = _mm256_set1_epi32(load_i32(a3 + (q)));                                                \
            c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(av, b0));                                    \
            c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(av, b1));                                    \
            PIN(c30); PIN(c31);                                                                        \
        }                                                                                              \
    } while (0)

static inline __attribute__((always_inline)) T_AVX2 void ukr_avx2(const int16_t *a, int64_t lda, const int8_t *b,
                                                                    int64_t kc, int32_t *c, const int mr,
                                                                    int accumulate) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
            c31 = c00;
    const int16_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    for (int64_t q = 0; q < kc; q += 4) { /* kc is a multiple of 4: two k pairs per trip */
        _mm_prefetch((const char *)(b + q * L8_PACK_NR + PREFETCH), _MM_HINT_T0);
        AVX2_STEP(q);
        AVX2_STEP(q + 2);
    }
    store_row(c, c00, c01, accumulate);
    if (mr > 1) store_row(c + L8_GEMM_NB, c10, c11, accumulate);
    if (mr > 2) store_row(c + 2 * L8_GEMM_NB, c20, c21, accumulate);
    if (mr > 3) store_row(c + 3 * L8_GEMM_NB, c30, c31, accumulate);
}

/* One row of A against four panels (64 columns) at once: at one token the weight streams
 * from DRAM, and four streams keep more cache-line fetches in flight than one. */
#define GEMV_PANEL(t, q)                                                                               \
    do {                                                                                               \
        const int8_t *bt = b + (t) * L8_PACK_NR * kp + (q) * L8_PACK_NR;                               \
        s##t##0 = _mm256_add_epi32(s##t##0, _mm256_madd_epi16(av, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)bt))));      \
        s##t##1 = _mm256_add_epi32(s##t##1, _mm256_madd_epi16(av, _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(bt + 16))))); \
        PIN(s##t##0); PIN(s##t##1);                                                                    \
    } while (0)

static T_AVX2 void gemv4_avx2(const int16_t *a, const int8_t *b, int64_t kp, int32_t *c) {
    __m256i s00 = _mm256_setzero_si256(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00, s30 = s00,
            s31 = s00;
    for (int64_t q = 0; q < kp; q += 4) {
        for (int t = 0; t < 4; t++)
            _mm_prefetch((const char *)(b + t * L8_PACK_NR * kp + q * L8_PACK_NR + PREFETCH_GEMV), _MM_HINT_T0);
        __m256i av = _mm256_set1_epi32(load_i32(a + q));
        GEMV_PANEL(0, q); GEMV_PANEL(1, q); GEMV_PANEL(2, q); GEMV_PANEL(3, q);
        av = _mm256_set1_epi32(load_i32(a + q + 2));
        GEMV_PANEL(0, q + 2); GEMV_PANEL(1, q + 2); GEMV_PANEL(2, q + 2); GEMV_PANEL(3, q + 2);
    }
    store_row(c, s00, s01, 0);
    store_row(c + 16, s10, s11, 0);
    store_row(c + 32, s20, s21, 0);
    store_row(c + 48, s30, s31, 0);
}

static T_AVX2 void tile_avx2(const void *As, const l8_packed_b *B, int64_t i0, int64_t mb, int64_t j0, int64_t nb,
                             int32_t *acc) {
    if (mb == 1 && nb > 3 * L8_PACK_NR) { /* a full tile of four panels */
        gemv4_avx2((const int16_t *)As + i0 * B->kp, B->data + j0 * B->kp, B->kp, acc);
        return;
    }
    TILE_LOOP(ukr_avx2, int16_t)
}

/* ------------------------------------------------------------------ fp32 outlier product */
/* The order of gemm.h: per output, o ascending, each product rounded before the add. A
 * separate vmulps + vaddps (never vfmadd, which rounds once) gives exactly that; on Zen 3
 * multiplies and adds issue on different pipes, so the pair costs no more throughput than
 * one FMA. 6 rows x 16 columns: 12 independent sums hide the add latency. */
#define OSTEP(r)                                                                                       \
    do {                                                                                               \
        if (mr > (r)) {                                                                                \
            const __m256 av = _mm256_broadcast_ss(X + (r) * ldx + o);                                  \
            s##r##0 = _mm256_add_ps(s##r##0, _mm256_mul_ps(av, b0));                                   \
            s##r##1 = _mm256_add_ps(s##r##1, _mm256_mul_ps(av, b1));                                   \
        }                                                                                              \
    } while (0)
#define OSTORE(r)                                                                                      \
    do {                                                                                               \
        if (mr > (r)) {                                                                                \
            _mm256_storeu_ps(S + (r) * lds, s##r##0);                                                  \
            _mm256_storeu_ps(S + (r) * lds + 8, s##r##1);                                              \
        }                                                                                              \
    } while (0)

#define OLOAD(r)                                                                                       \
    do {                                                                                               \
        if (mr > (r)) {                                                                                \
            s##r##0 = _mm256_loadu_ps(S + (r) * lds);                                                  \
            s##r##1 = _mm256_loadu_ps(S + (r) * lds + 8);                                              \
        }                                                                                              \
    } while (0)

static inline __attribute__((always_inline)) T_AVX2 void oukr_avx2(const float *X, int64_t ldx, int64_t no,
                                                                     const float *W, float *S, int64_t lds,
                                                                     const int mr, int accumulate) {
    __m256 s00 = _mm256_setzero_ps(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00, s30 = s00,
           s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00;
    if (accumulate) { OLOAD(0); OLOAD(1); OLOAD(2); OLOAD(3); OLOAD(4); OLOAD(5); }
    for (int64_t o = 0; o < no; o++) {
        const __m256 b0 = _mm256_loadu_ps(W + o * L8_OUT_NR), b1 = _mm256_loadu_ps(W + o * L8_OUT_NR + 8);
        OSTEP(0); OSTEP(1); OSTEP(2); OSTEP(3); OSTEP(4); OSTEP(5);
    }
    OSTORE(0); OSTORE(1); OSTORE(2); OSTORE(3); OSTORE(4); OSTORE(5);
}
_Static_assert(L8_OUT_MR == 6 && L8_OUT_NR == 16, "oukr_avx2 is written for 6 x 16");

T_AVX2 void l8_outlier_tile_avx2(const float *X, int64_t ldx, int64_t mr, int64_t no, const float *Wpanel, float *S,
                                 int64_t lds, int accumulate) {
    switch (mr) {
    case 1: oukr_avx2(X, ldx, no, Wpanel, S, lds, 1, accumulate); break;
    case 2: oukr_avx2(X, ldx, no, Wpanel, S, lds, 2, accumulate); break;
    case 3: oukr_avx2(X, ldx, no, Wpanel, S, lds, 3, accumulate); break;
    case 4: oukr_avx2(X, ldx, no, Wpanel, S, lds, 4, accumulate); break;
    case 5: oukr_avx2(X, ldx, no, Wpanel, S, lds, 5, accumulate); break;
    default: oukr_avx2(X, ldx, no, Wpanel, S, lds, 6, accumulate); break;
    }
}

/* B[j + r, p] * scale[r] for the 16 rows of a panel (0 in padding rows) into *w0 (rows 0-7)
 * and *w1 (rows 8-15): one column of a panel, sign-extended in place from the pair (avx2) or
 * quad (vnni) layout, then (float)B * scale as in the portable code. */
static inline __attribute__((always_inline)) T_AVX2 void panel_column_f32(const l8_packed_b *pb, int64_t j, int64_t p,
                                                                            __m256 sc0, __m256 sc1, __m256 *w0,
                                                                            __m256 *w1) {
    const int8_t *panel = pb->data + j * pb->kp;
    __m256i lo, hi;
    if (pb->kernel == L8_KERNEL_AVX2) { /* 16 rows x 2 bytes: byte p % 2 of each int16 lane */
        __m256i v = _mm256_loadu_si256((const __m256i *)(panel + (p / 2) * 32));
        v = p % 2 ? _mm256_srai_epi16(v, 8) : _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
        lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(v));
        hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1));
    } else { /* 16 rows x 4 bytes: byte p % 4 of each int32 lane */
        const __m128i c = _mm_cvtsi32_si128(8 * (3 - (int)(p % 4)));
        lo = _mm256_loadu_si256((const __m256i *)(panel + (p / 4) * 64));
        hi = _mm256_loadu_si256((const __m256i *)(panel + (p / 4) * 64 + 32));
        lo = _mm256_srai_epi32(_mm256_sll_epi32(lo, c), 24);
        hi = _mm256_srai_epi32(_mm256_sll_epi32(hi, c), 24);
    }
    *w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(lo), sc0);
    *w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(hi), sc1);
}

T_AVX2 void l8_panel_column_f32_avx2(const l8_packed_b *pb, int64_t j, int64_t p, const float *scale, float *dst) {
    __m256 w0, w1;
    panel_column_f32(pb, j, p, _mm256_loadu_ps(scale), _mm256_loadu_ps(scale + 8), &w0, &w1);
    _mm256_storeu_ps(dst, w0);
    _mm256_storeu_ps(dst + 8, w1);
}

/* The outlier product of a few rows straight from the int8 weight: each weight column of the
 * panel is dequantized in registers and used at once, instead of being stored as fp32 and
 * read back (at a few tokens that store and load cost more than the multiply-adds). The
 * weights and the order of the sums are those of l8_outlier_product. */
static inline __attribute__((always_inline)) T_AVX2 int ofused_avx2(const l8_packed_b *pb, int64_t j0,
                                                                      const float *scale, const int32_t *cols,
                                                                      int64_t no, const float *X, int64_t ldx,
                                                                      int round16, float *S, int64_t lds,
                                                                      const int mr) {
    __m256 s00 = _mm256_setzero_ps(), s01 = s00, s10 = s00, s11 = s00, s20 = s00, s21 = s00, s30 = s00,
           s31 = s00, s40 = s00, s41 = s00, s50 = s00, s51 = s00, inf = s00;
    const __m256 sc0 = _mm256_loadu_ps(scale), sc1 = _mm256_loadu_ps(scale + 8);
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)), vinf = _mm256_set1_ps(INFINITY);
    for (int64_t o = 0; o < no; o++) {
        __m256 b0, b1;
        panel_column_f32(pb, j0, cols[o], sc0, sc1, &b0, &b1);
        if (round16) { /* float16 x: the weight rounded to fp16; beyond its range is an error */
            b0 = _mm256_cvtph_ps(_mm256_cvtps_ph(b0, _MM_FROUND_TO_NEAREST_INT));
            b1 = _mm256_cvtph_ps(_mm256_cvtps_ph(b1, _MM_FROUND_TO_NEAREST_INT));
            inf = _mm256_or_ps(inf, _mm256_cmp_ps(_mm256_and_ps(b0, absmask), vinf, _CMP_EQ_OQ));
            inf = _mm256_or_ps(inf, _mm256_cmp_ps(_mm256_and_ps(b1, absmask), vinf, _CMP_EQ_OQ));
        }
        OSTEP(0); OSTEP(1); OSTEP(2); OSTEP(3); OSTEP(4); OSTEP(5);
    }
    OSTORE(0); OSTORE(1); OSTORE(2); OSTORE(3); OSTORE(4); OSTORE(5);
    return _mm256_movemask_ps(inf) != 0;
}

T_AVX2 int l8_outlier_fused_avx2(const l8_packed_b *pb, int64_t j0, const float *scale, const int32_t *cols,
                                 int64_t no, const float *X, int64_t ldx, int64_t mr, int round16, float *S,
                                 int64_t lds) {
    switch (mr) {
    case 1: return ofused_avx2(pb, j0, scale, cols, no, X, ldx, round16, S, lds, 1);
    case 2: return ofused_avx2(pb, j0, scale, cols, no, X, ldx, round16, S, lds, 2);
    case 3: return ofused_avx2(pb, j0, scale, cols, no, X, ldx, round16, S, lds, 3);
    case 4: return ofused_avx2(pb, j0, scale, cols, no, X, ldx, round16, S, lds, 4);
    case 5: return ofused_avx2(pb, j0, scale, cols, no, X, ldx, round16, S, lds, 5);
    default: return ofused_avx2(pb, j0, scale, cols, no, X, ldx, round16, S, lds, 6);
    }
}

/* ------------------------------------------------------------------ AVX-VNNI */
#ifdef L8_HAVE_AVXVNNI
#define T_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))

static inline __attribute__((always_inline)) T_AVXVNNI void ukr_avxvnni(const uint8_t *a, int64_t lda,
                                                                          const int8_t *b, int64_t kc, int32_t *c,
                                                                          const int mr, int accumulate) {
    __m256i acc[MR][2];
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t q = 0; q < kc; q += 4) {
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + q * L8_PACK_NR));
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + q * L8_PACK_NR + 32));
        for (int r = 0; r < mr; r++) {
            const __m256i av = _mm256_set1_epi32(load_i32(a + r * lda + q));
            acc[r][0] = _mm256_dpbusd_avx_epi32(acc[r][0], av, b0);
            acc[r][1] = _mm256_dpbusd_avx_epi32(acc[r][1], av, b1);
        }
    }
    for (int r = 0; r < mr; r++) {
        __m256i *o = (__m256i *)(c + r * L8_GEMM_NB);
        if (accumulate) {
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_loadu_si256(o));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_loadu_si256(o + 1));
        }
        _mm256_storeu_si256(o, acc[r][0]);
        _mm256_storeu_si256(o + 1, acc[r][1]);
    }
}

static T_AVXVNNI void tile_avxvnni(const void *As, const l8_packed_b *B, int64_t i0, int64_t mb, int64_t j0,
                                   int64_t nb, int32_t *acc) {
    TILE_LOOP(ukr_avxvnni, uint8_t)
    subtract_corr(B, mb, j0, nb, acc);
}
#endif

/* ------------------------------------------------------------------ AVX-512 VNNI */
#define T_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

static inline __attribute__((always_inline)) T_AVX512VNNI void ukr_avx512vnni(const uint8_t *a, int64_t lda,
                                                                                const int8_t *b, int64_t kc,
                                                                                int32_t *c, const int mr,
                                                                                int accumulate) {
    __m512i acc[MR];
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_si512();
    for (int64_t q = 0; q < kc; q += 4) {
        const __m512i b0 = _mm512_loadu_si512((const void *)(b + q * L8_PACK_NR));
        for (int r = 0; r < mr; r++)
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(load_i32(a + r * lda + q)), b0);
    }
    for (int r = 0; r < mr; r++) {
        int32_t *o = c + r * L8_GEMM_NB;
        if (accumulate) acc[r] = _mm512_add_epi32(acc[r], _mm512_loadu_si512((const void *)o));
        _mm512_storeu_si512((void *)o, acc[r]);
    }
}

static T_AVX512VNNI void tile_avx512vnni(const void *As, const l8_packed_b *B, int64_t i0, int64_t mb, int64_t j0,
                                         int64_t nb, int32_t *acc) {
    TILE_LOOP(ukr_avx512vnni, uint8_t)
    subtract_corr(B, mb, j0, nb, acc);
}

/* ------------------------------------------------------------------ dispatch table */
static const l8_kernel_ops OPS_AVX2 = {sizeof(int16_t), stage_a_i16, tile_avx2, pack_pairs};
#ifdef L8_HAVE_AVXVNNI
static const l8_kernel_ops OPS_AVXVNNI = {1, stage_a_u8, tile_avxvnni, pack_quads};
#endif
static const l8_kernel_ops OPS_AVX512VNNI = {1, stage_a_u8, tile_avx512vnni, pack_quads};

const l8_kernel_ops *l8_x86_kernel_ops(l8_kernel kern) {
    switch (kern) {
    case L8_KERNEL_AVX2: return &OPS_AVX2;
#ifdef L8_HAVE_AVXVNNI
    case L8_KERNEL_AVXVNNI: return &OPS_AVXVNNI;
#endif
    case L8_KERNEL_AVX512VNNI: return &OPS_AVX512VNNI;
    default: return NULL;
    }
}

#else /* not x86-64: only the portable kernel exists, so these are never called */
const l8_kernel_ops *l8_x86_kernel_ops(l8_kernel kern) {
    (void)kern;
    return NULL;
}
void l8_outlier_tile_avx2(const float *X, int64_t ldx, int64_t mr, int64_t no, const float *Wpanel, float *S,
                          int64_t lds, int accumulate) {
    (void)X; (void)ldx; (void)mr; (void)no; (void)Wpanel; (void)S; (void)lds; (void)accumulate;
}
void l8_panel_column_f32_avx2(const l8_packed_b *pb, int64_t j, int64_t p, const float *scale, float *dst) {
    (void)pb; (void)j; (void)p; (void)scale; (void)dst;
}
int l8_outlier_fused_avx2(const l8_packed_b *pb, int64_t j0, const float *scale, const int32_t *cols,
                          int64_t no, const float *X, int64_t ldx, int64_t mr, int round16, float *S,
                          int64_t lds) {
    (void)pb; (void)j0; (void)scale; (void)cols; (void)no; (void)X; (void)ldx; (void)mr; (void)round16; (void)S;
    (void)lds;
    return 0;
}
#endif
