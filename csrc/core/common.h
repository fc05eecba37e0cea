/* common.h: what every llmint8 C file shares.
 *
 * - l8_status: how compute code (which runs without the GIL) reports an error. The
 *   Python entry point turns it into an exception after taking the GIL back
 *   (l8_raise in module.c). Compute code never touches Python objects.
 * - l8_dtype: the element types that cross the backend boundary.
 * - fp16 <-> fp32 conversion in portable C (IEEE binary16, round to nearest even).
 */
#ifndef LLMINT8_COMMON_H
#define LLMINT8_COMMON_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>

#if defined(__GNUC__)
#define L8_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define L8_PRINTF(f, a)
#endif

typedef enum {
    L8_OK = 0,
    L8_ERR_VALUE,    /* bad shape or value: ValueError */
    L8_ERR_TYPE,     /* bad dtype: TypeError */
    L8_ERR_NOMEM,    /* allocation failed: MemoryError */
    L8_ERR_RUNTIME,  /* backend failure (CUDA, cuBLAS): RuntimeError */
} l8_code;

typedef struct {
    l8_code code;
    char msg[512];
} l8_status;

/* Record an error in *st and return -1, so callers can `return l8_fail(...)`. */
int l8_fail(l8_status *st, l8_code code, const char *fmt, ...) L8_PRINTF(3, 4);
/* The error of a float16 forward whose dynamic outlier column `col` has a dequantized weight,
 * weight[row, col] = val, beyond fp16's range: one text for the CPU and CUDA backends. */
int l8_fail_f16_weight(l8_status *st, int col, int64_t row, double val);

typedef enum { L8_F32 = 0, L8_F16 = 1, L8_I8 = 2, L8_I32 = 3 } l8_dtype;

static inline size_t l8_dtype_size(l8_dtype t) {
    return t == L8_F32 || t == L8_I32 ? 4 : t == L8_F16 ? 2 : 1;
}

/* malloc that checks n * size for overflow; returns NULL on failure or overflow. */
void *l8_malloc_array(size_t n, size_t size);

/* ---- fp16 <-> fp32 ----------------------------------------------------------
 * Bit-exact IEEE conversions, after the branch-free method of the FP16 library
 * (M. Dukhan). They rely on fp32 arithmetic with no contraction or fast-math,
 * which setup.py guarantees (-std=c11 turns -ffp-contract off). */

static inline float l8_bits_f32(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t l8_f32_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

static inline float l8_half_to_float(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    /* normal numbers: move the exponent into place and rescale by 2^-112 */
    const float normalized = l8_bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    /* subnormals: build 0.5 + m*2^-24... and subtract 0.5 */
    const float denormalized = l8_bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t r = sign | (two_w < (1u << 27) ? l8_f32_bits(denormalized) : l8_f32_bits(normalized));
    return l8_bits_f32(r);
}

static inline uint16_t l8_float_to_half(float f) {
    /* scale so that rounding happens at fp16's precision, overflow goes to inf */
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = l8_f32_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = l8_bits_f32((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = l8_f32_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* Round an fp32 value to the nearest fp16 and back: what "multiply in fp16" means. */
static inline float l8_round_f16(float f) { return l8_half_to_float(l8_float_to_half(f)); }

static inline int l8_isfinite(float f) { return (l8_f32_bits(f) & 0x7F800000u) != 0x7F800000u; }

/* Element i of a float16 or float32 array, as fp32. */
static inline float l8_load(const void *p, l8_dtype t, size_t i) {
    return t == L8_F16 ? l8_half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

#endif /* LLMINT8_COMMON_H */
