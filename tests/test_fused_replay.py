"""The CUDA fused kernels (the decoding forward, the prefill flag pass), replayed in NumPy
(benchmarks/replay_fused.py) against the CPU backend: no GPU needed. The kernels themselves
are compared with the CPU backend on a GPU by tests/test_cuda.py (the fused tests)."""
import importlib.util
import os

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "replay_fused", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "replay_fused.py"))
replay_fused = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay_fused)


@pytest.mark.parametrize("fd_list", [1, 1024])  # 1: the epilogue walks the bitmap past the list
def test_decoding_kernel_replay_matches_cpu(fd_list):
    rng = np.random.default_rng(fd_list)
    for _ in range(8):
        replay_fused.check_case(rng, fd_list=fd_list)


def test_replay_sees_a_different_summation_order():
    # the replay is sharp enough to tell the CPU's order from another one
    rng = np.random.default_rng(5)
    k, n, m = 64, 9, 3
    w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, ::2] *= 30.0  # half the columns are outliers: long outlier sums
    import llmint8
    layer = llmint8.Int8Linear.from_float(w, threshold=6.0, device="cpu")
    want = layer.forward(x)
    got = replay_fused.replay(x, layer.weight_int8, layer.weight_scale, layer.outlier_weight, [], None, 6.0,
                              np.float32)
    np.testing.assert_array_equal(got, want)
    # the same terms summed in float64 then rounded: not the CPU's bits somewhere
    flags = (np.abs(x) >= 6.0).any(axis=0)
    wd = layer.weight_int8.astype(np.float32) * (layer.weight_scale[:, None] / np.float32(127.0))
    exact = x[:, flags].astype(np.float64) @ wd[:, flags].T.astype(np.float64)
    scales, xs = replay_fused.quantize_rows(x, flags, k)
    acc = xs.astype(np.int64) @ layer.weight_int8.astype(np.int64).T
    other = (acc * ((scales[:, None] * np.float32(1 / 16129.0)) * layer.weight_scale[None, :]).astype(np.float32)
             + exact.astype(np.float32)).astype(np.float32)
    assert not np.array_equal(other, want)


def test_prefill_flag_pass_and_list_replay_matches_cpu():
    # the fused prefill quantizer's flag pass covers x once and its list is the CPU's
    rng = np.random.default_rng(11)
    for _ in range(15):
        replay_fused.check_prefill_case(rng)
