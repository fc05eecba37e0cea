"""CPU threading: results are bit-identical for every thread count, next to busy neighbours,
from several Python threads at once, and in a forked child; set_num_threads and its default.

Speed under contention is a benchmark (benchmarks/bench_contention.py), not a test."""
import os
import subprocess
import sys
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import llmint8
from llmint8 import _C
from conftest import ref_llm_int8

ORACLE_REL_TOL = 1e-4  # float32 output against the float64 reference (as in test_linear.py)
THREAD_COUNTS = (1, 2, 3, 4, 7, 16, 64)  # more than the cores too: the pool must not mind
KERNELS = _C.cpu_kernels()
# shapes on both sides of the parallel thresholds: (tokens, in, out)
SHAPES = [(3, 64, 48), (64, 1024, 1024), (300, 512, 200), (1, 4096, 1024)]


@pytest.fixture
def restore_threads():
    old = llmint8.get_num_threads()
    yield
    llmint8.set_num_threads(old)


def make_case(m, k, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(dtype)
    x[:, rng.choice(k, size=max(1, k // 500), replace=False)] *= 9.0  # dynamic outlier columns
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    return x, w, b


def layer_for(kernel, w, b):
    old = llmint8.cpu_kernel()
    llmint8.set_cpu_kernel(kernel)
    try:
        return llmint8.Int8Linear.from_float(w, b, threshold=6.0, device="cpu")
    finally:
        llmint8.set_cpu_kernel(old)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_same_bits_for_every_thread_count(kernel, dtype, shape, restore_threads):
    m, k, n = shape
    x, w, b = make_case(m, k, n, dtype)
    layer = layer_for(kernel, w, b)
    llmint8.set_num_threads(1)
    want = layer(x)
    if dtype == np.float32:
        assert llmint8.relative_error(want, ref_llm_int8(x, w, b, 6.0)) <= ORACLE_REL_TOL
    for nt in THREAD_COUNTS:
        llmint8.set_num_threads(nt)
        np.testing.assert_array_equal(layer(x), want, err_msg=f"{nt} threads")


@pytest.mark.parametrize("kernel", KERNELS)
def test_primitives_same_bits_for_every_thread_count(kernel, restore_threads):
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, (97, 1000), dtype=np.int8)
    bq = rng.integers(-128, 128, (530, 1000), dtype=np.int8)
    x = rng.standard_normal((400, 700)).astype(np.float32) * 3
    ref = a.astype(np.int64) @ bq.astype(np.int64).T
    llmint8.set_num_threads(1)
    want = (llmint8.quantize_rowwise(x, skip_columns=[5, 9]), llmint8.find_outlier_columns(x, 6.0))
    for nt in THREAD_COUNTS:
        llmint8.set_num_threads(nt)
        np.testing.assert_array_equal(llmint8.int8_matmul(a, bq, kernel=kernel), ref, err_msg=f"{nt} threads")
        q, s = llmint8.quantize_rowwise(x, skip_columns=[5, 9])
        np.testing.assert_array_equal(q, want[0][0])
        np.testing.assert_array_equal(s, want[0][1])
        np.testing.assert_array_equal(llmint8.find_outlier_columns(x, 6.0), want[1])


def test_same_bits_next_to_busy_numpy_thread(restore_threads):
    """A thread of the same process keeps NumPy's BLAS busy while the layer runs."""
    x, w, b = make_case(64, 1024, 1024, np.float16, seed=5)
    layer = llmint8.Int8Linear.from_float(w, b, threshold=6.0, device="cpu")
    llmint8.set_num_threads(1)
    want = layer(x)
    llmint8.set_num_threads(0)
    stop = threading.Event()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 256), dtype=np.float32)

    def busy():
        while not stop.is_set():
            a @ a

    t = threading.Thread(target=busy)
    t.start()
    try:
        for nt in (0, 2, 5):
            llmint8.set_num_threads(nt)
            for _ in range(10):
                np.testing.assert_array_equal(layer(x), want)
    finally:
        stop.set()
        t.join()


def test_same_bits_from_several_python_threads(restore_threads):
    """Calls from several threads at once share one pool (one of them uses it, the others
    run alone): every result stays exact."""
    cases = [make_case(48, 768, 640, np.float32, seed=s) for s in range(4)]
    layers = [llmint8.Int8Linear.from_float(w, b, threshold=6.0, device="cpu") for _, w, b in cases]
    llmint8.set_num_threads(1)
    want = [layer(x) for layer, (x, _, _) in zip(layers, cases)]
    llmint8.set_num_threads(0)

    def run(i):
        for _ in range(15):
            np.testing.assert_array_equal(layers[i % 4](cases[i % 4][0]), want[i % 4])
        return i

    with ThreadPoolExecutor(max_workers=6) as ex:
        assert sorted(ex.map(run, range(12))) == list(range(12))


def run_python(code, env=None, timeout=120):
    """Run `code` in a fresh interpreter that imports the same llmint8 as this one."""
    full_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=full_env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(llmint8.__file__))))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available on this platform")
def test_forked_child_computes_after_parent_used_threads():
    """The parent's workers do not exist in a forked child: the child must start its own
    (an OpenMP build hung here)."""
    r = run_python("""
        import os, sys, time, numpy as np, llmint8
        rng = np.random.default_rng(0)
        x = rng.standard_normal((64, 1024)).astype(np.float32)
        w = (rng.standard_normal((1024, 1024)) / 32).astype(np.float32)
        layer = llmint8.Int8Linear.from_float(w)
        llmint8.set_num_threads(2)
        y = layer(x)                       # the pool's workers exist now
        pid = os.fork()
        if pid == 0:
            os._exit(0 if np.array_equal(layer(x), y) else 3)
        deadline = time.time() + 60
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("child", os.waitstatus_to_exitcode(status))
                sys.exit(0)
            time.sleep(0.02)
        os.kill(pid, 9)
        print("child hung")
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "child 0", r.stdout + r.stderr


def test_default_threads_follow_affinity_and_omp_num_threads():
    code = "import llmint8; print(llmint8.get_num_threads())"
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert int(r.stdout) == expected
    r = run_python(code, env={"OMP_NUM_THREADS": "3"})
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == 3


def test_set_num_threads_round_trip_and_errors(restore_threads):
    for n in (1, 3, 300):
        llmint8.set_num_threads(n)
        assert llmint8.get_num_threads() == n
    llmint8.set_num_threads(0)
    assert llmint8.get_num_threads() >= 1
    for bad in (-1, 4097):
        with pytest.raises(ValueError, match="number of threads"):
            llmint8.set_num_threads(bad)
    with pytest.raises(TypeError):
        llmint8.set_num_threads("two")
