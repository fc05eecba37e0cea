/* linear_cpu.c: the CPU backend of Int8Linear (LLM.int8() forward on the host).
 *
 * Forward, for x (m, in):
 *   1. one pass over x: column absmax (dynamic outliers: any |x| >= threshold) and a
 *      NaN/Inf check;
 *   2. outlier set O = known columns U dynamic columns;
 *   3. vector-wise quantization of x with O excluded from the row scales (quantize.c);
 *   4. the outlier product S = x[:, O] @ wo[O, :] in fp32 (l8_outlier_product, gemm.h: a
 *      register-blocked kernel with one summation order for every kernel and thread count);
 *   5. int8 GEMM (gemm.c, gemm_x86.c) whose per-tile epilogue computes
 *        y = (acc * (sx[i] / 127^2 * sw[j]) + S[i, j]) + bias[j]
 *      in fp32 and writes fp32 or fp16. Which GEMM runs follows the share of columns left
 *      for it and the rows: none (every column an outlier): no GEMM, the epilogue on a zero
 *      product; few (SHRINK_RATIO below): the GEMM over those columns alone; else the full
 *      GEMM (the outlier columns of the quantized x are zero, so all three give the same int32).
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
#include "threadpool.h"

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
    const float *S;   /* (m, lds) outlier sums (l8_outlier_product), or NULL when there are none */
    int64_t lds;
    int simd;
} epi_ctx;

static void linear_epilogue(void *ctx, int64_t i0, int64_t j0, int64_t mb, int64_t nb,
                            const int32_t *acc, int64_t ldacc) {
    const epi_ctx *e = ctx;
    const size_t ys = l8_dtype_size(e->yt);
    for (int64_t r = 0; r < mb; r++) {
        const int64_t i = i0 + r;
        const float sxi = e->sx[i] * (1.0f / (127.0f * 127.0f));
        const float *srow = e->S ? e->S + i * e->lds + j0 : NULL;
        if (e->simd) {
            l8_dequantize_row_simd(acc + r * ldacc, nb, sxi, e->sw + j0, e->bias ? e->bias + j0 : NULL, srow,
                                   (char *)e->y + (size_t)(i * e->n + j0) * ys, e->yt);
            continue;
        }
        for (int64_t c = 0; c < nb; c++) {
            const int64_t j = j0 + c;
            float v = (float)acc[r * ldacc + c] * (sxi * e->sw[j]);
            v += srow ? srow[c] : 0.0f;
            if (e->bias) v += e->bias[j];
            if (e->yt == L8_F16)
                ((uint16_t *)e->y)[i * e->n + j] = l8_float_to_half(v);
            else
                ((float *)e->y)[i * e->n + j] = v;
        }
    }
}

/* ------------------------------------------------------------------ outlier weights */
/* The outlier weight columns in the panel layout of l8_outlier_product: fp16 originals
 * where known, the int8 column dequantized otherwise (rounded to fp16 for float16 x). Built
 * panel by panel, so each panel of the packed int8 weight is read front to back. */
typedef struct {
    const l8_layer *L;
    const int32_t *ocols, *known_pos;
    int64_t no;
    int round16, simd;
    float *Wp;
    uint8_t *bad; /* (panels,): 1 where a rounded weight is not finite */
} wpanel_job;

static void build_panels(void *arg, int64_t p0, int64_t p1) {
    wpanel_job *g = arg;
    const l8_layer *L = g->L;
    const cpu_impl *c = L->impl;
    const int64_t n = L->out_features, no = g->no;
    int8_t col[L8_OUT_NR];
    for (int64_t p = p0; p < p1; p++) {
        const int64_t j0 = p * L8_OUT_NR, nr = n - j0 < L8_OUT_NR ? n - j0 : L8_OUT_NR;
        float scale[L8_OUT_NR] = {0};
        for (int64_t r = 0; r < nr; r++) scale[r] = c->wscale[j0 + r] / 127.0f;
        for (int64_t o = 0; o < no; o++) {
            float *dst = g->Wp + (p * no + o) * L8_OUT_NR;
            const int32_t kp = g->known_pos[g->ocols[o]];
            if (kp >= 0) {
                for (int64_t r = 0; r < L8_OUT_NR; r++)
                    dst[r] = r < nr ? l8_half_to_float(c->wout[(j0 + r) * L->n_outliers + kp]) : 0.0f;
                continue;
            }
            if (g->simd) {
                l8_panel_column_f32_avx2(&c->wq, j0, g->ocols[o], scale, dst);
            } else {
                l8_packed_b_panel_column(&c->wq, j0, g->ocols[o], col);
                for (int64_t r = 0; r < L8_OUT_NR; r++) dst[r] = (float)col[r] * scale[r];
            }
            if (!g->round16) continue;
            if (g->simd)
                l8_round_f16_simd(dst, L8_OUT_NR);
            else
                for (int64_t r = 0; r < L8_OUT_NR; r++) dst[r] = l8_round_f16(dst[r]);
            for (int64_t r = 0; r < L8_OUT_NR; r++)
                if (!l8_isfinite(dst[r])) g->bad[p] = 1;
        }
    }
}

/* A few rows, every outlier column dynamic: the product straight from the int8 weight, panel
 * by panel (l8_outlier_fused_avx2), with no fp32 copy of the outlier weight columns. */
typedef struct {
    const l8_layer *L;
    const int32_t *ocols;
    int64_t no, m;
    const float *X;
    int64_t ldx;
    int round16;
    float *S;
    int64_t lds;
    uint8_t *bad; /* (panels,) */
} fused_job;

static void fused_panels(void *arg, int64_t p0, int64_t p1) {
    fused_job *g = arg;
    const cpu_impl *c = g->L->impl;
    const int64_t n = g->L->out_features;
    for (int64_t p = p0; p < p1; p++) {
        const int64_t j0 = p * L8_OUT_NR, nr = n - j0 < L8_OUT_NR ? n - j0 : L8_OUT_NR;
        float scale[L8_OUT_NR] = {0};
        for (int64_t r = 0; r < nr; r++) scale[r] = c->wscale[j0 + r] / 127.0f;
        g->bad[p] = (uint8_t)l8_outlier_fused_avx2(&c->wq, j0, scale, g->ocols, g->no, g->X, g->ldx, g->m, g->round16,
                                                   g->S + j0, g->lds);
    }
}

/* The first weight (in column, then row order) that fp16 cannot hold: the error message. */
static void fail_f16_weight(const l8_layer *L, const int32_t *ocols, const int32_t *known_pos, int64_t no,
                            l8_status *st) {
    const cpu_impl *c = L->impl;
    const int64_t n = L->out_features;
    int8_t col[L8_OUT_NR];
    for (int64_t o = 0; o < no; o++) {
        if (known_pos[ocols[o]] >= 0) continue;
        for (int64_t j0 = 0; j0 < n; j0 += L8_OUT_NR) {
            l8_packed_b_panel_column(&c->wq, j0, ocols[o], col);
            for (int64_t r = 0; r < L8_OUT_NR && j0 + r < n; r++) {
                const float v = (float)col[r] * (c->wscale[j0 + r] / 127.0f);
                if (!l8_isfinite(l8_round_f16(v))) {
                    l8_fail_f16_weight(st, (int)ocols[o], j0 + r, (double)v);
                    return;
                }
            }
        }
    }
    l8_fail(st, L8_ERR_VALUE, "an outlier weight is beyond float16's range; pass x as float32");
}

/* ------------------------------------------------------------------ forward */
/* When few columns are left for the int8 product, the GEMM runs on those columns alone: the
 * weight's kr columns are gathered into a packed copy, n kr byte moves, instead of m n (k - kr)
 * multiply-adds on zeros. Chosen when the multiply-adds saved outnumber the bytes moved
 * SHRINK_RATIO times over (the GEMM does a few dozen multiply-adds in the time of one
 * scattered byte move): with 1% outlier columns never below ~6400 tokens, with half of them
 * from 64 tokens, with 99% at any token count. */
#define SHRINK_RATIO 64

/* Rows of the outlier sums S computed and consumed at a time: S stays the size of 256 output
 * rows in fp32 however many tokens come (the weight is then streamed once per block, a cost
 * the 256 rows of multiply-adds per weight byte hide). */
#define OUT_BLOCK_ROWS 256

static int cpu_forward(const l8_layer *L, const void *x, l8_dtype xt, int64_t m, void *y, l8_dtype yt,
                       int nthreads, l8_status *st) {
    const cpu_impl *c = L->impl;
    const int64_t k = L->in_features, n = L->out_features;
    /* from the layout the weight was packed in, which the gathers below read */
    const int simd = c->wq.kernel != L8_KERNEL_PORTABLE;
    int rc = -1;
    if (m == 0) return 0;

    float *colmax = NULL, *sx = NULL, *xo = NULL, *Wp = NULL, *S = NULL;
    uint8_t *flags = NULL, *wbad = NULL;
    int32_t *ocols = NULL, *known_pos = NULL, *rcols = NULL;
    int8_t *xq = NULL, *xr = NULL;
    l8_packed_b wr = {0};

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
    const int64_t kr = k - no; /* columns left for the int8 product */

    sx = l8_malloc_array((size_t)m, sizeof(float));
    if (!sx) goto nomem;
    if (kr > 0) {
        xq = l8_malloc_array((size_t)m * (size_t)k, 1);
        if (!xq) goto nomem;
        if (simd) {
            if (l8_quantize_rows_simd(x, xt, m, k, flags, xq, sx, nthreads) < 0) goto nomem;
        } else {
            l8_quantize_rows(x, xt, m, k, flags, xq, sx, nthreads);
        }
    } else {
        for (int64_t i = 0; i < m; i++) sx[i] = 0.0f; /* every column is an outlier: no row has a scale */
    }

    const int64_t np = (n + L8_OUT_NR - 1) / L8_OUT_NR * L8_OUT_NR;
    /* a few rows and no known column: the outlier product straight from the int8 weight */
    const int fused = no > 0 && simd && m <= L8_OUT_MR && L->n_outliers == 0;
    const int64_t rows = m < OUT_BLOCK_ROWS ? m : OUT_BLOCK_ROWS; /* rows of S held at once */
    const float *X = NULL;
    if (no > 0) {
        /* the outlier slice of x, exactly as given: fp16 values for float16 x, fp32 for
         * float32 x (an fp16 copy would turn a finite |x| > 65504 into inf) */
        const int direct = no == k && xt == L8_F32; /* the slice is x itself */
        xo = direct ? NULL : l8_malloc_array((size_t)m * (size_t)no, sizeof(float));
        Wp = fused ? NULL : l8_malloc_array((size_t)np * (size_t)no, sizeof(float));
        S = l8_malloc_array((size_t)rows * (size_t)np, sizeof(float));
        wbad = calloc((size_t)(np / L8_OUT_NR) + 1, 1);
        if ((!direct && !xo) || (!fused && !Wp) || !S || !wbad) goto nomem;
        const size_t es = l8_dtype_size(xt);
        for (int64_t i = 0; i < m && !direct; i++) {
            const char *row = (const char *)x + (size_t)i * (size_t)k * es;
            if (xt == L8_F32)
                for (int64_t o = 0; o < no; o++) xo[i * no + o] = ((const float *)row)[ocols[o]];
            else
                for (int64_t o = 0; o < no; o++) xo[i * no + o] = l8_half_to_float(((const uint16_t *)row)[ocols[o]]);
        }
        X = direct ? (const float *)x : xo;
        if (fused) {
            fused_job fj = {L, ocols, no, m, X, no, xt != L8_F32, S, np, wbad};
            l8_parallel_for(np / L8_OUT_NR, 1, l8_threads_for(np * no, L8_PASS_MIN_PER_THREAD, nthreads), fused_panels,
                            &fj);
        } else {
            wpanel_job wj = {L, ocols, known_pos, no, xt != L8_F32, simd, Wp, wbad};
            l8_parallel_for(np / L8_OUT_NR, 1, l8_threads_for(np * no, L8_PASS_MIN_PER_THREAD, nthreads),
                            build_panels, &wj);
        }
        for (int64_t p = 0; p < np / L8_OUT_NR; p++)
            if (wbad[p]) {
                fail_f16_weight(L, ocols, known_pos, no, st);
                goto done;
            }
    }

    /* which int8 product: none, over the columns left, or the full one */
    const int shrink = kr > 0 && no > 0 && m * (k - kr) >= SHRINK_RATIO * kr;
    if (shrink) {
        /* few columns left: the int8 product over them alone (the same int32 sums, as x's
         * quantized outlier columns are zero) */
        rcols = l8_malloc_array((size_t)kr, sizeof(int32_t));
        xr = l8_malloc_array((size_t)m * (size_t)kr, 1);
        if (!rcols || !xr) goto nomem;
        int64_t t = 0;
        for (int64_t j = 0; j < k; j++)
            if (!flags[j]) rcols[t++] = (int32_t)j;
        for (int64_t i = 0; i < m; i++)
            for (int64_t q = 0; q < kr; q++) xr[i * kr + q] = xq[i * k + rcols[q]];
        if (l8_packed_b_select(&c->wq, rcols, kr, &wr, nthreads) < 0) goto nomem;
    }

    /* rows in blocks, so S (the outlier sums, fp32) never holds more than OUT_BLOCK_ROWS rows */
    const size_t ys = l8_dtype_size(yt);
    for (int64_t i0 = 0; i0 < m; i0 += rows) {
        const int64_t mb = m - i0 < rows ? m - i0 : rows;
        if (no > 0 && !fused) l8_outlier_product(X + i0 * no, no, mb, no, Wp, n, S, np, simd, nthreads);
        epi_ctx e = {(char *)y + (size_t)(i0 * n) * ys, yt, n, sx + i0, c->wscale, c->bias, S, np, simd};
        if (kr == 0) {
            /* no column left for the int8 product: it is zero, skip it */
            l8_epilogue_zero(mb, n, linear_epilogue, &e, nthreads);
        } else if (shrink) {
            if (l8_gemm_s8_packed(xr + i0 * kr, mb, &wr, linear_epilogue, &e, nthreads) < 0) goto nomem;
        } else {
            if (l8_gemm_s8_packed(xq + i0 * k, mb, &c->wq, linear_epilogue, &e, nthreads) < 0) goto nomem;
        }
    }
    rc = 0;
    goto done;

nomem:
    l8_fail(st, L8_ERR_NOMEM, "could not allocate the scratch memory for a forward of %lld x %lld tokens",
            (long long)m, (long long)k);
done:
    free(colmax); free(sx); free(xo); free(Wp); free(S); free(flags); free(ocols); free(known_pos);
    free(rcols); free(xq); free(xr); free(wbad);
    l8_packed_b_free(&wr);
    return rc;
}

const l8_backend l8_cpu_backend = {
    .name = "cpu",
    .create = cpu_create,
    .destroy = cpu_destroy,
    .export_weights = cpu_export,
    .forward_host = cpu_forward,
};
