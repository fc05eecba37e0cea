/* linear.h: an Int8Linear layer as C sees it, and the backend boundary.
 *
 * A layer is described once, backend-neutrally (l8_layer), and its weights live in
 * whatever form its backend wants (l8_layer.impl). Each backend fills one l8_backend
 * table; the Python type (module.c) only ever calls through that table, so a new
 * backend is one table plus its files. Backend functions run without the GIL and
 * report errors through l8_status. */
#ifndef LLMINT8_LINEAR_H
#define LLMINT8_LINEAR_H

#include "common.h"

struct l8_backend;

typedef struct l8_layer {
    const struct l8_backend *backend;
    void *backend_ctx;        /* the backend's per-module context (handles, pools); may be NULL */
    int device;               /* CUDA ordinal; -1 on the CPU */
    int cpu_kernel;           /* CPU backend: the l8_kernel (cpu_features.h) its weights are packed for */
    int64_t in_features, out_features;
    int64_t n_outliers;       /* known outlier columns, kept in fp16 */
    int has_bias;
    float threshold;          /* dynamic outlier threshold; 0 = no dynamic decomposition */
    int32_t *outlier_cols;    /* host copy, sorted, unique (owned by the layer) */
    size_t nbytes;            /* bytes the backend holds for weights, scales, bias, outlier columns */
    void *impl;               /* the backend's storage */
} l8_layer;

/* A layer's weights in host memory, in the canonical (unpacked) layout:
 *   wq     (out, in) int8, the known outlier columns set to 0
 *   wscale (out,) float32 absmax of each row over the non-outlier columns
 *   wout   (out, n_outliers) fp16 bits of the original weight's outlier columns
 *   bias   (out,) float32 or NULL */
typedef struct {
    int8_t *wq;
    float *wscale;
    uint16_t *wout;
    float *bias;
} l8_weights;

typedef struct l8_backend {
    const char *name;
    /* Take the weights (host memory, read-only during the call) into L->impl, set L->nbytes. */
    int (*create)(l8_layer *L, const l8_weights *w, l8_status *st);
    void (*destroy)(l8_layer *L);
    /* Copy the weights back into host buffers of the canonical layout (bias may be NULL). */
    int (*export_weights)(const l8_layer *L, l8_weights *out, l8_status *st);
    /* y (m, out) = layer(x (m, in)); x and y in host memory, x float16/float32, y float16/float32. */
    int (*forward_host)(const l8_layer *L, const void *x, l8_dtype xt, int64_t m, void *y,
                        l8_dtype yt, int nthreads, l8_status *st);
} l8_backend;

extern const l8_backend l8_cpu_backend;

/* Quantize a float weight (out, in) for a layer: the canonical layout above. The
 * outlier columns (sorted, unique, in range) are excluded from the row scales and
 * kept as fp16. Buffers are the caller's. Fails when out of memory, and with
 * L8_ERR_VALUE when a float32 weight in an outlier column is beyond fp16's range. */
int l8_quantize_weight(const void *w, l8_dtype t, int64_t out, int64_t in, const int32_t *ocols,
                       int64_t n_ocols, l8_weights *dst, int nthreads, l8_status *st);

/* Free a layer's backend storage and its outlier list (safe on a zeroed layer). */
void l8_layer_release(l8_layer *L);

#endif
