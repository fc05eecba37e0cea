/* cpu_features.c: run-time CPU feature detection (cpuid + xgetbv) for kernel dispatch.
 *
 * The supported set is detected once per process (l8_kernels_supported): in a virtual
 * machine every cpuid traps to the hypervisor. */
#include <stdatomic.h>
#include <string.h>

#include "cpu_features.h"
#include "gemm.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define L8_X86 1
#endif

static const char *const KERNEL_NAMES[L8_KERNEL_COUNT] = {"portable", "avx2", "avxvnni", "avx512vnni"};

const char *l8_kernel_name(l8_kernel k) {
    return (unsigned)k < L8_KERNEL_COUNT ? KERNEL_NAMES[k] : "unknown";
}

/* ASCII case-insensitive equality (strcasecmp is POSIX, not C11, and follows the locale). */
static int same_name(const char *a, const char *b) {
    for (;; a++, b++) {
        const char ca = *a >= 'A' && *a <= 'Z' ? (char)(*a - 'A' + 'a') : *a;
        if (ca != *b) return 0;
        if (!ca) return 1;
    }
}

int l8_kernel_from_name(const char *s) {
    for (int k = 0; k < L8_KERNEL_COUNT; k++)
        if (same_name(s, KERNEL_NAMES[k])) return k;
    return -1;
}

#ifdef L8_X86
/* XCR0: which register states the OS saves (bit 1 SSE, 2 AVX, 5-7 the AVX-512 opmask/zmm). */
static unsigned long long xgetbv0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

static unsigned detect_kernels(void) {
    unsigned mask = 1u << L8_KERNEL_PORTABLE;
#ifdef L8_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return mask;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return mask;
    const unsigned long long xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return mask; /* OS does not save ymm */
    if (__get_cpuid_max(0, NULL) < 7) return mask;
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1,
              avx512vl = (b >> 31) & 1, avx512vnni = (c >> 11) & 1;
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    const int avxvnni = (a1 >> 4) & 1;
    (void)b1; (void)c1; (void)d1; (void)d;
    if (!(avx2 && fma && f16c)) return mask;
    mask |= 1u << L8_KERNEL_AVX2;
    if (avxvnni) mask |= 1u << L8_KERNEL_AVXVNNI;
    if (avx512f && avx512bw && avx512vl && avx512vnni && (xcr0 & 0xE6) == 0xE6) mask |= 1u << L8_KERNEL_AVX512VNNI;
#endif
    for (int k = 1; k < L8_KERNEL_COUNT; k++) /* and compiled in (AVX-VNNI needs GCC 11 / Clang 12) */
        if (!l8_x86_kernel_ops((l8_kernel)k)) mask &= ~(1u << k);
    return mask;
}

unsigned l8_kernels_supported(void) {
    /* Detected once per process: in a virtual machine each cpuid traps to the hypervisor,
     * and this is asked on every call that picks a kernel (it was 29% of a decoding
     * attention call). The CPU does not change under a process; two threads asking first
     * both store the same mask. 0 means not yet detected (the portable bit is always set). */
    static _Atomic unsigned cached;
    unsigned mask = atomic_load_explicit(&cached, memory_order_relaxed);
    if (!mask) {
        mask = detect_kernels();
        atomic_store_explicit(&cached, mask, memory_order_relaxed);
    }
    return mask;
}

l8_kernel l8_kernel_best(void) {
    const unsigned s = l8_kernels_supported();
    for (int k = L8_KERNEL_COUNT - 1; k > 0; k--)
        if (s & (1u << k)) return (l8_kernel)k;
    return L8_KERNEL_PORTABLE;
}
