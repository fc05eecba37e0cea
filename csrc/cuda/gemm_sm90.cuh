/* gemm_sm90.cuh: the int8 GEMM with the dequantization in its epilogue, for Hopper
 * (sm_90a): a CUTLASS 3.x kernel (TMA loads, warp-specialized, s8 x s8 -> s32 wgmma)
 * whose epilogue turns each int32 sum into y straight from registers, so the int32
 * product never reaches memory (the cuBLASLt path writes it and l8_dequant_cuda reads it
 * back). CPU reference: linear_cpu.c (linear_epilogue) and gemm.c; the arithmetic is
 * epilogue_cuda.cuh's, the same as every other CUDA path, so y is bit-identical.
 *
 * The epilogue is a CUTLASS visitor tree: three broadcast loads (sx per row, sw and the
 * bias per column, CUTLASS's own nodes) feed one node of ours, L8Finish, which knows each
 * element's (row, column) and computes
 *     v = acc * ((sx[i] * (1/127^2)) * sw[j]) + outlier_sum(i, j) [+ bias[j]]
 * with __fmul_rn / __fadd_rn, then rounds v to y's type. outlier_sum reads the outlier
 * activations and weights (l8_outlier_ops) from global memory (L1/L2): m x n x c terms, so
 * the caller keeps this path for layers with few outlier columns.
 *
 * One instantiation per (output type, tile config) and one .cu file per output type
 * (gemm_sm90_f16.cu, gemm_sm90_f32.cu): CUTLASS kernels take minutes to compile, and
 * setup.py builds these files only for an sm_90a target with CUTLASS's headers found
 * (LLMINT8_SM90_GEMM). nvcc only, C++17. */
#ifndef LLMINT8_GEMM_SM90_CUH
#define LLMINT8_GEMM_SM90_CUH

#include <cuda_runtime.h>

#include <atomic>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp"
#include "cutlass/epilogue/fusion/sm90_visitor_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "epilogue_cuda.cuh"
#include "gemm_cuda.h"

namespace l8sm90 {

using namespace cute;
using cutlass::Array;
namespace fusion = cutlass::epilogue::fusion;

/* ------------------------------------------------------------------ the epilogue node */

/* Output conversion: fp16 with round-to-nearest-even, as l8_float_to_half does. */
template <class T> __device__ __forceinline__ T to_out(float v);
template <> __device__ __forceinline__ float to_out<float>(float v) { return v; }
template <> __device__ __forceinline__ cutlass::half_t to_out<cutlass::half_t>(float v) {
    return cutlass::half_t::bitcast(__half_as_ushort(__float2half_rn(v)));
}

/* The root of the visitor tree. Its inputs are the accumulator fragment and the three
 * broadcast fragments (sx, sw, bias); it needs the coordinates only for the outlier terms,
 * from an identity tensor partitioned exactly as the broadcast nodes partition theirs.
 *
 * The outlier terms: per tile, begin() stages the first STAGED entries' activations of the
 * tile's rows and weights of its columns in shared memory (all epilogue threads, then the
 * barrier the collective runs when begin_sync_needed()), so each term in visit() is two
 * shared-memory reads instead of the gathers through global memory that outlier_x /
 * outlier_w do (several loads per term). Entries past STAGED, rare, are gathered.
 * Staging per tile is safe: every thread has passed the TMA store's barrier after its last
 * visit of the previous tile, and the ping-pong schedule runs one warp group's epilogue at a
 * time (as Sm90RowBroadcast's staging relies on too). */
template <class ElementD, class CtaTile>
struct L8Finish {
    static constexpr int TM = size<0>(CtaTile{}), TN = size<1>(CtaTile{});
    static constexpr int STAGED = 16;
    struct SharedStorage {
        float xs[TM][STAGED + 1];  /* +1: the lanes of a warp read different rows */
        float ws[STAGED][TN];
    };
    struct Arguments {
        l8_outlier_ops O;  /* O.counts == NULL: no outlier terms */
        int has_bias;      /* without a bias the CPU adds nothing (-0 stays -0) */
    };
    using Params = Arguments;

    template <class ProblemShape>
    static constexpr Params to_underlying_arguments(ProblemShape const &, Arguments const &args, void *) {
        return args;
    }
    template <class ProblemShape> static bool can_implement(ProblemShape const &, Arguments const &) { return true; }
    template <class ProblemShape> static size_t get_workspace_size(ProblemShape const &, Arguments const &) {
        return 0;
    }
    template <class ProblemShape>
    static cutlass::Status initialize_workspace(ProblemShape const &, Arguments const &, void *, cudaStream_t,
                                                cutlass::CudaHostAdapter * = nullptr) {
        return cutlass::Status::kSuccess;
    }

    CUTLASS_HOST_DEVICE L8Finish() {}
    CUTLASS_HOST_DEVICE L8Finish(Params const &p, SharedStorage const &ss)
        : params(p), smem(const_cast<SharedStorage *>(&ss)) {}
    Params params;
    SharedStorage *smem = nullptr;

    CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
    CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

    template <class... Args>
    CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::detail::ProducerLoadArgs<Args...> const &) {
        return fusion::detail::EmptyProducerLoadCallbacks{};
    }

    template <class CTensor>
    struct ConsumerStoreCallbacks : fusion::detail::EmptyConsumerStoreCallbacks {
        CTensor tCc;  /* (CPY,CPY_M,CPY_N,EPI_M,EPI_N) absolute (row, column, batch) */
        Params const &params;
        SharedStorage *smem;
        int64_t M, N, row0, col0;  /* the problem, and the tile's first row and column */
        int thread_idx, nthreads;
        int total = 0, staged = 0;

        CUTLASS_DEVICE ConsumerStoreCallbacks(CTensor tCc_, Params const &p, SharedStorage *smem_, int64_t M_,
                                              int64_t N_, int64_t row0_, int64_t col0_, int thread_idx_,
                                              int nthreads_)
            : tCc(tCc_), params(p), smem(smem_), M(M_), N(N_), row0(row0_), col0(col0_), thread_idx(thread_idx_),
              nthreads(nthreads_) {}

        /* the outlier count this call found (written by the quantizer before this kernel),
         * and the first entries' operands of this tile staged */
        CUTLASS_DEVICE void begin() {
            total = params.O.counts ? params.O.counts[0] : 0;
            staged = total < STAGED ? total : STAGED;
            for (int e = thread_idx; e < TM * staged; e += nthreads) {
                const int r = e / staged, o = e % staged;
                smem->xs[r][o] = row0 + r < M ? outlier_x(params.O, row0 + r, o) : 0.0f;
            }
            for (int e = thread_idx; e < staged * TN; e += nthreads) {
                const int o = e / TN, c = e % TN;
                smem->ws[o][c] = col0 + c < N ? outlier_w<true>(params.O, o, col0 + c, N) : 0.0f;
            }
        }
        CUTLASS_DEVICE bool begin_sync_needed() const { return true; }

        template <typename ElementAcc, typename ElementIn, int FragmentSize>
        CUTLASS_DEVICE Array<ElementD, FragmentSize>
        visit(Array<ElementAcc, FragmentSize> const &acc, int epi_v, int epi_m, int epi_n,
              Array<ElementIn, FragmentSize> const &fsx, Array<ElementIn, FragmentSize> const &fsw,
              Array<ElementIn, FragmentSize> const &fbias) {
            Array<ElementD, FragmentSize> out;
            Tensor c_mn = tCc(_, _, _, epi_m, epi_n);
            CUTLASS_PRAGMA_UNROLL
            for (int e = 0; e < FragmentSize; ++e) {
                /* the outlier terms, from 0 in ascending entry order (outlier_sum's order) */
                float osum = 0.0f;
                if (total > 0) {
                    auto crd = c_mn(epi_v * FragmentSize + e);
                    const int64_t i = get<0>(crd), j = get<1>(crd);
                    if (i < M && j < N) {
                        const int r = (int)(i - row0), c = (int)(j - col0);
                        for (int o = 0; o < staged; o++)
                            osum = __fadd_rn(osum, __fmul_rn(smem->xs[r][o], smem->ws[o][c]));
                        osum = outlier_sum<true>(params.O, staged, total, i, j, N, osum);
                    }
                }
                const float b = static_cast<float>(fbias[e]);
                out[e] = to_out<ElementD>(finish(static_cast<int32_t>(acc[e]), static_cast<float>(fsx[e]),
                                                 static_cast<float>(fsw[e]), osum, params.has_bias ? &b : nullptr));
            }
            return out;
        }
    };

    template <bool ReferenceSrc, class... Args>
    CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::detail::ConsumerStoreArgs<Args...> const &args) {
        auto [M, N, K, L] = args.problem_shape_mnkl;
        auto [m, n, k, l] = args.tile_coord_mnkl;
        Tensor mC = make_identity_tensor(make_shape(M, N, L));
        Tensor tCc = fusion::detail::sm90_partition_for_epilogue<ReferenceSrc>(
            mC, args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile, args.tiled_copy, args.thread_idx);
        return ConsumerStoreCallbacks<decltype(tCc)>(tCc, params, smem, (int64_t)M, (int64_t)N, (int64_t)m * TM,
                                                     (int64_t)n * TN, args.thread_idx, (int)size(args.tiled_mma));
    }
};

/* ------------------------------------------------------------------ the kernel */

/* Tile configurations, chosen by m (launch below). Short inputs are weight-bound: the
 * weight is streamed once whatever the tile, and what matters is that enough blocks stream
 * it (a 4096-output layer gives 64 blocks of 64 columns per 64 rows, 32 of 128), so up to
 * 128 rows the tile is 64 x 64; up to 512 rows 64 x 128. Both use the ping-pong schedule
 * (two consumer warp groups alternate tiles, one's epilogue overlapping the other's math).
 * Longer inputs are compute-bound: 128 x 128 with the cooperative schedule. */
constexpr int SMALL_M = 128, MEDIUM_M = 512;
struct CfgSmall {
    using Tile = Shape<_64, _64, _128>;
    using Cluster = Shape<_1, _1, _1>;
    using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
    using Epi = cutlass::epilogue::TmaWarpSpecialized;
};
struct CfgMedium {
    using Tile = Shape<_64, _128, _128>;
    using Cluster = Shape<_1, _1, _1>;
    using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
    using Epi = cutlass::epilogue::TmaWarpSpecialized;
};
struct CfgLarge {
    using Tile = Shape<_128, _128, _128>;
    using Cluster = Shape<_1, _1, _1>;
    using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
    using Epi = cutlass::epilogue::TmaWarpSpecializedCooperative;
};

template <class ElementD, class Cfg>
struct Gemm {
    using LayoutA = cutlass::layout::RowMajor;     /* x: (m, kp), K contiguous */
    using LayoutB = cutlass::layout::ColumnMajor;  /* W: (n, kp) rows, K contiguous */
    using LayoutD = cutlass::layout::RowMajor;     /* y: (m, n) */
    static constexpr int AlignAB = 16;             /* kp is a multiple of 16 bytes */
    static constexpr int AlignD = 128 / cutlass::sizeof_bits<ElementD>::value;

    using Sx = fusion::Sm90ColBroadcast<0, typename Cfg::Tile, float, float, Stride<_1, _0, int64_t>, 1>;
    using Sw = fusion::Sm90RowBroadcast<0, typename Cfg::Tile, float, float, Stride<_0, _1, int64_t>, 1>;
    using Bias = fusion::Sm90RowBroadcast<0, typename Cfg::Tile, float, float, Stride<_0, _1, int64_t>, 1>;
    using Tree = fusion::Sm90EVT<L8Finish<ElementD, typename Cfg::Tile>, Sx, Sw, Bias>;

    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, typename Cfg::Tile, typename Cfg::Cluster,
        cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, void, LayoutD, AlignD, ElementD, LayoutD,
        AlignD, typename Cfg::Epi, Tree>::CollectiveOp;

    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, LayoutA, AlignAB, int8_t, LayoutB, AlignAB,
        int32_t, typename Cfg::Tile, typename Cfg::Cluster,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
            sizeof(typename Epilogue::SharedStorage))>,
        typename Cfg::Kernel>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
    using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

/* y (m, n) = finish(A (m, kp) @ W (n, kp)^T): one launch, no workspace (the persistent tile
 * scheduler of these configs needs none; a config that did would be refused here rather
 * than allocate). sms: the device's multiprocessor count (CUTLASS would query it per call).
 * Launched with Programmatic Dependent Launch on a created stream: the kernel may start
 * while the quantizer before it finishes; CUTLASS's producer warps wait (griddepcontrol.wait,
 * built in with CUTLASS_ENABLE_GDC_FOR_SM90) before their first load, and everything the
 * epilogue reads from the quantizer (sx, the outlier list and values) is read after the
 * loads it waits on. */
template <class ElementD, class Cfg>
cudaError_t run(const int8_t *A, const int8_t *W, int m, int n, int kp, const float *sx, const float *sw,
                const float *bias, const l8_outlier_ops *O, ElementD *y, int device, int sms, cudaStream_t s) {
    using G = Gemm<ElementD, Cfg>;
    using Device = typename G::Device;
    using StrideA = typename G::Kernel::StrideA;
    using StrideB = typename G::Kernel::StrideB;
    using StrideC = typename G::Kernel::StrideC;
    using StrideD = typename G::Kernel::StrideD;

    const typename G::Sx::Arguments a_sx{sx, 0.0f, {_1{}, _0{}, int64_t(0)}};
    const typename G::Sw::Arguments a_sw{sw, 0.0f, {_0{}, _1{}, int64_t(0)}};
    const typename G::Bias::Arguments a_bias{bias, 0.0f, {_0{}, _1{}, int64_t(0)}};
    const typename L8Finish<ElementD, typename Cfg::Tile>::Arguments a_fin{O ? *O : l8_outlier_ops{}, bias != nullptr};
    const typename G::Tree::Arguments tree{a_sx, a_sw, a_bias, a_fin};
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sms;
    typename Device::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, kp, 1},
        {A, cutlass::make_cute_packed_stride(StrideA{}, make_shape(m, kp, 1)), W,
         cutlass::make_cute_packed_stride(StrideB{}, make_shape(n, kp, 1))},
        {tree, nullptr, cutlass::make_cute_packed_stride(StrideC{}, make_shape(m, n, 1)), y,
         cutlass::make_cute_packed_stride(StrideD{}, make_shape(m, n, 1))},
        hw};

    if (Device::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
    if (Device::get_workspace_size(args) != 0) return cudaErrorNotSupported;
    /* the kernel's shared-memory limit, raised once per device (the adapter's initialize()
     * would set it on every call: host time on every forward) */
    static std::atomic<unsigned long long> raised{0};
    const unsigned long long bit = device < 64 ? 1ull << device : 0;
    if (!bit || !(raised.load() & bit)) {
        const cudaError_t e = cudaFuncSetAttribute(cutlass::device_kernel<typename G::Kernel>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   (int)G::Kernel::SharedStorageSize);
        if (e != cudaSuccess) return e;
        raised.fetch_or(bit);
    }
    typename G::Kernel::Params params = G::Kernel::to_underlying_arguments(args, nullptr);
    /* not on the legacy default stream, whose implicit synchronization with other streams
     * PDL is not documented to keep; and a refused PDL launch (nothing queued) is retried
     * as a plain one */
    const bool pdl = s != nullptr && s != cudaStreamLegacy;
    cutlass::Status st = Device::run(params, s, nullptr, pdl);
    if (st != cutlass::Status::kSuccess && pdl) {
        (void)cudaGetLastError();
        st = Device::run(params, s, nullptr, false);
    }
    if (st != cutlass::Status::kSuccess) {
        const cudaError_t e = cudaGetLastError();
        return e != cudaSuccess ? e : cudaErrorLaunchFailure;
    }
    return cudaGetLastError();
}

/* The tile config for m rows. */
template <class ElementD>
cudaError_t launch(const int8_t *A, const int8_t *W, int m, int n, int kp, const float *sx, const float *sw,
                   const float *bias, const l8_outlier_ops *O, ElementD *y, int device, int sms, cudaStream_t s) {
    if (m <= SMALL_M) return run<ElementD, CfgSmall>(A, W, m, n, kp, sx, sw, bias, O, y, device, sms, s);
    if (m <= MEDIUM_M) return run<ElementD, CfgMedium>(A, W, m, n, kp, sx, sw, bias, O, y, device, sms, s);
    return run<ElementD, CfgLarge>(A, W, m, n, kp, sx, sw, bias, O, y, device, sms, s);
}

}  // namespace l8sm90

#endif
