#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C extension (CPU backend).
#
# Builds llmint8._C with -fsanitize=address,undefined into its own directory (default
# build/sanitize; the regular build in llmint8/ is left alone), then runs the core tests
# against that build, once with the fastest CPU kernel and once with the portable one.
# Any ASan report or UB stops the run with a non-zero exit status.
#
#   tests/sanitize.sh [BUILD_DIR]        # with the Python of the active virtual environment
#
# Needs gcc (or clang) with the sanitizer runtimes, and the test extra (pytest, hypothesis).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BUILD="$(mkdir -p "${1:-$ROOT/build/sanitize}" && cd "${1:-$ROOT/build/sanitize}" && pwd)"
PY="${PYTHON:-python}"
CC="${CC:-gcc}"
t0=$(date +%s)

# The package's Python files beside a sanitized _C, nothing else from the source tree.
rm -rf "$BUILD/llmint8"
mkdir -p "$BUILD"
(cd "$ROOT" && tar --exclude='*.so' --exclude='__pycache__' -cf - llmint8) | tar -xf - -C "$BUILD"

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
(cd "$ROOT" && LLMINT8_CUDA=0 CC="$CC" CFLAGS="$SAN" LDFLAGS="$SAN" \
    "$PY" setup.py -q build_ext --force --build-temp "$BUILD/tmp" --build-lib "$BUILD" >"$BUILD/build.log" 2>&1) \
    || { cat "$BUILD/build.log"; echo "sanitize: the sanitized build failed" >&2; exit 1; }

# Python itself is not instrumented: load the ASan runtime first. CPython's own
# allocations are reported as leaks at exit, so leak detection stays off.
ASAN_LIB="$("$CC" -print-file-name=libasan.so)"
export LD_PRELOAD="$ASAN_LIB${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONDONTWRITEBYTECODE=1
export LLMINT8_CUDA=0

cd "$BUILD"  # so that `import llmint8` finds the sanitized copy first
"$PY" -c "import llmint8, sys; f = llmint8._C.__file__; assert f.startswith('$BUILD'), f; print('sanitize: using', f)"

CORE=(test_primitives.py test_gemm.py test_kernels.py test_matmul.py test_linear.py test_errors.py
      test_hardening.py test_fuzz.py test_stress.py test_attention.py)
TESTS=("${CORE[@]/#/$ROOT/tests/}")
for kernel in "" portable; do
    echo "sanitize: core tests, LLMINT8_CPU_KERNEL=${kernel:-<fastest>}"
    LLMINT8_CPU_KERNEL="$kernel" "$PY" -m pytest -q -p no:cacheprovider -x "${TESTS[@]}"
done
echo "sanitize: ASan + UBSan run passed in $(( $(date +%s) - t0 )) s"
