#!/usr/bin/env bash
# The Hopper GEMM (csrc/cuda/gemm_sm90*, CUTLASS) compiles: CUTLASS's headers from PyPI
# (nvidia-cutlass, without its Python dependencies), then an sm_90a build of a copy of the
# tree, which must report build_info()["sm90_gemm"]. Nothing runs on a GPU here. Skipped,
# with the reason, where nvcc is not found. About 4 minutes and 12 GB of memory on 2 cores.
# Run from the repository root with the CI's Python:  bash .ci/sm90.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! command -v nvcc >/dev/null && [[ ! -x /usr/local/cuda/bin/nvcc ]] && [[ -z ${CUDA_HOME:-} ]]; then
    echo "sm90: skipped (nvcc not found: the Hopper GEMM is CUDA code)"; exit 0
fi
"$PY" -m pip install -q --no-deps "nvidia-cutlass==4.2.0.0"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
t0=$SECONDS
(cd "$work" && LLMINT8_CUDA=1 LLMINT8_CUDA_ARCHS=90a "$PY" setup.py -q build_ext --inplace >"$work/build.log" 2>&1) \
    || { tail -n 60 "$work/build.log"; exit 1; }
if grep -q "C7510" "$work/build.log"; then  # a call in a kernel serializes its wgmma pipeline
    grep -m 3 "C7510" "$work/build.log" | cut -c1-200; echo "sm90: ptxas serialized the wgmma pipeline"; exit 1
fi
(cd "$work" && "$PY" -c "import llmint8; i = llmint8.build_info(); assert i['sm90_gemm'] is True, i; print('sm90: built for', i['cuda_archs'])")
echo "sm90: the Hopper GEMM compiles ($((SECONDS - t0)) s)"
