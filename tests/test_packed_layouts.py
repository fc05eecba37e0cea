"""The packed weight layouts of every SIMD kernel, on whatever x86 CPU runs the tests.

tests/c/packed_layouts.c checks packing, unpacking, column extraction, column selection and
the outlier product straight from the packed weight for the avx2, avx-vnni and avx512-vnni
layouts against plain references. Those routines need AVX2 at most, so a CPU without VNNI
still runs the code a VNNI CPU runs outside its GEMM. Built here from csrc/core with the C
compiler that builds the extension.
"""
import os
import platform
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(ROOT, "csrc", "core")
SOURCES = ["gemm.c", "gemm_x86.c", "cpu_features.c", "threadpool.c", "common.c", "quantize.c", "quantize_x86.c"]


def _compiler():
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc") or shutil.which("gcc")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the SIMD layouts exist on x86-64 only")
def test_packed_layouts_of_every_kernel(tmp_path):
    cc = _compiler()
    if cc is None or not os.path.isdir(CORE):
        pytest.skip("no C compiler, or no csrc/ beside the tests (an installed copy)")
    exe = tmp_path / "packed_layouts"
    cmd = [cc, "-std=c11", "-O2", "-ffp-contract=off", "-Wall", "-I", CORE,
           os.path.join(ROOT, "tests", "c", "packed_layouts.c"), *(os.path.join(CORE, s) for s in SOURCES),
           "-lm", "-pthread", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"build failed:\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    if run.returncode == 77:
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr
    assert "avx512vnni layout checked" in run.stdout, run.stdout
