/* gemm.c: int8 GEMM on the CPU: the reference loop, the portable blocked driver, and
 * packing + the tile driver for the SIMD kernels of gemm_x86.c.
 *
 * Portable kernel: a 1 x 4 block of dot products so each A row slice is read once for
 * four B rows; plain C that GCC and Clang vectorize for the baseline ISA.
 * SIMD kernels: B is packed once (l8_pack_b, layouts in gemm.h), A is staged per call
 * in the kernel's element type, and the same (MB x NB) tile walk hands each finished
 * tile to the epilogue. Which kernel runs is the caller's choice (cpu_features.h). */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* madvise, MADV_HUGEPAGE */
#endif
#include <stdlib.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gemm.h"
#include "threadpool.h"

_Static_assert(L8_GEMM_MB > 0 && L8_GEMM_NB % 4 == 0, "tile sizes: NB must be a multiple of the 4-wide kernel");
_Static_assert((int64_t)127 * 127 * L8_GEMM_MAX_K <= INT32_MAX, "int32 accumulator bound");

/* ------------------------------------------------------------------ reference */
void l8_gemm_s8_ref(const int8_t *A, const int8_t *B, int64_t m, int64_t n, int64_t k, int32_t *C) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            int32_t s = 0;
            for (int64_t p = 0; p < k; p++) s += (int32_t)A[i * k + p] * (int32_t)B[j * k + p];
            C[i * n + j] = s;
        }
}

/* ------------------------------------------------------------------ kernels */
static void dot_1x4(const int8_t *restrict a, const int8_t *restrict b0, const int8_t *restrict b1,
                    const int8_t *restrict b2, const int8_t *restrict b3, int64_t kc, int32_t *out) {
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t p = 0; p < kc; p++) {
        const int32_t av = a[p];
        s0 += av * b0[p];
        s1 += av * b1[p];
        s2 += av * b2[p];
        s3 += av * b3[p];
    }
    out[0] += s0; out[1] += s1; out[2] += s2; out[3] += s3;
}

static int32_t dot_1x1(const int8_t *restrict a, const int8_t *restrict b, int64_t kc) {
    int32_t s = 0;
    for (int64_t p = 0; p < kc; p++) s += (int32_t)a[p] * (int32_t)b[p];
    return s;
}

static void tile(const int8_t *A, const int8_t *B, int64_t k, int64_t i0, int64_t j0, int64_t mb,
                 int64_t nb, int32_t *acc) {
    memset(acc, 0, sizeof(int32_t) * L8_GEMM_MB * L8_GEMM_NB);
    for (int64_t p0 = 0; p0 < k; p0 += L8_GEMM_KC) {
        const int64_t kc = k - p0 < L8_GEMM_KC ? k - p0 : L8_GEMM_KC;
        for (int64_t r = 0; r < mb; r++) {
            const int8_t *a = A + (i0 + r) * k + p0;
            int32_t *o = acc + r * L8_GEMM_NB;
            int64_t c = 0;
            for (; c + 4 <= nb; c += 4) {
                const int8_t *b = B + (j0 + c) * k + p0;
                dot_1x4(a, b, b + k, b + 2 * k, b + 3 * k, kc, o + c);
            }
            for (; c < nb; c++) o[c] += dot_1x1(a, B + (j0 + c) * k + p0, kc);
        }
    }
}

/* ------------------------------------------------------------------ driver */
/* Below this many multiply-adds per thread a parallel region costs more than it saves
 * (waking a worker and joining it take a few microseconds; measured with
 * benchmarks/bench_contention.py --thresholds, see RESULTS.md). */
#ifndef L8_GEMM_MIN_MACS_PER_THREAD
#define L8_GEMM_MIN_MACS_PER_THREAD ((int64_t)1 << 22)
#endif

typedef struct {
    const int8_t *A, *B;
    int64_t m, n, k, tm;
    l8_epilogue ep;
    void *ctx;
} gemm_job;

static void gemm_tiles(void *arg, int64_t t0, int64_t t1) {
    const gemm_job *g = arg;
    for (int64_t t = t0; t < t1; t++) {
        /* n-major tile order: neighbouring tiles share the same weight panel */
        const int64_t ti = t % g->tm, tj = t / g->tm;
        const int64_t i0 = ti * L8_GEMM_MB, j0 = tj * L8_GEMM_NB;
        const int64_t mb = g->m - i0 < L8_GEMM_MB ? g->m - i0 : L8_GEMM_MB;
        const int64_t nb = g->n - j0 < L8_GEMM_NB ? g->n - j0 : L8_GEMM_NB;
        int32_t acc[L8_GEMM_MB * L8_GEMM_NB];
        tile(g->A, g->B, g->k, i0, j0, mb, nb, acc);
        g->ep(g->ctx, i0, j0, mb, nb, acc, L8_GEMM_NB);
    }
}

void l8_gemm_s8(const int8_t *A, const int8_t *B, int64_t m, int64_t n, int64_t k,
                l8_epilogue ep, void *ctx, int nthreads) {
    const int64_t tm = (m + L8_GEMM_MB - 1) / L8_GEMM_MB, tn = (n + L8_GEMM_NB - 1) / L8_GEMM_NB;
    gemm_job g = {A, B, m, n, k, tm, ep, ctx};
    l8_parallel_for(tm * tn, 1, l8_threads_for(m * n * k, L8_GEMM_MIN_MACS_PER_THREAD, nthreads), gemm_tiles, &g);
}

void l8_epilogue_store(void *ctx, int64_t i0, int64_t j0, int64_t mb, int64_t nb,
                       const int32_t *acc, int64_t ldacc) {
    l8_store_ctx *s = ctx;
    for (int64_t r = 0; r < mb; r++)
        memcpy(s->C + (i0 + r) * s->ldc + j0, acc + r * ldacc, sizeof(int32_t) * (size_t)nb);
}

/* ------------------------------------------------------------------ packed weights */
_Static_assert(L8_GEMM_NB % L8_PACK_NR == 0, "a tile holds whole panels");

/* k values per group in a panel: 2 for avx2's int16 pairs, 4 for vpdpbusd's quads. */
static int64_t pack_group(l8_kernel kern) { return kern == L8_KERNEL_AVX2 ? 2 : 4; }

static size_t pack_offset(const l8_packed_b *pb, int64_t j, int64_t p) {
    const int64_t g = pack_group(pb->kernel), panel = j / L8_PACK_NR, r = j % L8_PACK_NR;
    return (size_t)(panel * L8_PACK_NR * pb->kp + (p / g) * (L8_PACK_NR * g) + r * g + p % g);
}

/* Zeroed memory for a packed weight. Large ones are 2 MiB aligned and marked for
 * transparent huge pages: the GEMM streams the weight, and with 4 KiB pages every
 * page boundary costs a TLB miss and stops the hardware prefetcher. */
static void *alloc_packed(size_t bytes) {
    enum { HUGE = 2 << 20 };
    void *p;
    if (bytes < HUGE) {
        p = calloc(bytes ? bytes : 1, 1);
    } else {
        const size_t rounded = (bytes + HUGE - 1) / HUGE * HUGE;
        if (!(p = aligned_alloc(HUGE, rounded))) return NULL;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
        (void)madvise(p, rounded, MADV_HUGEPAGE); /* advice only: failure just means small pages */
#endif
        memset(p, 0, bytes);
    }
    return p;
}

/* The zeroed storage of an (n, k) weight packed for kern. -1 when out of memory. */
static int pack_alloc(l8_kernel kern, int64_t n, int64_t k, l8_packed_b *pb) {
    const l8_kernel_ops *ops = l8_x86_kernel_ops(kern);
    memset(pb, 0, sizeof *pb);
    pb->kernel = ops ? kern : L8_KERNEL_PORTABLE;
    pb->n = n;
    pb->k = k;
    pb->np = ops ? (n + L8_PACK_NR - 1) / L8_PACK_NR * L8_PACK_NR : n;
    pb->kp = ops ? (k + L8_PACK_KQ - 1) / L8_PACK_KQ * L8_PACK_KQ : k;
    const size_t bytes = (size_t)pb->np * (size_t)pb->kp;
    pb->data = ops ? alloc_packed(bytes) : l8_malloc_array(bytes, 1);
    if (ops && pb->kernel != L8_KERNEL_AVX2) pb->corr = l8_malloc_array((size_t)pb->np, sizeof(int32_t));
    if (!pb->data || (ops && pb->kernel != L8_KERNEL_AVX2 && !pb->corr)) {
        l8_packed_b_free(pb);
        return -1;
    }
    pb->nbytes = bytes + (pb->corr ? (size_t)pb->np * sizeof(int32_t) : 0);
    return 0;
}

int l8_pack_b(l8_kernel kern, const int8_t *B, int64_t n, int64_t k, l8_packed_b *pb) {
    if (pack_alloc(kern, n, k, pb) < 0) return -1;
    const l8_kernel_ops *ops = l8_x86_kernel_ops(pb->kernel);
    if (ops)
        ops->pack(B, pb);
    else
        memcpy(pb->data, B, (size_t)n * (size_t)k);
    return 0;
}

void l8_packed_b_free(l8_packed_b *pb) {
    free(pb->data);
    free(pb->corr);
    pb->data = NULL;
    pb->corr = NULL;
    pb->nbytes = 0;
}

void l8_unpack_b(const l8_packed_b *pb, int8_t *B) {
    if (pb->kernel == L8_KERNEL_PORTABLE) {
        memcpy(B, pb->data, (size_t)pb->n * (size_t)pb->k);
        return;
    }
    for (int64_t j = 0; j < pb->n; j++)
        for (int64_t p = 0; p < pb->k; p++) B[j * pb->k + p] = pb->data[pack_offset(pb, j, p)];
}

/* ------------------------------------------------------------------ packed driver */
typedef struct {
    const void *As;
    const l8_packed_b *B;
    const l8_kernel_ops *ops;
    int64_t m, n, kp, tm;
    l8_epilogue ep;
    void *ctx;
} packed_job;

static void packed_tiles(void *arg, int64_t t0, int64_t t1) {
    const packed_job *g = arg;
    for (int64_t t = t0; t < t1; t++) {
        /* m-fastest tile order: tiles running at the same time share one weight panel */
        const int64_t ti = t % g->tm, tj = t / g->tm;
        const int64_t i0 = ti * L8_GEMM_MB, j0 = tj * L8_GEMM_NB;
        const int64_t mb = g->m - i0 < L8_GEMM_MB ? g->m - i0 : L8_GEMM_MB;
        const int64_t nb = g->n - j0 < L8_GEMM_NB ? g->n - j0 : L8_GEMM_NB;
        int32_t acc[L8_GEMM_MB * L8_GEMM_NB];
        if (g->kp == 0) memset(acc, 0, sizeof acc); /* k = 0: no k slice writes the tile */
        g->ops->tile(g->As, g->B, i0, mb, j0, nb, acc);
        g->ep(g->ctx, i0, j0, mb, nb, acc, L8_GEMM_NB);
    }
}

int l8_gemm_s8_packed(const int8_t *A, int64_t m, const l8_packed_b *B, l8_epilogue ep, void *ctx, int nthreads) {
    const l8_kernel_ops *ops = l8_x86_kernel_ops(B->kernel);
    if (!ops) {
        l8_gemm_s8(A, B->data, m, B->n, B->k, ep, ctx, nthreads);
        return 0;
    }
    const int64_t n = B->n, kp = B->kp;
    if (m == 0 || n == 0) return 0;
    void *As = l8_malloc_array((size_t)m * (size_t)kp, ops->a_elem);
    if (!As) return -1;
    ops->stage_a(A, m, B->k, kp, As);
    const int64_t tm = (m + L8_GEMM_MB - 1) / L8_GEMM_MB, tn = (n + L8_GEMM_NB - 1) / L8_GEMM_NB;
    packed_job g = {As, B, ops, m, n, kp, tm, ep, ctx};
    l8_parallel_for(tm * tn, 1, l8_threads_for(m * n * kp, L8_GEMM_MIN_MACS_PER_THREAD, nthreads), packed_tiles, &g);
    free(As);
    return 0;
}

/* ------------------------------------------------------------------ column selection */
void l8_packed_b_panel_column(const l8_packed_b *pb, int64_t j, int64_t p, int8_t col[16]) {
    if (pb->kernel == L8_KERNEL_PORTABLE) {
        for (int64_t r = 0; r < 16; r++) col[r] = j + r < pb->n ? pb->data[(j + r) * pb->k + p] : 0;
        return;
    }
    const int64_t g = pack_group(pb->kernel);
    const int8_t *src = pb->data + pack_offset(pb, j, p); /* padding rows of the panel hold 0 */
    for (int64_t r = 0; r < 16; r++) col[r] = src[r * g];
}

typedef struct {
    const l8_packed_b *pb;
    const int32_t *cols;
    int64_t nc;
    l8_packed_b *out;
} select_job;

/* Panels [p0, p1) of the selection, and their rows' corrections */
static void select_panels(void *arg, int64_t p0, int64_t p1) {
    const select_job *g = arg;
    const l8_packed_b *pb = g->pb;
    l8_packed_b *out = g->out;
    const int64_t gsz = pack_group(pb->kernel);
    for (int64_t j = p0 * L8_PACK_NR; j < p1 * L8_PACK_NR; j += L8_PACK_NR) {
        /* packed to packed: column p's 16 bytes lie gsz apart in both */
        for (int64_t t = 0; t < g->nc; t++) {
            const int8_t *src = pb->data + pack_offset(pb, j, g->cols[t]);
            int8_t *dst = out->data + pack_offset(out, j, t);
            for (int64_t r = 0; r < L8_PACK_NR; r++) dst[r * gsz] = src[r * gsz];
        }
        if (out->corr) /* the vnni kernels' 128 * row sums, over the selected columns */
            for (int64_t r = j; r < j + L8_PACK_NR; r++) {
                int32_t sum = 0;
                for (int64_t t = 0; t < g->nc; t++) sum += out->data[pack_offset(out, r, t)];
                out->corr[r] = 128 * sum;
            }
    }
}

int l8_packed_b_select(const l8_packed_b *pb, const int32_t *cols, int64_t nc, l8_packed_b *out, int nthreads) {
    const int64_t n = pb->n;
    if (pack_alloc(pb->kernel, n, nc, out) < 0) return -1;
    if (pb->kernel == L8_KERNEL_PORTABLE) {
        for (int64_t j = 0; j < n; j++)
            for (int64_t t = 0; t < nc; t++) out->data[j * nc + t] = pb->data[j * pb->k + cols[t]];
        return 0;
    }
    select_job g = {pb, cols, nc, out};
    const int64_t panels = pb->np / L8_PACK_NR;
    /* a scattered byte move per weight: one thread per 2^16 of them */
    l8_parallel_for(panels, 1, l8_threads_for(pb->np * nc, L8_PASS_MIN_PER_THREAD, nthreads), select_panels, &g);
    return 0;
}

typedef struct {
    int64_t m, n, tm;
    l8_epilogue ep;
    void *ctx;
} zero_job;

static void zero_tiles(void *arg, int64_t t0, int64_t t1) {
    const zero_job *g = arg;
    static const int32_t acc[L8_GEMM_MB * L8_GEMM_NB]; /* all zero, read-only */
    for (int64_t t = t0; t < t1; t++) {
        const int64_t ti = t % g->tm, tj = t / g->tm;
        const int64_t i0 = ti * L8_GEMM_MB, j0 = tj * L8_GEMM_NB;
        const int64_t mb = g->m - i0 < L8_GEMM_MB ? g->m - i0 : L8_GEMM_MB;
        const int64_t nb = g->n - j0 < L8_GEMM_NB ? g->n - j0 : L8_GEMM_NB;
        g->ep(g->ctx, i0, j0, mb, nb, acc, L8_GEMM_NB);
    }
}

void l8_epilogue_zero(int64_t m, int64_t n, l8_epilogue ep, void *ctx, int nthreads) {
    if (m == 0 || n == 0) return;
    const int64_t tm = (m + L8_GEMM_MB - 1) / L8_GEMM_MB, tn = (n + L8_GEMM_NB - 1) / L8_GEMM_NB;
    zero_job g = {m, n, tm, ep, ctx};
    /* the epilogue is a few operations per output: one thread per 2^16 of them */
    l8_parallel_for(tm * tn, 1, l8_threads_for(m * n, L8_PASS_MIN_PER_THREAD, nthreads), zero_tiles, &g);
}

/* ------------------------------------------------------------------ outlier product */
/* The reference order (gemm.h), written so that compilers vectorize it along the 16 columns
 * without changing any output's order: o stays the outer loop of every sum. */
static void outlier_tile_portable(const float *X, int64_t ldx, int64_t mr, int64_t no, const float *Wp, float *S,
                                  int64_t lds, int accumulate) {
    float s[L8_OUT_MR][L8_OUT_NR];
    for (int64_t r = 0; r < mr; r++)
        for (int c = 0; c < L8_OUT_NR; c++) s[r][c] = accumulate ? S[r * lds + c] : 0.0f;
    for (int64_t o = 0; o < no; o++) {
        const float *w = Wp + o * L8_OUT_NR;
        for (int64_t r = 0; r < mr; r++) {
            const float xv = X[r * ldx + o];
            for (int c = 0; c < L8_OUT_NR; c++) s[r][c] += xv * w[c];
        }
    }
    for (int64_t r = 0; r < mr; r++) memcpy(S + r * lds, s[r], sizeof s[r]);
}

/* Blocking: a work item is one panel against OUT_ROWS rows; within it, o runs in slices of
 * OUT_KC so the panel's slice (16 x OUT_KC floats, 16 KiB) stays in L1 while the item's
 * row micro-tiles pass it, and the sums are carried in S from one slice to the next
 * (which continues each sum in the same order). */
#define OUT_ROWS (8 * L8_OUT_MR)
#define OUT_KC 256

typedef struct {
    const float *X, *Wp;
    float *S;
    int64_t ldx, m, no, lds, tm;
    int simd;
} outlier_job;

static void outlier_items(void *arg, int64_t t0, int64_t t1) {
    const outlier_job *g = arg;
    for (int64_t t = t0; t < t1; t++) {
        /* m-fastest: items running at the same time share one panel */
        const int64_t ti = t % g->tm, panel = t / g->tm;
        const int64_t i0 = ti * OUT_ROWS, i1 = g->m - i0 < OUT_ROWS ? g->m : i0 + OUT_ROWS;
        for (int64_t o0 = 0; o0 < g->no; o0 += OUT_KC) {
            const int64_t kc = g->no - o0 < OUT_KC ? g->no - o0 : OUT_KC;
            const float *w = g->Wp + (panel * g->no + o0) * L8_OUT_NR;
            for (int64_t i = i0; i < i1; i += L8_OUT_MR) {
                const int64_t mr = i1 - i < L8_OUT_MR ? i1 - i : L8_OUT_MR;
                const float *x = g->X + i * g->ldx + o0;
                float *s = g->S + i * g->lds + panel * L8_OUT_NR;
                if (g->simd) {
                    l8_outlier_tile_avx2(x, g->ldx, mr, kc, w, s, g->lds, o0 > 0);
                    continue;
                }
                outlier_tile_portable(x, g->ldx, mr, kc, w, s, g->lds, o0 > 0);
            }
        }
    }
}

void l8_outlier_product(const float *X, int64_t ldx, int64_t m, int64_t no, const float *Wp, int64_t n, float *S,
                        int64_t lds, int simd, int nthreads) {
    const int64_t panels = (n + L8_OUT_NR - 1) / L8_OUT_NR, tm = (m + OUT_ROWS - 1) / OUT_ROWS;
    if (m == 0 || panels == 0) return;
    outlier_job g = {X, Wp, S, ldx, m, no, lds, tm, simd};
    l8_parallel_for(tm * panels, 1, l8_threads_for(m * n * no, L8_GEMM_MIN_MACS_PER_THREAD, nthreads),
                    outlier_items, &g);
}
