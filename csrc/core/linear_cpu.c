/* linear_cpu.c: the CPU backend of Int8Linear (LLM.int8() forward on the host).
 *
 * Forward, for x (m, in):
 *   1. one pass over x: column absmax (dynamic outliers: any |x| >= threshold) and a
 *      NaN/Inf check;
 *   2. outlier set O = known columns U dynamic columns;
 *   3. vector-wise quantization of x with O excluded from the row scales (quantize.c);
 *   4. int8 GEMM (gemm.c, gemm_x86.c) whose per-tile epilogue computes
 *        y = acc * sx[i] * sw[j] / 127^2 + bias[j] + sum_{o in O} x[i,o] * wo[j,o]
 *      with fp32 accumulation, and writes fp32 or fp16.
 * Known outlier columns use the layer's fp16 weight columns; dynamic ones use the
 * int8 weights dequantized (the best the layer holds for them). The outlier operands
 * keep x's precision: float16 x multiplies fp16 values (dynamic weight columns are
 * rounded to fp16; one beyond fp16's range is a ValueError), float32 x multiplies
 * x in fp32 with the dequantized weight unrounded, so a finite |x| > 65504 in an
 * outlier column never becomes inf.
 *
 * The layer's kernel (L->cpu_kernel) is fixed at creation, when the int8 weight is
 * packed for it. With a SIMD kernel, steps 1, 3 and the epilogue use the AVX2 + F16C
 * versions (quantize_x86.c), which give the same bits as the portable ones.
 */
#include <stdlib.h>

#include "gemm.h"
#include "linear.h"
#include "quantize.h"

typedef struct {
    l8_packed_b wq;   /* (out, in), packed for L->cpu_kernel */
    float *wscale;    /* (out,) */
    uint16_t *wout;   /* (out, n_outliers) fp16 */
    float *bias;      /* (out,) or NULL */
} cpu_impl;

static void cpu_destroy(l8_layer *L) {
    cpu_impl *c = L->impl;
    if (!c) return;
    l8_packed_b_free(&c->wq);
    free(c->wscale);
    free(c->wout);
    free(c->bias);
    free(c);
    L->impl = NULL;
}

static int cpu_create(l8_layer *L, const l8_weights *w, l8_status *st) {
    const size_t n = (size_t)L->out_features, k = (size_t)L->in_features, no = (size_t)L->n_outliers;
    cpu_impl *c = calloc(1, sizeof *c);
    if (!c) return l8_fail(st, L8_ERR_NOMEM, "could not allocate the layer");
    L->impl = c;
    c->wscale = l8_malloc_array(n, sizeof(float));
    c->wout = l8_malloc_array(n * no, sizeof(uint16_t));
    c->bias = L->has_bias ? l8_malloc_array(n, sizeof(float)) : NULL;
    if (l8_pack_b((l8_kernel)L->cpu_kernel, w->wq, (int64_t)n, (int64_t)k, &c->wq) < 0 || !c->wscale ||
        !c->wout || (L->has_bias && !c->bias)) {
        cpu_destroy(L);
        return l8_fail(st, L8_ERR_NOMEM, "could not allocate %zu bytes for a %zu x %zu int8 weight",
                       n * k, n, k);
    }
    memcpy(c->wscale, w->wscale, n * sizeof(float));
    if (no) memcpy(c->wout, w->wout, n * no * sizeof(uint16_t));
    if (L->has_bias) memcpy(c->bias, w->bias, n * sizeof(float));
    L->nbytes = c->wq.nbytes + n * sizeof(float) + n * no * sizeof(uint16_t) +
                (L->has_bias ? n * sizeof(float) : 0) + no * sizeof(int32_t);
    return 0;
}

static int cpu_export(const l8_layer *L, l8_weights *out, l8_status *st) {
    (void)st;
    const cpu_impl *c = L->impl;
    const size_t n = (size_t)L->out_features, no = (size_t)L->n_outliers;
    l8_unpack_b(&c->wq, out->wq);
    memcpy(out->wscale, c->wscale, n * sizeof(float));
    if (no) memcpy(out->wout, c->wout, n * no * sizeof(uint16_t));
    if (L->has_bias && out->bias) memcpy(out->bias, c->bias, n * sizeof(float));
    return 0;
}

/* ------------------------------------------------------------------ epilogue */
typedef struct {
    void *y;
    l8_dtype yt;
    int64_t n;
    const float *sx, *sw, *bias;
    const float *xo;   /* (m, no) outlier activations, rounded to fp16 */
    const float *woT;  /* (no, n) outlier weight columns, fp16 values */
    int64_t no;
    int simd;
} epi_ctx;

static void linear_epilogue(void *ctx, int64_t i0, int64_t j0, int64_t mb, int64_t nb,
                            const int32_t *acc, int64_t ldacc) {
    const epi_ctx *e = ctx;
    const size_t ys = l8_dtype_size(e->yt);
    for (int64_t r = 0; r < mb; r++) {
        const int64_t i = i0 + r;
        const float sxi = e->sx[i] * (1.0f / (127.0f * 127.0f));
        const float *xo = e->xo + i * e->no;
        if (e->simd) {
            l8_dequantize_row_simd(acc + r * ldacc, nb, sxi, e->sw + j0, e->bias ? e->bias + j0 : NULL, e->woT + j0,
                                   e->n, xo, e->no, (char *)e->y + (size_t)(i * e->n + j0) * ys, e->yt);
            continue;
        }
        for (int64_t c = 0; c < nb; c++) {
            const int64_t j = j0 + c;
            float v = (float)acc[r * ldacc + c] * (sxi * e->sw[j]);
            float s = 0.0f;
            for (int64_t o = 0; o < e->no; o++) s += xo[o] * e->woT[o * e->n + j];
            v += s;
            if (e->bias) v += e->bias[j];
            if (e->yt == L8_F16)
                ((uint16_t *)e->y)[i * e->n + j] = l8_float_to_half(v);
            else
                ((float *)e->y)[i * e->n + j] = v;
        }
    }
}

/* ------------------------------------------------------------------ forward */
static int cpu_forward(const l8_layer *L, const void *x, l8_dtype xt, int64_t m, void *y, l8_dtype yt,
                       int nthreads, l8_status *st) {
    const cpu_impl *c = L->impl;
    const int64_t k = L->in_features, n = L->out_features;
    const int simd = L->cpu_kernel != L8_KERNEL_PORTABLE;
    int rc = -1;
    if (m == 0) return 0;

    float *colmax = NULL, *sx = NULL, *xo = NULL, *woT = NULL;
    uint8_t *flags = NULL;
    int32_t *ocols = NULL, *known_pos = NULL;
    int8_t *xq = NULL, *wcol = NULL;

    flags = calloc((size_t)k, 1);
    ocols = l8_malloc_array((size_t)k, sizeof(int32_t));
    known_pos = l8_malloc_array((size_t)k, sizeof(int32_t));
    colmax = l8_malloc_array((size_t)k, sizeof(float));
    if (!flags || !ocols || !known_pos || !colmax) goto nomem;

    /* one pass: column absmax and the finiteness check (the SIMD pass does both) */
    int bad;
    if (simd) {
        bad = l8_column_absmax_simd(x, xt, m, k, colmax, nthreads);
    } else {
        bad = l8_find_nonfinite(x, xt, m * k) >= 0;
        if (!bad && L->threshold > 0.0f) l8_column_absmax(x, xt, m, k, colmax, nthreads);
    }
    if (bad) {
        const int64_t at = l8_find_nonfinite(x, xt, m * k);
        l8_fail(st, L8_ERR_VALUE, "x contains NaN or Inf at row %lld, column %lld; expected finite values",
                (long long)(at / k), (long long)(at % k));
        goto done;
    }

    for (int64_t j = 0; j < k; j++) known_pos[j] = -1;
    for (int64_t o = 0; o < L->n_outliers; o++) {
        flags[L->outlier_cols[o]] = 1;
        known_pos[L->outlier_cols[o]] = (int32_t)o;
    }
    if (L->threshold > 0.0f)
        for (int64_t j = 0; j < k; j++)
            if (colmax[j] >= L->threshold) flags[j] = 1;
    int64_t no = 0;
    for (int64_t j = 0; j < k; j++)
        if (flags[j]) ocols[no++] = (int32_t)j;

    xq = l8_malloc_array((size_t)m * (size_t)k, 1);
    sx = l8_malloc_array((size_t)m, sizeof(float));
    xo = l8_malloc_array((size_t)m * (size_t)no, sizeof(float));
    woT = l8_malloc_array((size_t)n * (size_t)no, sizeof(float));
    wcol = l8_malloc_array((size_t)n, 1);
    if (!xq || !sx || !xo || !woT || !wcol) goto nomem;

    if (simd) {
        if (l8_quantize_rows_simd(x, xt, m, k, flags, xq, sx, nthreads) < 0) goto nomem;
    } else {
        l8_quantize_rows(x, xt, m, k, flags, xq, sx, nthreads);
    }

    /* the outlier slice of x, exactly as given: fp16 values for float16 x, fp32 for
     * float32 x (an fp16 copy would turn a finite |x| > 65504 into inf) */
    const size_t es = l8_dtype_size(xt);
    for (int64_t i = 0; i < m; i++) {
        const char *row = (const char *)x + (size_t)i * (size_t)k * es;
        for (int64_t o = 0; o < no; o++) xo[i * no + o] = l8_load(row, xt, (size_t)ocols[o]);
    }
    /* outlier weight columns, (no, n) so the epilogue reads them along j: fp16 originals
     * where known, dequantized int8 otherwise (rounded to fp16 for float16 x) */
    for (int64_t o = 0; o < no; o++) {
        const int32_t col = ocols[o], kp = known_pos[col];
        float *dst = woT + o * n;
        if (kp >= 0) {
            for (int64_t j = 0; j < n; j++) dst[j] = l8_half_to_float(c->wout[j * L->n_outliers + kp]);
            continue;
        }
        l8_packed_b_column(&c->wq, col, wcol);
        for (int64_t j = 0; j < n; j++) dst[j] = (float)wcol[j] * (c->wscale[j] / 127.0f);
        if (xt == L8_F32) continue;
        if (simd)
            l8_round_f16_simd(dst, n);
        else
            for (int64_t j = 0; j < n; j++) dst[j] = l8_round_f16(dst[j]);
        for (int64_t j = 0; j < n; j++)
            if (!l8_isfinite(dst[j])) { /* only a float32 weight beyond fp16's range gets here */
                l8_fail(st, L8_ERR_VALUE,
                        "column %d of x is an outlier and x is float16, but the layer's weight[%lld, %d] = %g "
                        "is beyond float16's range (65504); pass x as float32 (the outlier product is then "
                        "computed in float32)",
                        (int)col, (long long)j, (int)col, (double)wcol[j] * (c->wscale[j] / 127.0f));
                goto done;
            }
    }

    epi_ctx e = {y, yt, n, sx, c->wscale, c->bias, xo, woT, no, simd};
    if (l8_gemm_s8_packed(xq, m, &c->wq, linear_epilogue, &e, nthreads) < 0) goto nomem;
    rc = 0;
    goto done;

nomem:
    l8_fail(st, L8_ERR_NOMEM, "could not allocate the scratch memory for a forward of %lld x %lld tokens",
            (long long)m, (long long)k);
done:
    free(colmax); free(sx); free(xo); free(woT); free(flags); free(ocols); free(known_pos); free(xq); free(wcol);
    return rc;
}

const l8_backend l8_cpu_backend = {
    .name = "cpu",
    .create = cpu_create,
    .destroy = cpu_destroy,
    .export_weights = cpu_export,
    .forward_host = cpu_forward,
};
