/* cpu_features.h: which CPU GEMM kernels this processor can run, and their names.
 *
 * A kernel is usable when the CPU has the instructions (cpuid) and the OS saves the
 * vector registers they use across context switches (xgetbv). Every SIMD kernel also
 * relies on AVX2, FMA and F16C for the vectorized quantize and dequantize passes. */
#ifndef LLMINT8_CPU_FEATURES_H
#define LLMINT8_CPU_FEATURES_H

typedef enum {
    L8_KERNEL_PORTABLE = 0, /* plain C (gemm.c, quantize.c): the reference, runs anywhere */
    L8_KERNEL_AVX2,         /* vpmovsxbw + vpmaddwd, int16 pairs into int32 */
    L8_KERNEL_AVXVNNI,      /* vpdpbusd on ymm (Alder Lake and later, Zen 5) */
    L8_KERNEL_AVX512VNNI,   /* vpdpbusd on zmm (Cascade Lake and later, Zen 4) */
    L8_KERNEL_COUNT
} l8_kernel;

/* "portable", "avx2", "avxvnni", "avx512vnni". */
const char *l8_kernel_name(l8_kernel k);

/* The kernel named s (ASCII case-insensitive), or -1 when no kernel has that name. */
int l8_kernel_from_name(const char *s);

/* Bit (1 << k) set for every kernel this CPU and OS can run (portable always). */
unsigned l8_kernels_supported(void);

/* The fastest supported kernel. */
l8_kernel l8_kernel_best(void);

#endif
