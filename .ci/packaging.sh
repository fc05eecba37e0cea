#!/usr/bin/env bash
# Packaging check: the sdist and the wheel build, install into fresh virtual environments
# and import, with the CUDA backend (where nvcc is found) and without it (LLMINT8_CUDA=0);
# `import llmint8` maps no CUDA library either way. Run from the repository root with a
# Python that has `build` installed:  bash .ci/packaging.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export LLMINT8_CUDA_ARCHS=${LLMINT8_CUDA_ARCHS:-90}  # one GPU target: this checks packaging, not architectures

"$PY" -m build --sdist --outdir "$work/dist" . >"$work/sdist.log" 2>&1 || { cat "$work/sdist.log"; exit 1; }
sdist=$(ls "$work"/dist/llmint8-*.tar.gz)
echo "packaging: built $(basename "$sdist")"
# every C, CUDA and header file of the source tree is in the sdist
missing=$(comm -23 <(cd csrc && find . -type f \( -name '*.c' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) | sed 's|^\./||' | sort) \
                   <(tar -tzf "$sdist" | sed -n 's|^[^/]*/csrc/||p' | sort))
if [[ -n $missing ]]; then echo "packaging: the sdist lacks: $missing"; exit 1; fi
# and what the README points to: benchmarks/, notebooks/ (every file git tracks there)
if git rev-parse --git-dir >/dev/null 2>&1; then
    missing=$(comm -23 <(git ls-files benchmarks notebooks llmint8/py.typed | sort) \
                       <(tar -tzf "$sdist" | sed -n 's|^[^/]*/||p' | sort))
    if [[ -n $missing ]]; then echo "packaging: the sdist lacks: $missing"; exit 1; fi
fi

check() {  # check NAME EXPECT_CUDA PIP_ARGS...: install into a fresh venv, import, inspect
    local name=$1 expect=$2; shift 2
    "$PY" -m venv "$work/$name"
    "$work/$name/bin/python" -m pip install -q "$@" >"$work/$name.log" 2>&1 || { tail -n 40 "$work/$name.log"; exit 1; }
    (cd "$work" && "$work/$name/bin/python" - "$expect" <<'PY'
import re, sys
import numpy as np
import llmint8
maps = open("/proc/self/maps").read()
assert not re.search(r"lib(cudart|cublasLt)\.so", maps), "import llmint8 mapped a CUDA library"
w = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
y = llmint8.Int8Linear.from_float(w, device="cpu")(np.ones((2, 16), np.float32))
assert y.shape == (2, 8)
info = llmint8.build_info()
expect = sys.argv[1]
if expect == "cuda":
    assert info["cuda"] is True, info
elif expect == "cpu":
    assert info["cuda"] is False and info["cuda_off"], info
print(f"  import ok: cuda={info['cuda']} {info.get('cuda_archs') or info.get('cuda_off')}")
PY
    ) || exit 1
    echo "packaging: $name ok"
}

have_nvcc=auto
command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]] || [[ -n ${CUDA_HOME:-} ]] || have_nvcc=cpu
[[ $have_nvcc == auto ]] && expect=cuda || expect=cpu
check sdist-default "$expect" "$sdist"
LLMINT8_CUDA=0 check sdist-cpu cpu "$sdist"
"$PY" -m pip wheel -q --no-deps -w "$work/wheel" "$sdist" >"$work/wheel.log" 2>&1 || { tail -n 40 "$work/wheel.log"; exit 1; }
wheel_has() {  # wheel_has WHEEL NAME: the wheel holds a file whose path contains NAME
    "$PY" -c 'import sys, zipfile; sys.exit(not any(sys.argv[2] in n for n in zipfile.ZipFile(sys.argv[1]).namelist()))' "$1" "$2"
}
wheel_has "$work"/wheel/llmint8-*.whl llmint8/py.typed || { echo "packaging: the wheel lacks llmint8/py.typed"; exit 1; }
check wheel "$expect" "$work"/wheel/llmint8-*.whl

# Wheels built one after the other in the same tree (build/ is reused): each follows its
# own CUDA setting. CUDA then CPU-only: no _cuda module in the CPU-only wheel; then CUDA
# again: the CUDA backend is back (not silently off). Without nvcc: CPU-only twice.
tree="$work/tree"
mkdir "$tree" && tar -xzf "$sdist" -C "$tree" --strip-components=1
wheel_in_tree() {  # wheel_in_tree NAME [ENV...]: pip wheel from $tree into $work/w-NAME
    local name=$1; shift
    (cd "$tree" && env "$@" "$PY" -m pip wheel -q --no-deps -w "$work/w-$name" . \
        >"$work/$name.log" 2>&1) || { tail -n 40 "$work/$name.log"; exit 1; }
}
has_cuda_module() { wheel_has "$1" llmint8/_cuda; }
wheel_in_tree seq1
wheel_in_tree seq2 LLMINT8_CUDA=0
if has_cuda_module "$work"/w-seq2/llmint8-*.whl; then echo "packaging: the LLMINT8_CUDA=0 wheel ships _cuda"; exit 1; fi
check seq2 cpu "$work"/w-seq2/llmint8-*.whl
wheel_in_tree seq3
check seq3 "$expect" "$work"/w-seq3/llmint8-*.whl
if [[ $expect == cuda ]] && ! has_cuda_module "$work"/w-seq3/llmint8-*.whl; then
    echo "packaging: a CUDA build after a CPU-only one lacks _cuda"; exit 1
fi
echo "packaging: successive builds in one tree follow their CUDA setting"
echo "packaging: sdist and wheel build, install and import"
