/* packed_layouts.c: the packed weight layouts of every SIMD kernel, checked on any x86 CPU.
 *
 * The vnni kernels' GEMM needs their instructions, but their weight layout (k in quads, the
 * 128 x row-sum corrections) and the routines that read it outside the GEMM are plain C or
 * AVX2: packing, unpacking, column extraction, column selection (the GEMM shrink) and the
 * outlier product straight from the packed weight. Those run here for every layout, so a
 * CPU without VNNI still tests the code a VNNI CPU runs, against plain references:
 *   unpack(pack(B)) == B; corr[j] == 128 * sum_p B[j, p];
 *   panel_column(j, p) == B[j .. j + 15, p] (0 past n);
 *   panel_column_f32 == (float)B * scale, bit for bit;
 *   select(cols) == B[:, cols], with its corrections;
 *   outlier_fused == the order of gemm.h, s = fl(s + fl(x * w)), o ascending.
 * Built and run by tests/test_packed_layouts.py. Prints one line per failure, exits 1 on any,
 * 77 when the CPU has no AVX2 (nothing to check).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"
#include "cpu_features.h"
#include "gemm.h"

static int failures;

#define FAIL(...)                                                                                      \
    do {                                                                                               \
        if (failures++ < 20) printf(__VA_ARGS__);                                                      \
    } while (0)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) { /* xorshift64*: the same numbers on every machine */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

static const char *name(l8_kernel k) {
    return k == L8_KERNEL_AVX2 ? "avx2" : k == L8_KERNEL_AVXVNNI ? "avxvnni" : "avx512vnni";
}

/* The reference of l8_outlier_fused_avx2: gemm.h's order, one output at a time. The file is
 * built with -ffp-contract=off, so x * w is rounded before the add as the kernels do. */
static float fused_ref(const int8_t *B, int64_t k, int64_t j, const int32_t *cols, int64_t no, const float *x,
                       float scale, int round16) {
    float s = 0.0f;
    for (int64_t o = 0; o < no; o++) {
        float w = (float)B[j * k + cols[o]] * scale;
        if (round16) w = l8_round_f16(w);
        s = s + x[o] * w;
    }
    return s;
}

static void check_layout(l8_kernel kern, int64_t n, int64_t k) {
    const int64_t np = (n + 15) / 16 * 16;
    int8_t *B = malloc((size_t)(n * k)), *U = malloc((size_t)(n * k));
    for (int64_t i = 0; i < n * k; i++) {
        const uint32_t r = next_u32();
        B[i] = (r & 7) == 0 ? (int8_t)-128 : (int8_t)(int32_t)(r % 255u - 127u); /* -128 too */
    }
    l8_packed_b pb, sel;
    if (l8_pack_b(kern, B, n, k, &pb) < 0) {
        FAIL("%s n=%lld k=%lld: out of memory\n", name(kern), (long long)n, (long long)k);
        goto done0;
    }
    if (pb.kernel != kern) {
        FAIL("%s: packed for kernel %d instead\n", name(kern), (int)pb.kernel);
        goto done1;
    }
    l8_unpack_b(&pb, U);
    if (memcmp(B, U, (size_t)(n * k)) != 0) FAIL("%s n=%lld k=%lld: unpack(pack(B)) != B\n", name(kern), (long long)n, (long long)k);
    if (kern != L8_KERNEL_AVX2)
        for (int64_t j = 0; j < np; j++) {
            int32_t s = 0;
            for (int64_t p = 0; j < n && p < k; p++) s += B[j * k + p];
            if (pb.corr[j] != 128 * s) FAIL("%s: corr[%lld] = %d, expected %d\n", name(kern), (long long)j, pb.corr[j], 128 * s);
        }

    float scale[16];
    for (int r = 0; r < 16; r++) scale[r] = (float)(next_u32() % 1000u + 1u) / 127.0f;
    for (int64_t j0 = 0; j0 < np; j0 += 16)
        for (int64_t p = 0; p < k; p++) {
            int8_t col[16];
            float f[16];
            l8_packed_b_panel_column(&pb, j0, p, col);
            l8_panel_column_f32_avx2(&pb, j0, p, scale, f);
            for (int r = 0; r < 16; r++) {
                const int8_t want = j0 + r < n ? B[(j0 + r) * k + p] : 0;
                const float fwant = (float)want * scale[r];
                if (col[r] != want)
                    FAIL("%s: panel_column(%lld, %lld)[%d] = %d, expected %d\n", name(kern), (long long)j0,
                         (long long)p, r, col[r], want);
                if (memcmp(&f[r], &fwant, sizeof(float)) != 0)
                    FAIL("%s: panel_column_f32(%lld, %lld)[%d] = %a, expected %a\n", name(kern), (long long)j0,
                         (long long)p, r, (double)f[r], (double)fwant);
            }
        }

    /* a selection of columns in ascending order with gaps, as the GEMM shrink makes */
    int32_t *cols = malloc(sizeof(int32_t) * (size_t)k);
    int64_t nc = 0;
    for (int64_t p = 0; p < k; p++)
        if (next_u32() % 3u != 0) cols[nc++] = (int32_t)p;
    if (nc == 0) cols[nc++] = 0;
    if (l8_packed_b_select(&pb, cols, nc, &sel, 2) < 0) {
        FAIL("%s: select out of memory\n", name(kern));
        goto done2;
    }
    l8_unpack_b(&sel, U);
    for (int64_t j = 0; j < n; j++)
        for (int64_t t = 0; t < nc; t++)
            if (U[j * nc + t] != B[j * k + cols[t]])
                FAIL("%s: select: [%lld, %lld] = %d, expected %d\n", name(kern), (long long)j, (long long)t,
                     U[j * nc + t], B[j * k + cols[t]]);
    if (kern != L8_KERNEL_AVX2)
        for (int64_t j = 0; j < sel.np; j++) {
            int32_t s = 0;
            for (int64_t t = 0; j < n && t < nc; t++) s += B[j * k + cols[t]];
            if (sel.corr[j] != 128 * s)
                FAIL("%s: select corr[%lld] = %d, expected %d\n", name(kern), (long long)j, sel.corr[j], 128 * s);
        }
    l8_packed_b_free(&sel);

    /* the outlier product from the packed weight, every row count it takes, fp16 rounding on/off */
    {
        const int64_t no = nc < 40 ? nc : 40;
        float X[L8_OUT_MR * 40], S[L8_OUT_MR * 16];
        for (int i = 0; i < L8_OUT_MR * 40; i++) X[i] = (float)((int32_t)(next_u32() % 20001u) - 10000) / 997.0f;
        for (int mr = 1; mr <= L8_OUT_MR; mr++)
            for (int round16 = 0; round16 < 2; round16++)
                for (int64_t j0 = 0; j0 < np; j0 += 16) {
                    l8_outlier_fused_avx2(&pb, j0, scale, cols, no, X, 40, mr, round16, S, 16);
                    for (int i = 0; i < mr; i++)
                        for (int r = 0; r < 16 && j0 + r < n; r++) {
                            const float want = fused_ref(B, k, j0 + r, cols, no, X + i * 40, scale[r], round16);
                            if (memcmp(&S[i * 16 + r], &want, sizeof(float)) != 0)
                                FAIL("%s: outlier_fused mr=%d round16=%d [%d, %lld] = %a, expected %a\n", name(kern),
                                     mr, round16, i, (long long)(j0 + r), (double)S[i * 16 + r], (double)want);
                        }
                }
    }
done2:
    free(cols);
done1:
    l8_packed_b_free(&pb);
done0:
    free(B);
    free(U);
}

int main(void) {
    if (!(l8_kernels_supported() & (1u << L8_KERNEL_AVX2))) {
        printf("packed_layouts: this CPU has no AVX2; nothing to check\n");
        return 77;
    }
    const l8_kernel kerns[] = {L8_KERNEL_AVX2, L8_KERNEL_AVXVNNI, L8_KERNEL_AVX512VNNI};
    const int64_t shapes[][2] = {{1, 1}, {5, 3}, {16, 4}, {17, 33}, {33, 65}, {48, 130}, {7, 257}};
    int checked = 0;
    for (size_t i = 0; i < sizeof kerns / sizeof kerns[0]; i++) {
        if (!l8_x86_kernel_ops(kerns[i])) continue; /* not compiled in (AVX-VNNI needs GCC 11) */
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) check_layout(kerns[i], shapes[s][0], shapes[s][1]);
        printf("packed_layouts: %s layout checked\n", name(kerns[i]));
        checked++;
    }
    if (failures) printf("packed_layouts: %d failures\n", failures);
    return failures || !checked ? 1 : 0;
}
