/* common.c: what every backend and both extension modules share: the error status, array
 * allocation with overflow checks, and the scan for NaN / Inf inputs. */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "common.h"
#include "quantize.h"

int l8_fail(l8_status *st, l8_code code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(st->msg, sizeof st->msg, fmt, ap);
    va_end(ap);
    st->code = code;
    return -1;
}

int l8_fail_f16_weight(l8_status *st, int col, int64_t row, double val) {
    return l8_fail(st, L8_ERR_VALUE,
                   "column %d of x is an outlier and x is float16, but the layer's weight[%lld, %d] = %g "
                   "is beyond float16's range (65504); pass x as float32 (the outlier product is then "
                   "computed in float32)",
                   col, (long long)row, col, val);
}

void *l8_malloc_array(size_t n, size_t size) {
    if (size && n > SIZE_MAX / size) return NULL;
    return malloc(n != 0 && size != 0 ? n * size : 1); /* never malloc(0): NULL would read as failure */
}

int64_t l8_find_nonfinite(const void *x, l8_dtype t, int64_t n) {
    if (t == L8_F16) {
        const uint16_t *h = x;
        for (int64_t i = 0; i < n; i++)
            if ((h[i] & 0x7C00u) == 0x7C00u) return i;
    } else {
        const float *f = x;
        for (int64_t i = 0; i < n; i++)
            if (!l8_isfinite(f[i])) return i;
    }
    return -1;
}
