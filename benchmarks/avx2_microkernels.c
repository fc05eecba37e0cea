/* avx2_microkernels.c: the AVX2 int8 micro-kernel candidates, timed on L1-resident data.
 *
 * Why csrc/core/gemm_x86.c widens int8 to int16 and uses vpmaddwd, and what bounds it:
 *   peak       register-only vpmaddwd + vpaddd loop: the multiply-pipe ceiling;
 *   madd16     the shipped kernel: 4 rows x 16 columns, B widened by vpmovsxbw,
 *              (a[p], a[p+1]) pairs broadcast, vpmaddwd + vpaddd (exact for -128 too);
 *   madd16x6   the same with 6 rows (12 of the 16 registers);
 *   maddw4/6   B already widened to int16 (as a per-panel staging buffer would give):
 *              the vpmovsxbw gone, B a memory operand of vpmaddwd;
 *   bcastb     the roles swapped: 16 rows of A int16 as vectors, B pairs broadcast;
 *   signtrick  4 x 16 with vpmaddubsw(|a|, sign(b, a)) + vpmaddwd(ones) + vpaddd
 *              (wrong for -128, and one more instruction per product pair);
 *   ubs6       ONNX Runtime's scheme (MLAS, u8 x s8): vpmaddubsw(a, b) + vpmaddwd(ones) +
 *              vpaddd, 3 instructions per 32 products against the exact kernels' 4, but its
 *              int16 pair sums saturate (2 x 255 x 127 > 32767): not exact, shown as the
 *              bound ONNX Runtime's layer works under.
 * Each reports int8 multiply-adds per ns on one core (the best of many short runs, so
 * other processes on the machine disturb it little).
 *
 * AMD EPYC Zen 3, 2026-12-03 (benchmarks/RESULTS.md): peak 82-96, madd16 61-64, madd16x6 62-67,
 * maddw4 67-71, maddw6 65-71, bcastb 67-72, signtrick 50-51, ubs6 83-85. Every exact scheme needs a
 * vpmaddwd and a vpaddd per 16 products; the saturating one gets 32 products from a
 * vpmaddubsw, a vpmaddwd and a vpaddd, and runs 1.17-1.25x faster than the best exact one.
 *
 * Build and run:  cc -O3 benchmarks/avx2_microkernels.c -o /tmp/uk && /tmp/uk
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define K 1024
#define PIN(v) __asm__("" : "+x"(v)) /* keep GCC from reassociating the sums (it spills) */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static inline int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

__attribute__((target("avx2"), noinline)) static void peak(long n, int32_t *out) {
    __m256i a = _mm256_set1_epi16(3), b = _mm256_set1_epi16(5), c = _mm256_set1_epi16(7);
    __m256i c0 = a, c1 = a, c2 = a, c3 = a, c4 = a, c5 = a, c6 = a, c7 = a;
    for (long i = 0; i < n; i++) {
        PIN(b); PIN(c);
        c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(b, c)); c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(b, a));
        c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(c, a)); c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(c, c));
        c4 = _mm256_add_epi32(c4, _mm256_madd_epi16(b, b)); c5 = _mm256_add_epi32(c5, _mm256_madd_epi16(a, a));
        c6 = _mm256_add_epi32(c6, _mm256_madd_epi16(a, b)); c7 = _mm256_add_epi32(c7, _mm256_madd_epi16(c, b));
        PIN(c0); PIN(c1); PIN(c2); PIN(c3); PIN(c4); PIN(c5); PIN(c6); PIN(c7);
    }
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                                 _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
    _mm256_storeu_si256((__m256i *)out, s);
}

#define MROW(r)                                                                                          \
    av = _mm256_set1_epi32(load_i32(a##r + q));                                                          \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(av, b0));                                      \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(av, b1));                                      \
    PIN(c##r##0); PIN(c##r##1);

/* B packed [k/2][16][2], A int16 rows */
__attribute__((target("avx2"), noinline)) static void madd16(const int16_t *a, long lda, const int8_t *b, long kc,
                                                             int32_t *c) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    const int16_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    for (long q0 = 0; q0 < kc; q0 += 4) /* two k pairs per trip, as in gemm_x86.c */
        for (long q = q0; q < q0 + 4; q += 2) {
            const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + q * 16)));
            const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + q * 16 + 16)));
            __m256i av;
            MROW(0) MROW(1) MROW(2) MROW(3)
        }
    __m256i *o = (__m256i *)c;
    o[0] = c00; o[1] = c01; o[2] = c10; o[3] = c11; o[4] = c20; o[5] = c21; o[6] = c30; o[7] = c31;
}

/* the same with 6 rows: each widened B pair serves 6 rows instead of 4 (12 of the 16 registers) */
__attribute__((target("avx2"), noinline)) static void madd16x6(const int16_t *a, long lda, const int8_t *b, long kc,
                                                               int32_t *c) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
            c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const int16_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
    for (long q0 = 0; q0 < kc; q0 += 4)
        for (long q = q0; q < q0 + 4; q += 2) {
            const __m256i b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + q * 16)));
            const __m256i b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + q * 16 + 16)));
            __m256i av;
            MROW(0) MROW(1) MROW(2) MROW(3) MROW(4) MROW(5)
        }
    __m256i *o = (__m256i *)c;
    o[0] = c00; o[1] = c01; o[2] = c10; o[3] = c11; o[4] = c20; o[5] = c21; o[6] = c30; o[7] = c31;
    o[8] = c40; o[9] = c41; o[10] = c50; o[11] = c51;
}

#define SROW(r)                                                                                          \
    av = _mm256_set1_epi32(load_i32(a##r + q));                                                          \
    aa = _mm256_abs_epi8(av);                                                                            \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(aa, _mm256_sign_epi8(b0, av)), ones)); \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(aa, _mm256_sign_epi8(b1, av)), ones)); \
    PIN(c##r##0); PIN(c##r##1);

/* B packed [k/4][16][4], A int8 rows */
__attribute__((target("avx2"), noinline)) static void signtrick(const int8_t *a, long lda, const int8_t *b, long kc,
                                                                int32_t *c) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    for (long q0 = 0; q0 < kc; q0 += 8) /* two k quads per trip */
        for (long q = q0; q < q0 + 8; q += 4) {
            const __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + q * 16));
            const __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + q * 16 + 32));
            __m256i av, aa;
            SROW(0) SROW(1) SROW(2) SROW(3)
        }
    __m256i *o = (__m256i *)c;
    o[0] = c00; o[1] = c01; o[2] = c10; o[3] = c11; o[4] = c20; o[5] = c21; o[6] = c30; o[7] = c31;
}


#define WROW(r)                                                                                          \
    av = _mm256_set1_epi32(load_i32(a##r + q));                                                          \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(av, _mm256_load_si256((const __m256i *)(bw + q * 16))));      \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(av, _mm256_load_si256((const __m256i *)(bw + q * 16 + 16)))); \
    PIN(c##r##0); PIN(c##r##1);

/* B pre-widened int16 [k/2][16][2] */
__attribute__((target("avx2"), noinline)) static void maddw4(const int16_t *a, long lda, const int16_t *bw, long kc,
                                                             int32_t *c) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    const int16_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda;
    for (long q0 = 0; q0 < kc; q0 += 4)
        for (long q = q0; q < q0 + 4; q += 2) {
            __m256i av;
            WROW(0) WROW(1) WROW(2) WROW(3)
        }
    __m256i *o = (__m256i *)c;
    o[0] = c00; o[1] = c01; o[2] = c10; o[3] = c11; o[4] = c20; o[5] = c21; o[6] = c30; o[7] = c31;
}
__attribute__((target("avx2"), noinline)) static void maddw6(const int16_t *a, long lda, const int16_t *bw, long kc,
                                                             int32_t *c) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
            c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const int16_t *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
    for (long q0 = 0; q0 < kc; q0 += 4)
        for (long q = q0; q < q0 + 4; q += 2) {
            __m256i av;
            WROW(0) WROW(1) WROW(2) WROW(3) WROW(4) WROW(5)
        }
    __m256i *o = (__m256i *)c;
    o[0] = c00; o[1] = c01; o[2] = c10; o[3] = c11; o[4] = c20; o[5] = c21; o[6] = c30; o[7] = c31;
    o[8] = c40; o[9] = c41; o[10] = c50; o[11] = c51;
}
/* A as the vector operand: A staged [k/2][8 rows][2] int16; B pairs broadcast from int16 [16][k/2][2]... use [k/2][16][2] */
#define BCOL(j)                                                                                          \
    bv = _mm256_set1_epi32(load_i32(bw + q * 16 + 2 * (j)));                                              \
    d##j = _mm256_add_epi32(d##j, _mm256_madd_epi16(bv, _mm256_load_si256((const __m256i *)(a8 + q * 8)))); \
    e##j = _mm256_add_epi32(e##j, _mm256_madd_epi16(bv, _mm256_load_si256((const __m256i *)(a8 + 8 * kc + q * 8)))); \
    PIN(d##j); PIN(e##j);
__attribute__((target("avx2"), noinline)) static void bcastb(const int16_t *a8, const int16_t *bw, long kc, int32_t *c) {
    __m256i d0 = _mm256_setzero_si256(), d1 = d0, d2 = d0, d3 = d0, d4 = d0, d5 = d0, e0 = d0, e1 = d0, e2 = d0, e3 = d0,
            e4 = d0, e5 = d0;
    for (long q = 0; q < kc; q += 2) {
        __m256i bv;
        BCOL(0) BCOL(1) BCOL(2) BCOL(3) BCOL(4) BCOL(5)
    }
    __m256i *o = (__m256i *)c;
    o[0] = d0; o[1] = d1; o[2] = d2; o[3] = d3; o[4] = d4; o[5] = d5; o[6] = e0; o[7] = e1; o[8] = e2; o[9] = e3;
    o[10] = e4; o[11] = e5;
}

#define UROW(r)                                                                                          \
    av = _mm256_set1_epi32(load_i32(au##r + q));                                                          \
    c##r##0 = _mm256_add_epi32(c##r##0, _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones)); \
    c##r##1 = _mm256_add_epi32(c##r##1, _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones)); \
    PIN(c##r##0); PIN(c##r##1);
__attribute__((target("avx2"), noinline)) static void ubs6(const uint8_t *a, long lda, const int8_t *b, long kc, int32_t *c) {
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
            c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *au0 = a, *au1 = a + lda, *au2 = a + 2 * lda, *au3 = a + 3 * lda, *au4 = a + 4 * lda, *au5 = a + 5 * lda;
    for (long q = 0; q < kc; q += 4) {
        const __m256i b0 = _mm256_loadu_si256((const __m256i *)(b + q * 16));
        const __m256i b1 = _mm256_loadu_si256((const __m256i *)(b + q * 16 + 32));
        __m256i av;
        UROW(0) UROW(1) UROW(2) UROW(3) UROW(4) UROW(5)
    }
    __m256i *o = (__m256i *)c;
    o[0] = c00; o[1] = c01; o[2] = c10; o[3] = c11; o[4] = c20; o[5] = c21; o[6] = c30; o[7] = c31;
    o[8] = c40; o[9] = c41; o[10] = c50; o[11] = c51;
}
/* C[r][j] = sum_p A[r][p] B[j][p] for the layouts above, to check every exact variant */
static int check(const char *name, const int32_t *c, const int16_t *a, long lda, const int8_t *b, long kc, int rows) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 16; j++) {
            long s = 0;
            for (long p = 0; p < kc; p++) s += (long)a[r * lda + p] * b[(p / 2) * 32 + j * 2 + p % 2];
            const int32_t got = c[(r * 2 + j / 8) * 8 + j % 8];
            if (got != s) {
                printf("%s: wrong sum at row %d, column %d (%d, expected %ld)\n", name, r, j, got, s);
                return 1;
            }
        }
    return 0;
}

int main(void) {
    const long kc = 512; /* a 16 x 512 int16 panel slice (16 KiB) stays in L1 with the rows of A */
    int16_t *A16 = aligned_alloc(64, 16 * K * 2), *BW = aligned_alloc(64, 16 * K * 2);
    int8_t *A8 = aligned_alloc(64, 4 * K), *B = aligned_alloc(64, 16 * K);
    int32_t C[128] __attribute__((aligned(32)));
    for (int i = 0; i < 16 * K; i++) A16[i] = (int8_t)(rand() % 255 - 127);
    for (int i = 0; i < 4 * K; i++) A8[i] = (int8_t)A16[i];
    for (int i = 0; i < 16 * K; i++) B[i] = (int8_t)(rand() % 255 - 127), BW[i] = B[i];
    /* the exact variants on the [k/2][16][2] layout give exact sums (bcastb, with A in its own
     * layout, and the inexact two are timed only) */
    int bad = 0;
    madd16(A16, K, B, kc, C); bad |= check("madd16", C, A16, K, B, kc, 4);
    madd16x6(A16, K, B, kc, C); bad |= check("madd16x6", C, A16, K, B, kc, 6);
    maddw4(A16, K, BW, kc, C); bad |= check("maddw4", C, A16, K, B, kc, 4);
    maddw6(A16, K, BW, kc, C); bad |= check("maddw6", C, A16, K, B, kc, 6);
    if (bad) return 1;
    const long n = 100000;
    double best[8] = {1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9, 1e9};
#define TIME(i, call)                                                                                    \
    do {                                                                                                 \
        double t = now();                                                                                \
        call;                                                                                            \
        t = now() - t;                                                                                   \
        if (t < best[i]) best[i] = t;                                                                    \
    } while (0)
    for (int it = 0; it < 40000; it++) {
        if (it % 1000 == 0) TIME(0, peak(n, C));
        TIME(1, madd16(A16, K, B, kc, C));
        TIME(2, madd16x6(A16, K, B, kc, C));
        TIME(3, maddw4(A16, K, BW, kc, C));
        TIME(4, maddw6(A16, K, BW, kc, C));
        TIME(5, bcastb(A16, BW, kc, C));
        TIME(6, signtrick(A8, K, B, kc, C));
        TIME(7, ubs6((const uint8_t *)A16, 2 * K, B, kc, C));
    }
    const double macs[8] = {8.0 * 16 * n, 4.0 * 16 * kc, 6.0 * 16 * kc, 4.0 * 16 * kc,
                            6.0 * 16 * kc, 16.0 * 6 * kc, 4.0 * 16 * kc, 6.0 * 16 * kc};
    const char *names[8] = {"peak (vpmaddwd + vpaddd, registers only)", "madd16 4x16 (shipped)", "madd16x6 6x16",
                            "maddw4 4x16, B int16", "maddw6 6x16, B int16", "bcastb 16x6, A as vectors",
                            "signtrick 4x16 (vpmaddubsw, wrong for -128)", "ubs6 6x16 (ONNX Runtime's, saturates)"};
    printf("int8 multiply-adds per ns, one core, k slice %ld:\n", kc);
    for (int i = 0; i < 8; i++) printf("  %-46s %6.1f\n", names[i], macs[i] / best[i] * 1e-9);
    printf("  best exact / shipped %.2f, saturating / best exact %.2f\n",
           (macs[3] / best[3] > macs[4] / best[4] ? macs[3] / best[3] : macs[4] / best[4]) / (macs[1] / best[1]),
           (macs[7] / best[7]) / (macs[3] / best[3] > macs[4] / best[4] ? macs[3] / best[3] : macs[4] / best[4]));
    return C[0] == 12345; /* keep the results alive */
}
