#!/usr/bin/env bash
# Kernel-level GPU time of Int8Linear forwards (Nsight Compute, clocks left as they are):
# one ncu run per case, each printing the time of every kernel a forward launches, at
# threshold 6 and 0 (benchmarks/gpu_profile.py), then the fused decoding forward
# (LLMINT8_CUDA_FUSED=all: one kernel per forward) at 1 and 16 tokens and the fused prefill
# quantizer (memset, flags + list, exact quantize, then GEMM and epilogue; on Hopper with the
# sm90 GEMM built, that GEMM with the epilogue inside, one CUTLASS kernel) at 128 and 2048.
# Needs ncu (CUDA toolkit) and a GPU.
#   bash benchmarks/gpu_profile.sh ["4096x4096 128" ...]
#   GPU_PROFILE_FUSED="4096x4096 1" bash benchmarks/gpu_profile.sh   # the fused cases ("" for none)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NCU=${NCU:-$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -n 1)}
[[ -n $NCU ]] || { echo "gpu_profile: ncu not found"; exit 1; }
cases=("$@")
((${#cases[@]})) || cases=("4096x4096 1" "14336x4096 1" "4096x4096 128" "4096x4096 2048")
for c in "${cases[@]}"; do
    set -- $c
    echo "### $1, $2 tokens"
    "$NCU" --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
        "$PY" benchmarks/gpu_profile.py --shape "$1" --tokens "$2" 2>&1 \
        | grep -E "gpu_profile:|\(.*\)x\(|gpu__time_duration" || exit 1
done
fused=${GPU_PROFILE_FUSED-"4096x4096 1;14336x4096 1;4096x4096 16;4096x4096 128;4096x4096 2048"}
IFS=';' read -ra fcases <<<"$fused"
for c in "${fcases[@]}"; do
    [[ -n $c ]] || continue
    set -- $c
    echo "### fused paths: $1, $2 tokens"
    LLMINT8_CUDA_FUSED=all "$NCU" --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
        "$PY" benchmarks/gpu_profile.py --shape "$1" --tokens "$2" 2>&1 \
        | grep -E "gpu_profile:|\(.*\)x\(|gpu__time_duration" || exit 1
done
