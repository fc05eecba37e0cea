"""The real stories260K llama2.c checkpoint: exact fp32 behaviour, quantized perplexity, hooks."""

from __future__ import annotations

import numpy as np
import pytest

import llmint8
from conftest import int8linear_nbytes
from data_paths import STORIES_BIN, STORIES_TOK, WIKITEXT_TEST, SHAKESPEARE, require
from llmint8.models import load_model, perplexity, token_nll

SENTENCE = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
            "One day, she saw a big, red ball.")
GREEDY_PREFIX = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
                 "One day, she saw a big, r")


@pytest.fixture(scope="module")
def model():
    return load_model(require(*STORIES_BIN))


@pytest.fixture(scope="module")
def text_tokens(model):
    with open(require(*SHAKESPEARE), encoding="utf-8") as f:
        text = f.read()[:6000]
    return model.tokenizer.encode(text)[:1024]


def test_config_and_names(model):
    c = model.config
    assert (c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["vocab_size"], c["hidden_dim"],
            c["max_seq_len"]) == (64, 5, 8, 4, 512, 172, 512)
    assert model.arch == "llama" and c["rope"] == "interleaved"
    assert model.baseline_note == ""
    assert 250_000 < model.n_params < 270_000
    assert model.linear_names[:7] == [f"layers.0.{n}" for n in
                                      ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down")]
    assert len(model.linear_names) == 35


def test_zoo_name_resolves_to_shared_file():
    require(*STORIES_BIN)
    assert load_model("stories260K").name == "stories260K"


def test_tokenizer_matches_run_c(model):
    ids = model.tokenizer.encode(SENTENCE, bos=True)
    assert len(ids) == 45 and ids[0] == 1
    assert model.tokenizer.decode(ids) == SENTENCE
    assert model.tokenizer.encode(SENTENCE, bos=False) == ids[1:]
    # byte fallback round trip for characters outside the 512-piece vocabulary
    odd = "naïve 日本 ☃"
    assert model.tokenizer.decode(model.tokenizer.encode(odd)) == odd


def test_greedy_from_bos(model):
    out = model.generate([1], 48)
    assert model.tokenizer.decode(out).startswith(GREEDY_PREFIX)


def test_sentence_nll(model):
    ids = model.tokenizer.encode(SENTENCE)
    nll = token_nll(model, ids)
    assert nll.shape == (44,)
    assert abs(nll.mean() - 0.324) < 1e-3


def test_forward_batch_and_incremental(model):
    ids = np.array(model.tokenizer.encode(SENTENCE))
    lg = model.forward(np.stack([ids, ids[::-1]]))
    assert lg.shape == (2, 45, 512) and lg.dtype == np.float32
    np.testing.assert_allclose(lg[0], model.forward(ids[None])[0], rtol=1e-5, atol=1e-5)
    cache = {}
    a = model.forward(ids[None, :20], cache=cache)
    b = model.forward(ids[None, 20:], start_pos=20, cache=cache)
    np.testing.assert_allclose(np.concatenate([a, b], axis=1), lg[:1], rtol=1e-4, atol=1e-4)


def test_float16_activations_close(model):
    m16 = load_model(require(*STORIES_BIN), dtype="float16")
    ids = model.tokenizer.encode(SENTENCE)
    assert abs(token_nll(m16, ids).mean() - token_nll(model, ids).mean()) < 5e-3


def test_sliding_window_equals_full_when_stride_equals_context(model, text_tokens):
    t = text_tokens[:300]
    r = perplexity(model, t, context=512, stride=512, progress=False)
    assert r["n_tokens"] == 299
    assert abs(r["nll"] - token_nll(model, t).mean()) < 1e-6
    r2 = perplexity(model, t, context=100, stride=50, progress=False)
    assert r2["n_tokens"] == 299


def test_int8_perplexity_within_one_percent(model, text_tokens):
    base = perplexity(model, text_tokens, context=256, stride=128, progress=False)["ppl"]
    q = model.quantize("llm.int8", threshold=6.0)
    got = perplexity(q, text_tokens, context=256, stride=128, progress=False)["ppl"]
    assert abs(got - base) / base < 0.01
    # the original model is untouched and shares the non-linear weights
    assert model.method == "float" and q.weights is model.weights
    assert q.linear_weight_nbytes < model.linear_weight_nbytes / 3


def test_methods_and_nbytes(model):
    ids = model.tokenizer.encode(SENTENCE)
    n_lin = sum(model.weights[n + ".weight"].size for n in model.linear_names)
    assert model.linear_weight_nbytes == 4 * n_lin
    ref = token_nll(model, ids).mean()
    for method in ("float", "fp16", "absmax", "zeropoint", "rowwise"):
        q = model.quantize(method)
        if method == "fp16":
            assert q.linear_weight_nbytes == 2 * n_lin
        elif method != "float":  # int8 weight and a few scales, unpacked
            assert n_lin <= q.linear_weight_nbytes < 1.1 * n_lin
        assert abs(token_nll(q, ids).mean() - ref) < 0.1, method
    # vectorwise is an Int8Linear: it holds the weight packed for its CPU kernel, padding included
    for kernel in llmint8.cpu_kernels():
        llmint8.set_cpu_kernel(kernel)
        try:
            q = model.quantize("vectorwise", device="cpu")
        finally:
            llmint8.set_cpu_kernel(None)
        shapes = [model.weights[n + ".weight"].shape for n in model.linear_names]
        assert q.linear_weight_nbytes == sum(int8linear_nbytes(kernel, n, k) for n, k in shapes), kernel
        assert abs(token_nll(q, ids).mean() - ref) < 0.1, kernel
    with pytest.raises(ValueError, match="unknown method"):
        model.quantize("int4")


def test_calibrated_outliers(model, text_tokens):
    cols = model.calibrate(text_tokens[:256], threshold=3.0)
    assert set(cols) == set(model.linear_names)
    assert any(len(c) for c in cols.values())
    q = model.quantize("llm.int8", threshold=3.0, calibration_tokens=text_tokens[:256])
    ids = model.tokenizer.encode(SENTENCE)
    assert abs(token_nll(q, ids).mean() - 0.324) < 0.02


def test_hooks_record_and_replace(model):
    ids = np.array([model.tokenizer.encode(SENTENCE)] * 2)
    with model.record_inputs(names=["layers.1.mlp.down", "layers.0.attn.q"]) as rec:
        model.forward(ids)
        model.forward(ids[:1])
    assert sorted(rec.keys()) == ["layers.0.attn.q", "layers.1.mlp.down"]
    assert rec["layers.0.attn.q"].shape == (135, 64) and rec["layers.0.attn.q"].dtype == np.float32
    assert rec["layers.1.mlp.down"].shape == (135, 172)
    assert not model._linear_hooks

    seen = []
    h = model.add_hook(lambda name, x: seen.append(name) or np.zeros_like(x), names=["layers.4.mlp.down"])
    zeroed = model.forward(ids[:1])
    h.remove()
    assert seen == ["layers.4.mlp.down"]
    assert not np.allclose(zeroed, model.forward(ids[:1]))

    probs = {}
    h = model.add_hook(lambda i, p: probs.__setitem__(i, p.copy()), kind="attention_probs")
    model.forward(ids)
    h.remove()
    assert sorted(probs) == list(range(5))
    p = probs[0]
    assert p.shape == (2, 8, 45, 45)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(p[0, 0], 1) == 0)
    with pytest.raises(ValueError, match="unknown linear layer"):
        model.add_hook(lambda n, x: None, names=["layers.9.attn.q"])


def test_wikitext_perplexity_is_finite(model):
    with open(require(*WIKITEXT_TEST), encoding="utf-8") as f:
        toks = model.tokenizer.encode(f.read()[:3000])[:512]
    r = perplexity(model, toks, context=128, stride=64, progress=False)
    assert np.isfinite(r["ppl"]) and r["n_tokens"] == len(toks) - 1


def test_tokenizer_file_hostile(tmp_path):
    from llmint8.models.tokenizers import load_llama2c_tokenizer

    good = open(require(*STORIES_TOK), "rb").read()
    p = tmp_path / "tok.bin"
    p.write_bytes(good[:3000])
    with pytest.raises(ValueError, match="truncated|length"):
        load_llama2c_tokenizer(str(p), 512)
    p.write_bytes(b"\xff\xff\xff\x7f" + good[4:])
    with pytest.raises(ValueError, match="max_token_length"):
        load_llama2c_tokenizer(str(p), 512)


def test_int8_on_cuda_matches_cpu(model):
    import llmint8

    from llmint8.models import device

    if not llmint8.cuda_available():
        pytest.skip("CUDA backend not available (built without CUDA, or no GPU/driver here)")
    try:
        device.namespace("cuda")
    except device.DeviceError as e:
        pytest.skip(f"the model runs on the GPU through CuPy: {e}")
    ids = np.array([model.tokenizer.encode(SENTENCE)])
    cpu = model.quantize("llm.int8", device="cpu").forward(ids)
    # quantize(device="cuda") puts the whole model on the GPU: its logits are a CuPy array
    gpu = device.to_host(model.quantize("llm.int8", device="cuda").forward(ids))
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_float16_model_quantized(model):
    m16 = load_model(require(*STORIES_BIN), dtype="float16")
    ids = model.tokenizer.encode(SENTENCE)
    for method in ("fp16", "llm.int8", "vectorwise"):
        assert abs(token_nll(m16.quantize(method), ids).mean() - 0.324) < 0.02, method
