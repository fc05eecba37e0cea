/* quantize.c: CPU quantizers and outlier detection.
 *
 * Written for clarity: these loops are the reference every other backend is tested
 * against (tests/test_primitives.py compares them with float64 NumPy). Scales are
 * absmax values, not absmax/127: q = round(127 * x / absmax), x_hat = q * absmax / 127.
 * Rounding is to nearest even (lrintf in the default rounding mode).
 */
#include <math.h>
#include <stdlib.h>

#include "quantize.h"
#include "threadpool.h"

float l8_absmax(const void *x, l8_dtype t, int64_t n) {
    float m = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(l8_load(x, t, (size_t)i));
        m = a > m ? a : m;
    }
    return m;
}

/* 127 / absmax overflows for subnormal absmax; then divide in double instead. */
static inline int8_t quantize_one(float v, float absmax, float inv) {
    double r = l8_isfinite(inv) ? (double)(v * inv) : (double)v * 127.0 / (double)absmax;
    long q = lrint(r);
    return (int8_t)(q > 127 ? 127 : q < -127 ? -127 : q);
}

void l8_quantize_absmax(const void *x, l8_dtype t, int64_t n, float absmax, int8_t *q) {
    if (absmax == 0.0f) {
        memset(q, 0, (size_t)n);
        return;
    }
    const float inv = 127.0f / absmax;
    for (int64_t i = 0; i < n; i++) q[i] = quantize_one(l8_load(x, t, (size_t)i), absmax, inv);
}

typedef struct {
    const void *x;
    l8_dtype t;
    int64_t k;
    const uint8_t *skip;
    int8_t *q;
    float *scales;
} rows_job;

static void quantize_rows_range(void *arg, int64_t i0, int64_t i1) {
    const rows_job *g = arg;
    const int64_t k = g->k;
    const uint8_t *skip = g->skip;
    const size_t es = l8_dtype_size(g->t);
    for (int64_t i = i0; i < i1; i++) {
        const char *row = (const char *)g->x + (size_t)i * (size_t)k * es;
        int8_t *qr = g->q + (size_t)i * (size_t)k;
        float s = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            float a = fabsf(l8_load(row, g->t, (size_t)j));
            if (!(skip && skip[j]) && a > s) s = a;
        }
        g->scales[i] = s;
        const float inv = s > 0.0f ? 127.0f / s : 0.0f;
        for (int64_t j = 0; j < k; j++)
            qr[j] = (s == 0.0f || (skip && skip[j])) ? 0 : quantize_one(l8_load(row, g->t, (size_t)j), s, inv);
    }
}

void l8_quantize_rows(const void *x, l8_dtype t, int64_t m, int64_t k, const uint8_t *skip,
                      int8_t *q, float *scales, int nthreads) {
    rows_job g = {x, t, k, skip, q, scales};
    l8_parallel_for(m, 1, l8_threads_for(m * k, L8_PASS_MIN_PER_THREAD, nthreads), quantize_rows_range, &g);
}

void l8_quantize_zeropoint(const void *x, l8_dtype t, int64_t n, int8_t *q, float *scale, int32_t *zp) {
    float lo = 0.0f, hi = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = l8_load(x, t, (size_t)i);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    if (hi == lo) { /* all zero */
        memset(q, 0, (size_t)n);
        *scale = 0.0f;
        *zp = 0;
        return;
    }
    /* double: hi - lo can exceed FLT_MAX */
    const double s = ((double)hi - (double)lo) / 255.0;
    long z = lrint(-128.0 - (double)lo / s);
    z = z > 127 ? 127 : z < -128 ? -128 : z;
    for (int64_t i = 0; i < n; i++) {
        long v = lrint((double)l8_load(x, t, (size_t)i) / s) + z;
        q[i] = (int8_t)(v > 127 ? 127 : v < -128 ? -128 : v);
    }
    *scale = (float)s;
    *zp = (int32_t)z;
}

enum { CB = 256 }; /* a column block: each thread walks the rows of its own block */

typedef struct {
    const void *x;
    l8_dtype t;
    int64_t m, k;
    float *colmax;
} colmax_job;

static void colmax_blocks(void *arg, int64_t b0, int64_t b1) {
    const colmax_job *g = arg;
    const size_t es = l8_dtype_size(g->t);
    float *colmax = g->colmax;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t j0 = b * CB, j1 = j0 + CB < g->k ? j0 + CB : g->k;
        for (int64_t j = j0; j < j1; j++) colmax[j] = 0.0f;
        for (int64_t i = 0; i < g->m; i++) {
            const char *row = (const char *)g->x + (size_t)i * (size_t)g->k * es;
            for (int64_t j = j0; j < j1; j++) {
                float a = fabsf(l8_load(row, g->t, (size_t)j));
                colmax[j] = a > colmax[j] ? a : colmax[j];
            }
        }
    }
}

void l8_column_absmax(const void *x, l8_dtype t, int64_t m, int64_t k, float *colmax, int nthreads) {
    colmax_job g = {x, t, m, k, colmax};
    l8_parallel_for((k + CB - 1) / CB, 1, l8_threads_for(m * k, L8_PASS_MIN_PER_THREAD, nthreads), colmax_blocks, &g);
}
