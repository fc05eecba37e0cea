/* attention.h: attention of one new position over a KV cache (decoding), on the CPU.
 *
 * The model runner (llmint8/models/transformer.py) computes attention with NumPy; for one
 * query position its two products are thin matrix products that OpenBLAS packs in full on
 * every call, most of a decoded token's attention time. This computes the same
 * attention in one pass over the cache, reading each cached key and value once for all the
 * query heads that share it (grouped-query attention). */
#ifndef LLMINT8_ATTENTION_H
#define LLMINT8_ATTENTION_H

#include <stdint.h>

/* o[b, h, :] = sum_{s in [s0, n)} p[s] V[b, s, g, :],  g = h / (H / KV),
 *   p = softmax over s of scale * (q[b, h, :] . K[b, s, g, :]).
 * q (B, H, hd), K and V (B, cap, KV, hd), o (B, H, hd): float32, C order; 0 <= s0 < n <= cap,
 * H a multiple of KV. The order, as the NumPy path computes it: each dot product is eight
 * partial sums over d mod 8 added pairwise (then the d beyond the last multiple of 8 in
 * order), times scale; p = exp(x - max) / sum (each term divided, as NumPy's s /= sum);
 * o = sum over s ascending of p[s] * V[s]. Agrees with the float64 attention to float32
 * rounding; not bit for bit with NumPy's (BLAS) order. simd: the AVX2 form (only when the
 * CPU has AVX2), the same bits as the portable one. Jobs (b, g) run on up to nthreads
 * threads. Returns -1 when the scratch memory (H / KV x (n - s0) floats per job) cannot be
 * allocated, else 0. */
int l8_attention_decode(const float *q, const float *K, const float *V, int64_t B, int64_t H, int64_t KV,
                        int64_t hd, int64_t cap, int64_t s0, int64_t n, float scale, float *o, int simd,
                        int nthreads);

#endif
