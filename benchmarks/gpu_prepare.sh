#!/usr/bin/env bash
# Run on the machine without a GPU, before a GPU session: everything gpu_check.sh needs that
# the GPU machine cannot fetch or should not spend its minutes on.
#   - CUTLASS's headers (nvidia-cutlass, installed here without its dependencies) copied into
#     ./gpu-data/cutlass: the GPU machine has no package index;
#   - stories260K copied into ./gpu-data/stories260K (the model phases);
#   - the CUDA objects built here for sm_90a, the sm90 GEMM included (about 3 minutes on
#     2 cores, 5 GB of memory per CUTLASS file): build/cuda-objects, which setup.py reuses
#     on the GPU machine when sources, flags and nvcc's version match (stamps beside them).
# Then carry ["build/cuda-objects", "gpu-data"] and run there:
#   LLMINT8_CUDA_ARCHS=90a bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python3), LLMINT8_DATA (the shared data folder; default
# ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DATA=${LLMINT8_DATA:-../shared/data}
mkdir -p gpu-data
if ! $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)"; then
    $PY -m pip install --no-deps "nvidia-cutlass==4.2.0.0"
fi
src=$($PY -c "import importlib.util, os; s = importlib.util.find_spec('cutlass_library'); \
print(os.path.join(list(s.submodule_search_locations)[0], 'source'))")
rm -rf gpu-data/cutlass && mkdir -p gpu-data/cutlass/tools/util
cp -r "$src/include" gpu-data/cutlass/
cp -r "$src/tools/util/include" gpu-data/cutlass/tools/util/
if [[ -d $DATA/models/stories260K ]]; then
    rm -rf gpu-data/stories260K && cp -r "$DATA/models/stories260K" gpu-data/
else
    echo "gpu_prepare: $DATA/models/stories260K not found: the model phases will look for it there" >&2
fi
LLMINT8_CUDA=1 LLMINT8_CUDA_ARCHS=90a LLMINT8_CUTLASS_DIR=$PWD/gpu-data/cutlass $PY setup.py build_ext --inplace
$PY -c "import llmint8; i = llmint8.build_info(); assert i['sm90_gemm'], i; print('sm90_gemm built:', i['cuda_archs'])"
du -sh build/cuda-objects gpu-data
echo 'carry: ["build/cuda-objects", "gpu-data"]; run: LLMINT8_CUDA_ARCHS=90a bash benchmarks/gpu_check.sh'
