/* device_common.h: device-side helpers shared by the CUDA kernel files (nvcc only).
 *
 * to_f: an element of x (float or __half) as float.
 * load_vec: VEC consecutive elements as floats, with one 16-byte load when VEC > 1 (the
 * caller guarantees the alignment). */
#ifndef LLMINT8_DEVICE_COMMON_H
#define LLMINT8_DEVICE_COMMON_H

#ifndef __CUDACC__
#error "device_common.h holds device code: include it from .cu files only"
#endif

#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T *p, float (&v)[VEC]) {
    if constexpr (VEC == 1) {
        v[0] = to_f(p[0]);
    } else {
        static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
        const uint4 raw = *reinterpret_cast<const uint4 *>(p);
        const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
        for (int t = 0; t < VEC; t++) v[t] = to_f(e[t]);
    }
}

#endif
