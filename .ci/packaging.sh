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
missing=$(comm -23 <(cd csrc && find . -type f \( -name '*.c' -o -name '*.h' -o -name '*.cu' \) | sed 's|^\./||' | sort) \
                   <(tar -tzf "$sdist" | sed -n 's|^[^/]*/csrc/||p' | sort))
if [[ -n $missing ]]; then echo "packaging: the sdist lacks: $missing"; exit 1; fi

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
check wheel "$expect" "$work"/wheel/llmint8-*.whl
echo "packaging: sdist and wheel build, install and import"
