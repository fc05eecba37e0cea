/* avx2_microkernels.c: the AVX2 int8 micro-kernel candidates, timed on L1-resident data.
 *
 * Why csrc/gemm_x86.c widens int8 to int16 and uses vpmaddwd rather than vpmaddubsw:
 *   peak      register-only vpmaddwd + vpaddd loop: the multiply-pipe ceiling;
 *   madd16    the shipped kernel: 4 rows x 16 columns, B widened by vpmovsxbw,
 *             (a[p], a[p+1]) pairs broadcast, vpmaddwd + vpaddd (exact for -128 too);
 *   signtrick 4 x 16 with vpmaddubsw(|a|, sign(b, a)) + vpmaddwd(ones) + vpaddd
 *             (wrong for -128, and no fewer instructions per product).
 * Each reports int8 multiply-adds per ns on one core (the best of many short runs, so
 * other processes on the machine disturb it little). Results on the 2-core AMD EPYC
 * (Zen 3) of benchmarks/RESULTS_cpu.md: peak ~105, madd16 ~77, signtrick ~68; on a later
 * loaded run of the same machine: peak 96, madd16 65.5, signtrick 51.6, madd16x6 68.2 (+4%).
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

int main(void) {
    int16_t *A16 = aligned_alloc(64, 6 * K * 2);
    int8_t *A8 = aligned_alloc(64, 4 * K), *B = aligned_alloc(64, 16 * K);
    int32_t C[96] __attribute__((aligned(32)));
    for (int i = 0; i < 6 * K; i++) A16[i] = (int8_t)(rand() % 255 - 127);
    for (int i = 0; i < 4 * K; i++) A8[i] = (int8_t)A16[i];
    for (int i = 0; i < 16 * K; i++) B[i] = (int8_t)(rand() % 255 - 127);
    const long n = 100000;
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    for (int it = 0; it < 20000; it++) {
        double t;
        if (it % 1000 == 0) {
            t = now(); peak(n, C); t = now() - t;
            if (t < best[0]) best[0] = t;
        }
        t = now(); madd16(A16, K, B, K, C); t = now() - t;
        if (t < best[1]) best[1] = t;
        t = now(); signtrick(A8, K, B, K, C); t = now() - t;
        if (t < best[2]) best[2] = t;
        t = now(); madd16x6(A16, K, B, K, C); t = now() - t;
        if (t < best[3]) best[3] = t;
    }
    printf("int8 multiply-adds per ns, one core:\n");
    printf("  peak (vpmaddwd + vpaddd, registers only) %6.1f\n", 8.0 * 16 * n / best[0] * 1e-9);
    printf("  madd16 4x16 (shipped)                    %6.1f\n", 4.0 * 16 * K / best[1] * 1e-9);
    printf("  signtrick 4x16 (vpmaddubsw)              %6.1f\n", 4.0 * 16 * K / best[2] * 1e-9);
    printf("  madd16 6x16                              %6.1f\n", 6.0 * 16 * K / best[3] * 1e-9);
    return C[0] == 12345; /* keep the results alive */
}
