"""Ctrl-C during long CPU work: Int8Linear, matmul and int8_matmul notice a pending SIGINT
within about a second (the thread pool checks for signals between chunks), raise
KeyboardInterrupt, and leave the layer and the pool as they were.

Each case runs in a child process: it times a small call, sizes the big one to take about
TARGET_S seconds (portable kernel, so that even a fast CPU needs a long call), receives
SIGINT half a second into it and reports how long the call ran after the signal."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

TARGET_S = 20.0          # how long the interrupted call would run to the end
MAX_LATENCY_S = 5.0      # signal -> KeyboardInterrupt: about a second, with room for a loaded machine
LATENCY_FRACTION = 0.25  # and well before the call would have finished

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import llmint8
    entry, threads = sys.argv[1], int(sys.argv[2])
    llmint8.set_num_threads(threads)
    llmint8.set_cpu_kernel("portable")
    rng = np.random.default_rng(0)
    k = n = 4096
    w = (rng.integers(-1000, 1000, (n, k)) / 1e3).astype(np.float32)
    if entry == "layer":
        layer = llmint8.Int8Linear.from_float(w, threshold=6.0, device="cpu")
        call = lambda x: layer(x)
    elif entry == "matmul":
        call = lambda x: llmint8.matmul(x, w, "llm.int8")
    else:
        wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
        call = lambda x: llmint8.int8_matmul(x, wq, kernel="portable")
    def inputs(m):
        if entry == "int8_matmul":
            return rng.integers(-128, 128, (m, k), dtype=np.int8)
        x = rng.standard_normal((m, k)).astype(np.float16)
        x[:, 7] *= 9.0  # an outlier column
        return x
    small = inputs(128)
    t = time.perf_counter(); want = call(small); dt = time.perf_counter() - t
    m = max(128, int(128 * TARGET / dt))
    big = np.tile(small, (m // 128 + 1, 1))[:m]
    print(json.dumps({"estimate": dt * m / 128}), flush=True)
    t0 = time.perf_counter()
    try:
        call(big)
        print(json.dumps({"finished": time.perf_counter() - t0}), flush=True)
        sys.exit(3)
    except KeyboardInterrupt:
        stopped = time.perf_counter()
    again = call(small)  # the pool and the layer still work, and compute the same bits
    print(json.dumps({"ran": stopped - t0, "same": bool(np.array_equal(again, want))}), flush=True)
""").replace("TARGET", repr(TARGET_S))


@pytest.mark.parametrize("entry,threads", [("layer", 2), ("layer", 1), ("matmul", 2), ("int8_matmul", 2)])
def test_ctrl_c_stops_long_cpu_work(entry, threads):
    env = dict(os.environ)
    env.pop("LLMINT8_CPU_KERNEL", None)
    p = subprocess.Popen([sys.executable, "-c", CHILD, entry, str(threads)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(p.stdout.readline() or "{}")
        assert "estimate" in first, p.stderr.read()
        time.sleep(0.5)
        sent = time.perf_counter()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=TARGET_S * 10)
        latency = time.perf_counter() - sent
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, f"child exit {p.returncode}:\n{out}\n{err}"
    result = json.loads(out.strip().splitlines()[-1])
    assert result["same"], "after the interrupt the same call gave different bits"
    bound = min(MAX_LATENCY_S, LATENCY_FRACTION * first["estimate"])
    assert latency < bound, (f"the call stopped {latency:.2f} s after SIGINT (it ran {result['ran']:.2f} s; "
                             f"the whole call: ~{first['estimate']:.1f} s); expected < {bound:.2f} s")
