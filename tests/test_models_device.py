"""The runner's device plumbing and its preallocated key/value cache.

On the CPU: device names, the errors without CuPy or a GPU, the KVCache (bit-identical to the
concatenating cache it replaces, within float rounding of a full recompute), RoPE tables, and
the synthetic models. The GPU halves (CuPy namespace against the NumPy one) skip without a GPU;
benchmarks/gpu_models_check.py measures them at real shapes on a GPU.
"""

import sys

import numpy as np
import pytest

from llmint8.models import KVCache, load_model
from llmint8.models import device as dev
from llmint8.models.synthetic import synthetic_model
from llmint8.models.transformer import _apply_rope, _rope_freqs, _rope_table

# float32 logits of a full recompute against incremental decoding: the same sums in another
# order (a GEMV per token instead of one GEMM), so they differ by float32 rounding only
RECOMPUTE_RTOL = 1e-5
# GPU float (cuBLAS fp32) against the CPU float path: the acceptance bound of the GPU check
GPU_FLOAT_RTOL = 1e-4


def _gpu_reason():
    try:
        dev.namespace("cuda")
    except dev.DeviceError as e:
        return str(e)
    return None


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"no GPU here: {GPU_REASON}")

VARIANTS = {
    "llama": {},
    "gemma-like": dict(sliding_window=8, sliding_layers=[True, False], qk_norm=True, sandwich_norm=True),
    "gpt2-like": dict(rope=None, norm="layer", gated=False, act="gelu", parallel_residual=True),
}


def _model(variant="llama", **kw):
    m = synthetic_model("tiny", **VARIANTS[variant], **kw)
    if VARIANTS[variant].get("rope") is None and "rope" in VARIANTS[variant]:
        m.weights["pos_embed"] = np.random.default_rng(5).standard_normal((512, 64)).astype(np.float32)
    return m


# --------------------------------------------------------------------------- device names and errors


@pytest.mark.parametrize("name,want", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"), ("CUDA:0", "cuda:0"),
                                       (None, "cpu")])
def test_parse_device(name, want):
    assert dev.parse_device(name) == want


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cpu:0", "", "cuda0"])
def test_parse_device_rejects_other_names(name):
    with pytest.raises(ValueError, match="expected 'cpu', 'cuda' or 'cuda:N'"):
        dev.parse_device(name)


def test_parse_device_rejects_non_strings():
    with pytest.raises(TypeError, match="device must be a str"):
        dev.parse_device(0)


def test_cpu_namespace_is_numpy_and_imports_no_cupy():
    assert dev.namespace("cpu") is np
    assert dev.xp_of(np.zeros(2)) is np and dev.device_of(np.zeros(2)) == "cpu"


def test_missing_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(dev.DeviceError, match=r"needs CuPy.*llmint8\[gpu\].*cupy-cuda12x"):
        dev.namespace("cuda")
    with pytest.raises(dev.DeviceError, match="needs CuPy"):
        _model().to("cuda")


@pytest.mark.skipif(GPU_REASON is None, reason="a GPU is present")
def test_no_gpu_is_one_clear_error_before_loading(tmp_path):
    # with CuPy installed but no GPU the message says so; without CuPy it names the extra
    with pytest.raises(dev.DeviceError, match="no CUDA GPU found|needs CuPy"):
        load_model(str(tmp_path / "does-not-exist.bin"), device="cuda")
    with pytest.raises(dev.DeviceError, match="no CUDA GPU found|needs CuPy"):
        _model().quantize("fp16", device="cuda")
    with pytest.raises(ValueError, match="'gpu' is not supported"):
        load_model(str(tmp_path / "x.bin"), device="gpu")


def test_to_same_device_is_the_model_itself():
    m = _model()
    assert m.to("cpu") is m and m.device == "cpu" and m.xp is np
    assert m.quantize("float").device == "cpu"


# --------------------------------------------------------------------------- KV cache


def _decode(model, ids, prompt, cache):
    """Hidden states of a prompt, then of one token at a time, with ``cache``."""
    hs = [model.hidden_states(ids[None, :prompt], 0, cache)]
    for i, t in enumerate(ids[prompt:]):
        hs.append(model.hidden_states(np.array([[t]]), prompt + i, cache))
    return np.concatenate(hs, axis=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ["float", "fp16", "llm.int8"])
def test_kv_cache_is_bit_identical_to_the_concatenating_cache(variant, method):
    m = _model(variant).quantize(method)
    ids = np.random.default_rng(1).integers(0, 512, 40)
    # capacity 4 grows (4 -> 16 -> 64) while decoding: the copies keep every bit
    c = m.new_cache(capacity=4)
    a = _decode(m, ids, 10, c)
    b = _decode(m, ids, 10, {})
    np.testing.assert_array_equal(a, b)
    assert c.length == 40 and c.capacity == 64


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decoding_matches_full_recompute(variant):
    m = _model(variant)
    ids = np.random.default_rng(2).integers(0, 512, 48)
    full = m.forward(ids[None])[0]
    c = m.new_cache()
    steps = [m.step(ids[:8], c)[0]] + [m.step([int(t)], c)[0] for t in ids[8:]]
    dec = np.stack(steps)
    ref = full[7:].astype(np.float64)
    err = np.abs(dec - ref).max() / np.abs(ref).max()
    assert err < RECOMPUTE_RTOL, err
    # greedy choices agree wherever the top two logits are apart by more than the error
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 10 * err * np.abs(ref).max()
    assert clear.sum() > len(clear) // 2
    np.testing.assert_array_equal(dec.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_generate_uses_the_cache_and_matches_stepwise_argmax():
    m = _model()
    prompt = [1, 5, 9, 200]
    out = m.generate(prompt, 12)
    c = m.new_cache()
    lg = m.step(prompt, c)
    want = []
    for _ in range(12):
        want.append(int(lg[0].argmax()))
        lg = m.step([want[-1]], c)
    assert out == want


def test_kv_cache_rewind_and_reset_reuse_the_arrays():
    m = _model()
    rng = np.random.default_rng(3)
    ids, other = rng.integers(0, 512, 20), rng.integers(0, 512, 8)
    c = m.new_cache(capacity=32)
    m.step(ids[:12], c)
    m.step(ids[12:], c)
    assert c.length == 20
    # back to position 12 with another continuation: positions 12.. are overwritten
    rewound = m.logits_from_hidden(m.hidden_states(other[None], 12, c)[:, -1])
    fresh = m.new_cache(capacity=32)
    m.step(ids[:12], fresh)
    np.testing.assert_array_equal(rewound, m.step(other, fresh))
    assert c.length == 20
    c.reset()
    assert c.length == 0 and c.capacity == 32
    np.testing.assert_array_equal(m.step(ids[:12], c), m.step(ids[:12], m.new_cache()))


def test_kv_cache_errors():
    m = _model()
    c = m.new_cache(capacity=8)
    with pytest.raises(ValueError, match="gap"):
        m.hidden_states(np.array([[1]]), 3, c)
    with pytest.raises(ValueError, match="batch of 1"):
        m.hidden_states(np.ones((2, 3), np.int64), 0, c)
    with pytest.raises(ValueError, match="exceeds the model's 512"):
        m.hidden_states(np.ones((1, 513), np.int64), 0, m.new_cache())
    with pytest.raises(ValueError, match="capacity must be in"):
        m.new_cache(capacity=0)
    with pytest.raises(ValueError, match="batch must be"):
        KVCache(m, batch=0)
    with pytest.raises(TypeError, match="KVCache"):
        m.step([1], {})
    with pytest.raises(ValueError, match="start_pos must be >= 0"):
        m.hidden_states(np.array([[1]]), -1)


def test_batched_cache():
    m = _model()
    ids = np.random.default_rng(4).integers(0, 512, (3, 10))
    c = m.new_cache(batch=3)
    a = m.step(ids, c)
    np.testing.assert_array_equal(a, m.logits_from_hidden(m.hidden_states(ids)[:, -1]))


# --------------------------------------------------------------------------- RoPE tables


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rope_table_rows_equal_the_per_position_angles(style):
    # the table must hold exactly what computing one position alone gives (float64 angle,
    # float32 after cos/sin), so prefill and decode rotate identically wherever they start
    m = _model()
    inv = _rope_freqs(m.config, 0)
    cos, sin = _rope_table(inv, 1024)
    pos = np.array([0, 1, 7, 255, 256, 1000, 1023])
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    np.testing.assert_array_equal(cos[pos], np.cos(ang).astype(np.float32))
    np.testing.assert_array_equal(sin[pos], np.sin(ang).astype(np.float32))
    x = np.random.default_rng(0).standard_normal((1, len(pos), 2, 16)).astype(np.float32)
    y = _apply_rope(x, cos[pos], sin[pos], style, 16)
    # float64 rotation of each pair as the reference
    c64, s64 = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x64 = x.astype(np.float64)
    if style == "half":
        a, b = x64[..., :8], x64[..., 8:]
        ref = np.concatenate([a * c64 - b * s64, b * c64 + a * s64], axis=-1)
    else:
        a, b = x64[..., 0::2], x64[..., 1::2]
        ref = np.empty_like(x64)
        ref[..., 0::2], ref[..., 1::2] = a * c64 - b * s64, a * s64 + b * c64
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- synthetic models


def test_synthetic_model_has_outlier_features_in_every_projection_input():
    m = synthetic_model("tiny")
    ids = np.random.default_rng(0).integers(0, 512, 32)
    with m.record_inputs() as rec:
        m.forward(ids[None])
    for name in m.linear_names:
        if name.endswith(("mlp.down", "attn.o")):
            continue
        big = np.flatnonzero(np.abs(rec[name]).max(axis=0) >= 6.0)
        assert set(m.outlier_dims.tolist()) <= set(big.tolist()), name


def test_synthetic_shapes_are_the_real_models():
    from llmint8.models.loaders import expected_shapes

    m = synthetic_model("smollm2-135m", n_layers=1, vocab_size=64)
    want = expected_shapes(m.config)
    assert {k: v.shape for k, v in m.weights.items()} == {k: want[k] for k in m.weights}
    assert m.weights["layers.0.attn.k.weight"].shape == (3 * 64, 576)  # SmolLM2-135M: 3 KV heads of 64
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic_model("gpt5")


# --------------------------------------------------------------------------- on a GPU


@needs_gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_float_logits_match_cpu(variant):
    m = _model(variant)
    ids = np.random.default_rng(6).integers(0, 512, (2, 40))
    g = m.to("cuda")
    ref = m.forward(ids).astype(np.float64)
    got = dev.to_host(g.forward(ids))
    assert np.abs(got - ref).max() / np.abs(ref).max() < GPU_FLOAT_RTOL


@needs_gpu
def test_gpu_decoding_and_save_load(tmp_path):
    from llmint8.models import save_quantized

    m = _model()
    q_cpu = m.quantize("llm.int8")
    q_gpu = m.quantize("llm.int8", device="cuda")
    assert q_gpu.device == "cuda" and type(q_gpu.weights["embed"]).__module__.startswith("cupy")
    save_quantized(q_cpu, tmp_path / "cpu")
    save_quantized(q_gpu, tmp_path / "gpu")
    for f in ("model.safetensors",):
        assert (tmp_path / "cpu" / f).read_bytes() == (tmp_path / "gpu" / f).read_bytes()
    back = load_model(str(tmp_path / "gpu"), device="cuda")
    ids = np.arange(1, 30)[None]
    np.testing.assert_array_equal(dev.to_host(back.forward(ids)), dev.to_host(q_gpu.forward(ids)))
    c = q_gpu.new_cache()
    assert type(q_gpu.step(ids, c)).__module__.startswith("cupy")


# --------------------------------------------------------------------------- fixed-shape decoder


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("method", ["float", "llm.int8"])
def test_fixed_shape_decoder_matches_eager_steps(variant, method):
    # attention over the whole capacity with masked (zero) terms: the same values up to float32
    # rounding of the longer sums
    m = _model(variant).quantize(method)
    ids = np.random.default_rng(7).integers(0, 512, 30)
    d = m.decoder(capacity=40)
    c = m.new_cache()
    a = [d.prefill(ids[:8])] + [d.next(t).copy() for t in ids[8:]]
    b = [m.step(ids[:8], c)] + [m.step([int(t)], c) for t in ids[8:]]
    a, b = np.concatenate(a), np.concatenate(b)
    assert np.abs(a - b).max() / np.abs(b).max() < RECOMPUTE_RTOL
    assert d.length == 30 and d.kernels is None


def test_fixed_shape_decoder_errors():
    m = _model()
    with pytest.raises(ValueError, match="needs a model on a GPU"):
        m.decoder(graph=True)
    d = m.decoder(capacity=3)
    d.prefill([1, 2])
    d.next(3)
    with pytest.raises(ValueError, match="capacity of 3 positions is full"):
        d.next(4)
    d.reset()
    with pytest.raises(ValueError, match="not in"):
        d.next(512)
    with m.add_hook(lambda name, x: None):
        with pytest.raises(ValueError, match="does not run hooks"):
            d.next(1)


@needs_gpu
def test_gpu_graph_decoder_matches_eager():
    m = _model().to("cuda")
    ids = np.random.default_rng(8).integers(0, 512, 24)
    d = m.decoder(capacity=32)
    c = m.new_cache()
    a = [dev.to_host(d.prefill(ids[:8]))] + [dev.to_host(d.next(t)) for t in ids[8:]]
    b = [dev.to_host(m.step(ids[:8], c))] + [dev.to_host(m.step([int(t)], c)) for t in ids[8:]]
    a, b = np.concatenate(a), np.concatenate(b)
    assert np.abs(a - b).max() / np.abs(b).max() < GPU_FLOAT_RTOL
    assert d.kernels is None or d.kernels > 0


# --------------------------------------------------------------------------- the commands' --device


@pytest.mark.parametrize("command", ["perplexity", "quantize", "analyze"])
def test_cli_bad_device_is_a_usage_error_before_any_work(command, tmp_path, capsys, monkeypatch):
    import llmint8.analysis.cli as acli
    import llmint8.models as models
    from llmint8 import __main__ as cli

    def boom(*a, **k):
        raise AssertionError("the command loaded a model before checking --device")

    monkeypatch.setattr(models, "load_model", boom)
    monkeypatch.setattr(acli, "_load", boom)
    text = tmp_path / "t.txt"
    text.write_text("some text to score\n")
    argv = {"perplexity": ["perplexity", "--model", "stories260K", "--text", str(text)],
            "quantize": ["quantize", "--model", "stories260K", "--out", str(tmp_path / "q")],
            "analyze": ["analyze", "--model", "stories260K", "--text", str(text), "--out", str(tmp_path / "a")]}[command]
    for device, words in (("gpu", ("--device gpu", "expected 'cpu', 'cuda' or 'cuda:N'")),
                          ("cuda", ("--device cuda",))):
        if device == "cuda" and GPU_REASON is None:
            continue
        rc = cli.main(argv + ["--device", device, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        for w in words:
            assert w in lines[0], lines[0]
