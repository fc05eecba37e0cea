/* linear.c: backend-neutral layer code: weight quantization and teardown. */
#include <stdlib.h>

#include "linear.h"
#include "quantize.h"

int l8_quantize_weight(const void *w, l8_dtype t, int64_t out, int64_t in, const int32_t *ocols,
                       int64_t n_ocols, l8_weights *dst, int nthreads, l8_status *st) {
    uint8_t *skip = NULL;
    if (n_ocols > 0) {
        if (!(skip = calloc((size_t)in, 1)))
            return l8_fail(st, L8_ERR_NOMEM, "could not allocate %lld bytes of outlier flags", (long long)in);
        for (int64_t o = 0; o < n_ocols; o++) skip[ocols[o]] = 1;
    }
    /* known outlier columns are excluded from the scales and stored as 0 */
    l8_quantize_rows(w, t, out, in, skip, dst->wq, dst->wscale, nthreads);
    free(skip);
    for (int64_t i = 0; i < out; i++)
        for (int64_t o = 0; o < n_ocols; o++) {
            const size_t idx = (size_t)i * (size_t)in + (size_t)ocols[o];
            const uint16_t h = t == L8_F16 ? ((const uint16_t *)w)[idx] : l8_float_to_half(((const float *)w)[idx]);
            if ((h & 0x7C00u) == 0x7C00u) /* finite float32 input: only overflow gets here */
                return l8_fail(st, L8_ERR_VALUE,
                               "weight[%lld, %d] = %g is beyond float16's range (65504), but column %d is a known "
                               "outlier column, which the layer keeps in float16; scale the weight down or leave "
                               "column %d out of outlier_columns",
                               (long long)i, (int)ocols[o], (double)((const float *)w)[idx], (int)ocols[o],
                               (int)ocols[o]);
            dst->wout[i * n_ocols + o] = h;
        }
    return 0;
}

void l8_layer_release(l8_layer *L) {
    if (L->backend && L->impl) L->backend->destroy(L);
    L->impl = NULL;
    free(L->outlier_cols);
    L->outlier_cols = NULL;
}
