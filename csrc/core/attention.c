/* attention.c: attention of one new position over a KV cache (attention.h): the portable
 * loops and their AVX2 form, which computes the same bits. The reference is the float64
 * attention of tests/test_attention.py. */
#include "attention.h"

#include <math.h>
#include <stdlib.h>

#include "common.h"
#include "threadpool.h"

/* positions per block of the value pass: 128 rows of a 64-wide head are 32 KiB */
#define MIX_BLOCK 128

typedef struct {
    const float *q, *K, *V;
    int64_t H, KV, hd, cap, s0, n;
    float scale;
    float *o, *scratch; /* scratch: rep x (n - s0) per job */
} attn_job;

static float dot(const float *a, const float *b, int64_t hd) {
    float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[d + j] * b[d + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; d < hd; d++) s += a[d] * b[d];
    return s;
}

/* sc[r S + s] = dot(q + r hd, K + s row) * scale for the rep query heads */
static void scores(const float *q, const float *K, int64_t S, int64_t row, int64_t hd, int64_t rep, float scale,
                   float *sc) {
    for (int64_t s = 0; s < S; s++)
        for (int64_t r = 0; r < rep; r++) sc[r * S + s] = dot(q + r * hd, K + s * row, hd) * scale;
}

/* o[d] (+)= sum over s ascending of p[s] * V[s * row + d], each product rounded before its
 * add; accumulate: continue the sums in o (the positions before this block) */
static void mix(float *o, const float *p, const float *V, int64_t S, int64_t row, int64_t hd, int accumulate) {
    if (!accumulate)
        for (int64_t d = 0; d < hd; d++) o[d] = 0.0f;
    for (int64_t s = 0; s < S; s++)
        for (int64_t d = 0; d < hd; d++) o[d] += p[s] * V[s * row + d];
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define T_AVX2 __attribute__((target("avx2")))

/* The same operations lane for lane (a multiply, then an add: never an FMA), so the same
 * bits as dot() and mix(), eight floats per instruction. */
static inline __attribute__((always_inline)) T_AVX2 float hsum(__m256 acc) {
    /* ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) */
    const __m256 pairs = _mm256_hadd_ps(acc, acc);     /* a0+a1, a2+a3, ., ., a4+a5, a6+a7, ., . */
    const __m256 quads = _mm256_hadd_ps(pairs, pairs); /* (a0+a1)+(a2+a3), ., ., ., (a4+a5)+(a6+a7), ... */
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(quads), _mm256_extractf128_ps(quads, 1)));
}

/* dot(q + r hd, k) for the nq <= 4 query heads r < nq at once: four independent sums, so
 * their add latencies overlap; each is dot()'s order */
static inline __attribute__((always_inline)) T_AVX2 void dots_avx2(const float *q, const float *k, int64_t hd,
                                                                     int nq, float scale, float *out,
                                                                     int64_t ostride) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t d = 0;
    for (; d + 8 <= hd; d += 8) {
        const __m256 kv = _mm256_loadu_ps(k + d);
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(q + d), kv));
        if (nq > 1) a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(q + hd + d), kv));
        if (nq > 2) a2 = _mm256_add_ps(a2, _mm256_mul_ps(_mm256_loadu_ps(q + 2 * hd + d), kv));
        if (nq > 3) a3 = _mm256_add_ps(a3, _mm256_mul_ps(_mm256_loadu_ps(q + 3 * hd + d), kv));
    }
    const __m256 acc[4] = {a0, a1, a2, a3};
    for (int r = 0; r < nq; r++) {
        float s = hsum(acc[r]);
        for (int64_t e = d; e < hd; e++) s += q[r * hd + e] * k[e];
        out[r * ostride] = s * scale;
    }
}

static T_AVX2 void scores_avx2(const float *q, const float *K, int64_t S, int64_t row, int64_t hd, int64_t rep,
                               float scale, float *sc) {
    for (int64_t s = 0; s < S; s++)
        for (int64_t r = 0; r < rep; r += 4) {
            const int nq = rep - r < 4 ? (int)(rep - r) : 4;
            switch (nq) { /* constant nq: the unused sums vanish */
            case 1: dots_avx2(q + r * hd, K + s * row, hd, 1, scale, sc + r * S + s, S); break;
            case 2: dots_avx2(q + r * hd, K + s * row, hd, 2, scale, sc + r * S + s, S); break;
            case 3: dots_avx2(q + r * hd, K + s * row, hd, 3, scale, sc + r * S + s, S); break;
            default: dots_avx2(q + r * hd, K + s * row, hd, 4, scale, sc + r * S + s, S); break;
            }
        }
}

/* mix() with 64 columns of o held in eight registers across the block's positions */
static T_AVX2 void mix_avx2(float *o, const float *p, const float *V, int64_t S, int64_t row, int64_t hd,
                            int accumulate) {
    int64_t d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) {
        __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, o4 = o0, o5 = o0, o6 = o0, o7 = o0;
        if (accumulate) {
            o0 = _mm256_loadu_ps(o + d0); o1 = _mm256_loadu_ps(o + d0 + 8);
            o2 = _mm256_loadu_ps(o + d0 + 16); o3 = _mm256_loadu_ps(o + d0 + 24);
            o4 = _mm256_loadu_ps(o + d0 + 32); o5 = _mm256_loadu_ps(o + d0 + 40);
            o6 = _mm256_loadu_ps(o + d0 + 48); o7 = _mm256_loadu_ps(o + d0 + 56);
        }
        const float *v = V + d0;
        for (int64_t s = 0; s < S; s++, v += row) {
            const __m256 ps = _mm256_broadcast_ss(p + s);
            o0 = _mm256_add_ps(o0, _mm256_mul_ps(ps, _mm256_loadu_ps(v)));
            o1 = _mm256_add_ps(o1, _mm256_mul_ps(ps, _mm256_loadu_ps(v + 8)));
            o2 = _mm256_add_ps(o2, _mm256_mul_ps(ps, _mm256_loadu_ps(v + 16)));
            o3 = _mm256_add_ps(o3, _mm256_mul_ps(ps, _mm256_loadu_ps(v + 24)));
            o4 = _mm256_add_ps(o4, _mm256_mul_ps(ps, _mm256_loadu_ps(v + 32)));
            o5 = _mm256_add_ps(o5, _mm256_mul_ps(ps, _mm256_loadu_ps(v + 40)));
            o6 = _mm256_add_ps(o6, _mm256_mul_ps(ps, _mm256_loadu_ps(v + 48)));
            o7 = _mm256_add_ps(o7, _mm256_mul_ps(ps, _mm256_loadu_ps(v + 56)));
        }
        _mm256_storeu_ps(o + d0, o0); _mm256_storeu_ps(o + d0 + 8, o1);
        _mm256_storeu_ps(o + d0 + 16, o2); _mm256_storeu_ps(o + d0 + 24, o3);
        _mm256_storeu_ps(o + d0 + 32, o4); _mm256_storeu_ps(o + d0 + 40, o5);
        _mm256_storeu_ps(o + d0 + 48, o6); _mm256_storeu_ps(o + d0 + 56, o7);
    }
    if (d0 < hd) mix(o + d0, p, V + d0, S, row, hd - d0, accumulate); /* the last hd % 64 columns */
}
#endif

/* Jobs [j0, j1): job = b * KV + g, the rep query heads of kv head g in sequence b */
static inline __attribute__((always_inline)) void run_jobs(
    const attn_job *g, int64_t j0, int64_t j1,
    void (*scoresf)(const float *, const float *, int64_t, int64_t, int64_t, int64_t, float, float *),
    void (*mixf)(float *, const float *, const float *, int64_t, int64_t, int64_t, int)) {
    const int64_t rep = g->H / g->KV, hd = g->hd, S = g->n - g->s0, row = g->KV * hd;
    for (int64_t job = j0; job < j1; job++) {
        const int64_t b = job / g->KV, kv = job % g->KV;
        const float *q = g->q + (b * g->H + kv * rep) * hd;
        const float *K = g->K + (b * g->cap + g->s0) * row + kv * hd;
        const float *V = g->V + (b * g->cap + g->s0) * row + kv * hd;
        float *o = g->o + (b * g->H + kv * rep) * hd;
        float *sc = g->scratch + job * rep * S;
        /* scores: each cached key read once for the rep query heads that share it */
        scoresf(q, K, S, row, hd, rep, g->scale, sc);
        for (int64_t r = 0; r < rep; r++) {
            float *p = sc + r * S, mx = p[0], sum = 0.0f;
            for (int64_t s = 1; s < S; s++) mx = p[s] > mx ? p[s] : mx;
            for (int64_t s = 0; s < S; s++) sum += (p[s] = expf(p[s] - mx));
            for (int64_t s = 0; s < S; s++) p[s] /= sum;
        }
        /* values in blocks of positions, each block's rows read from memory by the first
         * query head and from cache by the others */
        for (int64_t s0 = 0; s0 < S; s0 += MIX_BLOCK) {
            const int64_t len = S - s0 < MIX_BLOCK ? S - s0 : MIX_BLOCK;
            for (int64_t r = 0; r < rep; r++) mixf(o + r * hd, sc + r * S + s0, V + s0 * row, len, row, hd, s0 > 0);
        }
    }
}

static void attn_jobs(void *arg, int64_t j0, int64_t j1) { run_jobs(arg, j0, j1, scores, mix); }

#if defined(__x86_64__) && defined(__GNUC__)
static T_AVX2 void attn_jobs_avx2(void *arg, int64_t j0, int64_t j1) { run_jobs(arg, j0, j1, scores_avx2, mix_avx2); }
#endif

int l8_attention_decode(const float *q, const float *K, const float *V, int64_t B, int64_t H, int64_t KV,
                        int64_t hd, int64_t cap, int64_t s0, int64_t n, float scale, float *o, int simd,
                        int nthreads) {
    const int64_t jobs = B * KV, S = n - s0;
    if (jobs == 0 || hd == 0) return 0;
    float *scratch = l8_malloc_array((size_t)(B * H) * (size_t)S, sizeof(float));
    if (!scratch) return -1;
    attn_job g = {q, K, V, H, KV, hd, cap, s0, n, scale, o, scratch};
    /* a job reads 2 S hd floats: one thread per 2^16 of them */
    l8_range_fn fn = attn_jobs;
#if defined(__x86_64__) && defined(__GNUC__)
    if (simd) fn = attn_jobs_avx2;
#else
    (void)simd;
#endif
    l8_parallel_for(jobs, 1, l8_threads_for(jobs * 2 * S * hd, L8_PASS_MIN_PER_THREAD, nthreads), fn, &g);
    free(scratch);
    return 0;
}
