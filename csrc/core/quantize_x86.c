/* quantize_x86.c: AVX2 + F16C versions of the forward's elementwise passes.
 *
 * Each function gives results bitwise equal to its reference in quantize.c (or the
 * epilogue in linear_cpu.c), which tests/test_kernels.py checks through the layer:
 *   - column absmax via integer max of |x|'s bits (non-negative IEEE values order like
 *     their bit patterns), which also finds NaN/Inf (bits >= the infinity pattern);
 *   - q = cvtps_epi32(x * (127 / s)): one fp32 multiply rounded once, then round to
 *     nearest even, as lrint((double)(x * inv)) in the reference;
 *   - dequantize + outliers + bias with the reference's operation order, no FMA
 *     (the target leaves out "fma" so the compiler cannot contract mul + add).
 * Used only when a SIMD GEMM kernel was selected, which implies AVX2 and F16C.
 */
#include <math.h>
#include <stdlib.h>

#include "quantize.h"
#include "threadpool.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <stdatomic.h>

#define T_SIMD __attribute__((target("avx2,f16c")))

/* ------------------------------------------------------------------ column absmax */
enum { CB = 256 }; /* column block per thread, as in l8_column_absmax */

static T_SIMD void colmax_block_f16(const uint16_t *x, int64_t m, int64_t k, int64_t j0, int64_t j1,
                                    uint16_t *bits) {
    const __m256i absmask = _mm256_set1_epi16(0x7FFF);
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
        __m256i mx = _mm256_setzero_si256();
        for (int64_t i = 0; i < m; i++)
            mx = _mm256_max_epu16(mx, _mm256_and_si256(absmask, _mm256_loadu_si256((const __m256i *)(x + i * k + j))));
        _mm256_storeu_si256((__m256i *)(bits + (j - j0)), mx);
    }
    for (; j < j1; j++) {
        uint16_t mx = 0;
        for (int64_t i = 0; i < m; i++) {
            const uint16_t a = x[i * k + j] & 0x7FFFu;
            mx = a > mx ? a : mx;
        }
        bits[j - j0] = mx;
    }
}

static T_SIMD void colmax_block_f32(const uint32_t *x, int64_t m, int64_t k, int64_t j0, int64_t j1,
                                    uint32_t *bits) {
    const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
        __m256i mx = _mm256_setzero_si256();
        for (int64_t i = 0; i < m; i++)
            mx = _mm256_max_epu32(mx, _mm256_and_si256(absmask, _mm256_loadu_si256((const __m256i *)(x + i * k + j))));
        _mm256_storeu_si256((__m256i *)(bits + (j - j0)), mx);
    }
    for (; j < j1; j++) {
        uint32_t mx = 0;
        for (int64_t i = 0; i < m; i++) {
            const uint32_t a = x[i * k + j] & 0x7FFFFFFFu;
            mx = a > mx ? a : mx;
        }
        bits[j - j0] = mx;
    }
}

typedef struct {
    const void *x;
    l8_dtype t;
    int64_t m, k;
    float *colmax;
    atomic_int bad;
} colmax_job;

static void colmax_blocks(void *arg, int64_t b0, int64_t b1) {
    colmax_job *g = arg;
    int bad = 0;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t j0 = b * CB, j1 = j0 + CB < g->k ? j0 + CB : g->k;
        if (g->t == L8_F16) {
            uint16_t bits[CB];
            colmax_block_f16(g->x, g->m, g->k, j0, j1, bits);
            for (int64_t j = j0; j < j1; j++) {
                bad |= bits[j - j0] >= 0x7C00u;
                g->colmax[j] = l8_half_to_float(bits[j - j0]);
            }
        } else {
            uint32_t bits[CB];
            colmax_block_f32(g->x, g->m, g->k, j0, j1, bits);
            for (int64_t j = j0; j < j1; j++) {
                bad |= bits[j - j0] >= 0x7F800000u;
                g->colmax[j] = l8_bits_f32(bits[j - j0]);
            }
        }
    }
    if (bad) atomic_fetch_or(&g->bad, 1);
}

int l8_column_absmax_simd(const void *x, l8_dtype t, int64_t m, int64_t k, float *colmax, int nthreads) {
    colmax_job g = {x, t, m, k, colmax, 0};
    l8_parallel_for((k + CB - 1) / CB, 1, l8_threads_for(m * k, L8_PASS_MIN_PER_THREAD, nthreads), colmax_blocks, &g);
    return atomic_load(&g.bad);
}

/* ------------------------------------------------------------------ row quantization */
static inline int8_t quantize_scalar(float v, float inv) {
    const long q = lrint((double)(v * inv));
    return (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
}

/* 8 values of row from column j, as fp32. */
static inline T_SIMD __m256 load8(const void *row, l8_dtype t, int64_t j) {
    return t == L8_F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + j)))
                       : _mm256_loadu_ps((const float *)row + j);
}

static inline T_SIMD __m256i quant8(__m256 v, __m256 inv) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)); /* MXCSR: round to nearest even */
    return _mm256_max_epi32(_mm256_min_epi32(q, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
}

/* absmax over the kept columns (keep: per-column all-ones / zero bit masks), as fp32. */
static T_SIMD float row_absmax(const void *row, l8_dtype t, int64_t k, const void *keep) {
    if (t == L8_F16) {
        const uint16_t *h = row, *kp = keep;
        __m256i mx = _mm256_setzero_si256();
        int64_t j = 0;
        for (; j + 16 <= k; j += 16)
            mx = _mm256_max_epu16(mx, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(h + j)),
                                                       _mm256_loadu_si256((const __m256i *)(kp + j))));
        uint16_t lanes[16], r = 0;
        _mm256_storeu_si256((__m256i *)lanes, mx);
        for (int l = 0; l < 16; l++) r = lanes[l] > r ? lanes[l] : r;
        for (; j < k; j++) r = (uint16_t)(h[j] & kp[j]) > r ? (uint16_t)(h[j] & kp[j]) : r;
        return l8_half_to_float(r);
    }
    const uint32_t *f = row, *kp = keep;
    __m256i mx = _mm256_setzero_si256();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8)
        mx = _mm256_max_epu32(mx, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(f + j)),
                                                   _mm256_loadu_si256((const __m256i *)(kp + j))));
    uint32_t lanes[8], r = 0;
    _mm256_storeu_si256((__m256i *)lanes, mx);
    for (int l = 0; l < 8; l++) r = lanes[l] > r ? lanes[l] : r;
    for (; j < k; j++) r = (f[j] & kp[j]) > r ? (f[j] & kp[j]) : r;
    return l8_bits_f32(r);
}

static T_SIMD void quantize_row(const void *row, l8_dtype t, int64_t k, float s, int8_t *q) {
    const float inv_s = 127.0f / s;
    const __m256 inv = _mm256_set1_ps(inv_s);
    /* packs interleave 128-bit lanes; this permutation puts the 32 bytes back in order */
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
        const __m256i q0 = quant8(load8(row, t, j), inv), q1 = quant8(load8(row, t, j + 8), inv);
        const __m256i q2 = quant8(load8(row, t, j + 16), inv), q3 = quant8(load8(row, t, j + 24), inv);
        const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
        _mm256_storeu_si256((__m256i *)(q + j), _mm256_permutevar8x32_epi32(w, order));
    }
    for (; j < k; j++) q[j] = quantize_scalar(l8_load(row, t, (size_t)j), inv_s);
}

typedef struct {
    const void *x;
    l8_dtype t;
    int64_t k;
    const uint8_t *skip;
    int8_t *q;
    float *scales;
    const void *keep;
    const int32_t *skipped;
    int64_t ns;
} rows_job;

static T_SIMD void quantize_rows_range(void *arg, int64_t i0, int64_t i1) {
    const rows_job *g = arg;
    const int64_t k = g->k;
    const size_t es = l8_dtype_size(g->t);
    for (int64_t i = i0; i < i1; i++) {
        const char *row = (const char *)g->x + (size_t)i * (size_t)k * es;
        int8_t *qr = g->q + (size_t)i * (size_t)k;
        const float s = row_absmax(row, g->t, k, g->keep);
        if (s == 0.0f) {
            g->scales[i] = 0.0f;
            memset(qr, 0, (size_t)k);
        } else if (!l8_isfinite(127.0f / s)) {
            l8_quantize_rows(row, g->t, 1, k, g->skip, qr, g->scales + i, 1); /* subnormal scale: the reference's path */
        } else {
            g->scales[i] = s;
            quantize_row(row, g->t, k, s, qr);
            for (int64_t o = 0; o < g->ns; o++) qr[g->skipped[o]] = 0;
        }
    }
}

int l8_quantize_rows_simd(const void *x, l8_dtype t, int64_t m, int64_t k, const uint8_t *skip, int8_t *q,
                          float *scales, int nthreads) {
    const size_t es = l8_dtype_size(t);
    void *keep = l8_malloc_array((size_t)k, es);
    int32_t *skipped = l8_malloc_array((size_t)k, sizeof(int32_t));
    if (!keep || !skipped) {
        free(keep);
        free(skipped);
        return -1;
    }
    int64_t ns = 0;
    for (int64_t j = 0; j < k; j++) {
        const int sk = skip && skip[j];
        if (t == L8_F16)
            ((uint16_t *)keep)[j] = sk ? 0 : 0x7FFFu;
        else
            ((uint32_t *)keep)[j] = sk ? 0 : 0x7FFFFFFFu;
        if (sk) skipped[ns++] = (int32_t)j;
    }
    rows_job g = {x, t, k, skip, q, scales, keep, skipped, ns};
    l8_parallel_for(m, 1, l8_threads_for(m * k, L8_PASS_MIN_PER_THREAD, nthreads), quantize_rows_range, &g);
    free(keep);
    free(skipped);
    return 0;
}

/* ------------------------------------------------------------------ fp16 rounding */
T_SIMD void l8_round_f16_simd(float *v, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(v + i, _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT)));
    for (; i < n; i++) v[i] = l8_round_f16(v[i]);
}

/* ------------------------------------------------------------------ dequantize */
T_SIMD void l8_dequantize_row_simd(const int32_t *acc, int64_t nb, float sxi, const float *sw, const float *bias,
                                   const float *s, void *y, l8_dtype yt) {
    const __m256 vs = _mm256_set1_ps(sxi);
    int64_t c = 0;
    for (; c + 8 <= nb; c += 8) {
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(acc + c))),
                                 _mm256_mul_ps(vs, _mm256_loadu_ps(sw + c)));
        v = _mm256_add_ps(v, s ? _mm256_loadu_ps(s + c) : _mm256_setzero_ps());
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + c));
        if (yt == L8_F16)
            _mm_storeu_si128((__m128i *)((uint16_t *)y + c), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        else
            _mm256_storeu_ps((float *)y + c, v);
    }
    for (; c < nb; c++) {
        float v = (float)acc[c] * (sxi * sw[c]);
        v += s ? s[c] : 0.0f;
        if (bias) v += bias[c];
        if (yt == L8_F16)
            ((uint16_t *)y)[c] = l8_float_to_half(v);
        else
            ((float *)y)[c] = v;
    }
}

#else /* not x86-64: no SIMD kernel is ever selected, so these are never called */
int l8_column_absmax_simd(const void *x, l8_dtype t, int64_t m, int64_t k, float *colmax, int nthreads) {
    l8_column_absmax(x, t, m, k, colmax, nthreads);
    return l8_find_nonfinite(x, t, m * k) >= 0;
}
int l8_quantize_rows_simd(const void *x, l8_dtype t, int64_t m, int64_t k, const uint8_t *skip, int8_t *q,
                          float *scales, int nthreads) {
    l8_quantize_rows(x, t, m, k, skip, q, scales, nthreads);
    return 0;
}
void l8_round_f16_simd(float *v, int64_t n) {
    for (int64_t i = 0; i < n; i++) v[i] = l8_round_f16(v[i]);
}
void l8_dequantize_row_simd(const int32_t *acc, int64_t nb, float sxi, const float *sw, const float *bias,
                            const float *s, void *y, l8_dtype yt) {
    (void)acc; (void)nb; (void)sxi; (void)sw; (void)bias; (void)s; (void)y; (void)yt;
}
#endif
