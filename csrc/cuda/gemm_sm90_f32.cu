/* gemm_sm90_f32.cu: gemm_sm90.cuh's kernels with float output (one file per output type:
 * each takes minutes to compile, and the two compile in parallel). Built only for sm_90a
 * (setup.py, LLMINT8_SM90_GEMM). */
#include "gemm_sm90.cuh"

extern "C" cudaError_t l8_gemm_sm90_f32(const int8_t *A, const int8_t *W, int m, int n, int kp, const float *sx,
                                       const float *sw, const float *bias, const l8_outlier_ops *O, float *y,
                                       int device, int sms, cudaStream_t s) {
    return l8sm90::launch<float>(A, W, m, n, kp, sx, sw, bias, O, reinterpret_cast<float *>(y), device, sms, s);
}
