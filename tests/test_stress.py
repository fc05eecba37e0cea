"""Leaks, reference counts and concurrent calls."""
import gc
import sys
import threading

import numpy as np
import pytest

import llmint8

# Resident-memory growth allowed over 2000 forward calls after warm-up: allocator
# slack, not per-call leaks (a leak of even one 8 KB buffer per call would be 16 MB).
MAX_RSS_GROWTH_BYTES = 8 * 2**20


def rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        pytest.skip("no /proc/self/statm on this platform")


def test_no_memory_growth_over_2000_calls(device):
    rng = np.random.default_rng(0)
    layers = [llmint8.Int8Linear.from_float(rng.standard_normal((n, k)).astype(np.float16),
                                            bias=np.ones(n, np.float32), outlier_columns=[0], device=device)
              for n, k in [(64, 96), (33, 200), (128, 64)]]
    inputs = [(rng.standard_normal((m, layer.in_features)) * 4).astype(dt)
              for layer in layers for m in (1, 7, 40) for dt in (np.float16, np.float32)]

    def run(n_calls):
        for i in range(n_calls):
            x = inputs[i % len(inputs)]
            layer = next(lay for lay in layers if lay.in_features == x.shape[1])
            layer(x)
            if i % 100 == 0:  # error paths must not leak either
                with pytest.raises(ValueError):
                    layer(np.full((2, layer.in_features), np.nan, np.float32))

    run(200)
    gc.collect()
    before = rss_bytes()
    run(2000)
    gc.collect()
    growth = rss_bytes() - before
    assert growth <= MAX_RSS_GROWTH_BYTES, f"RSS grew by {growth} bytes over 2000 calls"


def test_refcounts_unchanged(device):
    w = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    layer = llmint8.Int8Linear.from_float(w, device=device)
    x = np.ones((4, 32), np.float32)
    rx, rl, rw = sys.getrefcount(x), sys.getrefcount(layer), sys.getrefcount(w)
    for _ in range(100):
        layer(x)
        layer.forward(x)
        llmint8.quantize_rowwise(x)
        llmint8.find_outlier_columns(x)
        try:
            layer(x[:, :5])
        except ValueError:
            pass
    llmint8.Int8Linear.from_float(w, device=device)
    assert (sys.getrefcount(x), sys.getrefcount(layer), sys.getrefcount(w)) == (rx, rl, rw)


def test_four_threads_share_one_layer(device):
    x_all, w, cols = llmint8.paper_like(64, 512, 256, dtype=np.float16, seed=3)
    layer = llmint8.Int8Linear.from_float(w, outlier_columns=cols[:1], device=device)
    batches = [x_all[i * 16:(i + 1) * 16] for i in range(4)]
    serial = [layer(b) for b in batches]
    results = [[None] * 20 for _ in range(4)]
    errors = []

    def worker(t):
        try:
            for r in range(20):
                results[t][r] = layer(batches[t])
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t in range(4):
        for r in range(20):
            np.testing.assert_array_equal(results[t][r], serial[t])
