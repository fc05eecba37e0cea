"""Round trips through every checkpoint format: small random models are written here (llama2.c
.bin, Hugging Face safetensors + config.json, GGUF via gguf.GGUFWriter), loaded, and their
forward compared with an independent float64 NumPy computation on the tensors as stored."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmint8.models import load_model

D, H, KV, F, V, L, T = 16, 4, 2, 32, 50, 2, 7
HD = D // H
RNG = np.random.default_rng(1234)


def rnd(*shape, scale=0.3):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------- reference pieces


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def silu(x):
    return x / (1 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf(x):
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def rope_half(x, theta, rot=None):
    """x (T, hd): Hugging Face rotate_half on the first ``rot`` dims."""
    t_, hd = x.shape
    rot = rot or hd
    inv = theta ** (-np.arange(0, rot, 2) / rot)
    ang = np.arange(t_)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
    xr = x[:, :rot]
    rotated = np.concatenate([-xr[:, rot // 2:], xr[:, :rot // 2]], 1)
    return np.concatenate([xr * cos + rotated * sin, x[:, rot:]], 1)


def rope_complex(x, theta=10000.0):
    """x (T, hd): llama2.c/Meta interleaved pairs as complex numbers."""
    t_, hd = x.shape
    z = x[:, 0::2] + 1j * x[:, 1::2]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    z = z * np.exp(1j * np.arange(t_)[:, None] * inv[None])
    out = np.empty_like(x)
    out[:, 0::2], out[:, 1::2] = z.real, z.imag
    return out


def attention(q, k, v, n_heads, n_kv, rope, scale=None, window=None):
    """q (T, n_heads*hd), k/v (T, n_kv*hd) -> (T, n_heads*hd), one head at a time."""
    t_ = q.shape[0]
    hd = q.shape[1] // n_heads
    out = np.zeros_like(q)
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        qh = rope(q[:, h * hd:(h + 1) * hd])
        kh = rope(k[:, g * hd:(g + 1) * hd])
        vh = v[:, g * hd:(g + 1) * hd]
        s = qh @ kh.T * (scale if scale is not None else 1 / np.sqrt(hd))
        for i in range(t_):
            for j in range(t_):
                if j > i or (window is not None and i - j >= window):
                    s[i, j] = -np.inf
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        out[:, h * hd:(h + 1) * hd] = p @ vh
    return out


def check(model, ref_fn, tokens, tol=2e-4):
    got = model.forward(tokens)
    assert got.shape == (tokens.shape[0], tokens.shape[1], model.config["vocab_size"])
    for b in range(tokens.shape[0]):
        np.testing.assert_allclose(got[b], ref_fn(tokens[b]), rtol=tol, atol=tol)


def tokens_batch():
    return RNG.integers(0, V, size=(2, T))


def write_hf(folder, config, tensors, shards=1):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        return
    wm = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, os.path.join(folder, fn))
        wm.update({n: fn for n in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)


# --------------------------------------------------------------------------- Llama family


def llama_tensors(bias=False, tied=False):
    t = {"model.embed_tokens.weight": rnd(V, D, scale=1.0), "model.norm.weight": 1 + rnd(D, scale=0.1)}
    if not tied:
        t["lm_head.weight"] = rnd(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rnd(D, scale=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rnd(D, scale=0.1)
        t[p + "self_attn.q_proj.weight"] = rnd(H * HD, D)
        t[p + "self_attn.k_proj.weight"] = rnd(KV * HD, D)
        t[p + "self_attn.v_proj.weight"] = rnd(KV * HD, D)
        t[p + "self_attn.o_proj.weight"] = rnd(D, H * HD)
        if bias:
            for a, n in (("q", H), ("k", KV), ("v", KV)):
                t[p + f"self_attn.{a}_proj.bias"] = rnd(n * HD)
        t[p + "mlp.gate_proj.weight"] = rnd(F, D)
        t[p + "mlp.up_proj.weight"] = rnd(F, D)
        t[p + "mlp.down_proj.weight"] = rnd(D, F)
    return t


def llama_ref(t, theta, eps, tied=False):
    def run(tok):
        x = t["model.embed_tokens.weight"][tok].astype(np.float64)
        for i in range(L):
            p = f"model.layers.{i}."
            h = rms(x, t[p + "input_layernorm.weight"], eps)
            q, k, v = (h @ t[p + f"self_attn.{a}_proj.weight"].T + t.get(p + f"self_attn.{a}_proj.bias", 0)
                       for a in "qkv")
            a = attention(q, k, v, H, KV, lambda z: rope_half(z, theta))
            x = x + a @ t[p + "self_attn.o_proj.weight"].T
            h = rms(x, t[p + "post_attention_layernorm.weight"], eps)
            x = x + (silu(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
        x = rms(x, t["model.norm.weight"], eps)
        return x @ (t["model.embed_tokens.weight"] if tied else t["lm_head.weight"]).T
    return run


def llama_config(model_type="llama", tied=False):
    return {"model_type": model_type, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
            "num_attention_heads": H, "num_key_value_heads": KV, "vocab_size": V, "rms_norm_eps": 1e-5,
            "rope_theta": 500.0, "max_position_embeddings": 64, "hidden_act": "silu",
            "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2}


@pytest.mark.parametrize("model_type,bias,tied,shards", [("llama", False, False, 1), ("qwen2", True, True, 1),
                                                         ("mistral", False, False, 3)])
def test_hf_llama_family(tmp_path, model_type, bias, tied, shards):
    t = llama_tensors(bias=bias, tied=tied)
    write_hf(str(tmp_path), llama_config(model_type, tied), t, shards=shards)
    m = load_model(str(tmp_path))
    assert m.arch == "llama" and m.config["n_kv_heads"] == KV and m.tokenizer is None
    assert m.linear_names[:7] == [f"layers.0.{n}" for n in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down")]
    check(m, llama_ref(t, 500.0, 1e-5, tied=tied), tokens_batch())


def test_hf_llama_float16_weights_and_activations(tmp_path):
    t = {k: v.astype(np.float16) for k, v in llama_tensors().items()}
    write_hf(str(tmp_path), llama_config(), t)
    m = load_model(str(tmp_path), dtype="float16")
    assert m.weights["layers.0.attn.q.weight"].dtype == np.float16
    ref = llama_ref({k: v.astype(np.float64) for k, v in t.items()}, 500.0, 1e-5)
    check(m, ref, tokens_batch(), tol=3e-2)


def test_hf_tokenizer_json(tmp_path):
    from data_paths import require

    tj = require("tokenizers", "llama2_32000", "tokenizer.json")
    t = llama_tensors()
    write_hf(str(tmp_path), llama_config(), t)
    with open(tj, "rb") as src, open(tmp_path / "tokenizer.json", "wb") as dst:
        dst.write(src.read())
    m = load_model(str(tmp_path))
    ids = m.tokenizer.encode("Hello world", bos=True)
    assert ids[0] == 1 and m.tokenizer.decode(ids) == "Hello world"


# --------------------------------------------------------------------------- GPT-2


def test_hf_gpt2(tmp_path):
    npos = 32
    t = {"wte.weight": rnd(V, D, scale=1.0), "wpe.weight": rnd(npos, D), "ln_f.weight": 1 + rnd(D, scale=0.1),
         "ln_f.bias": rnd(D, scale=0.1)}
    for i in range(L):
        p = f"h.{i}."
        t.update({p + "ln_1.weight": 1 + rnd(D, scale=0.1), p + "ln_1.bias": rnd(D, scale=0.1),
                  p + "ln_2.weight": 1 + rnd(D, scale=0.1), p + "ln_2.bias": rnd(D, scale=0.1),
                  # Conv1D layout: (in, out)
                  p + "attn.c_attn.weight": rnd(D, 3 * D), p + "attn.c_attn.bias": rnd(3 * D),
                  p + "attn.c_proj.weight": rnd(D, D), p + "attn.c_proj.bias": rnd(D),
                  p + "mlp.c_fc.weight": rnd(D, 4 * D), p + "mlp.c_fc.bias": rnd(4 * D),
                  p + "mlp.c_proj.weight": rnd(4 * D, D), p + "mlp.c_proj.bias": rnd(D),
                  p + "attn.bias": np.tril(np.ones((npos, npos), np.float32))[None, None]})
    write_hf(str(tmp_path), {"model_type": "gpt2", "n_embd": D, "n_layer": L, "n_head": H, "vocab_size": V,
                             "n_positions": npos, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}, t)

    def ref(tok):
        x = t["wte.weight"][tok].astype(np.float64) + t["wpe.weight"][: len(tok)]
        for i in range(L):
            p = f"h.{i}."
            h = layer_norm(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"])
            qkv = h @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
            a = attention(qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:], H, H, lambda z: z)
            x = x + a @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
            h = layer_norm(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"])
            x = x + gelu_tanh(h @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]) @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
        return layer_norm(x, t["ln_f.weight"], t["ln_f.bias"]) @ t["wte.weight"].T

    m = load_model(str(tmp_path))
    assert m.arch == "gpt2" and "layers.0.mlp.gate" not in m.linear_names
    check(m, ref, tokens_batch())


# --------------------------------------------------------------------------- OPT


def test_hf_opt(tmp_path):
    npos = 32
    pre = "model.decoder."
    t = {pre + "embed_tokens.weight": rnd(V, D, scale=1.0), pre + "embed_positions.weight": rnd(npos + 2, D),
         pre + "final_layer_norm.weight": 1 + rnd(D, scale=0.1), pre + "final_layer_norm.bias": rnd(D, scale=0.1)}
    for i in range(L):
        p = pre + f"layers.{i}."
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + n + ".weight"], t[p + n + ".bias"] = 1 + rnd(D, scale=0.1), rnd(D, scale=0.1)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{n}.weight"], t[p + f"self_attn.{n}.bias"] = rnd(D, D), rnd(D)
        t[p + "fc1.weight"], t[p + "fc1.bias"] = rnd(F, D), rnd(F)
        t[p + "fc2.weight"], t[p + "fc2.bias"] = rnd(D, F), rnd(D)
    write_hf(str(tmp_path), {"model_type": "opt", "hidden_size": D, "ffn_dim": F, "num_hidden_layers": L,
                             "num_attention_heads": H, "vocab_size": V, "max_position_embeddings": npos,
                             "do_layer_norm_before": True, "word_embed_proj_dim": D,
                             "activation_function": "relu", "bos_token_id": 2}, t)

    def ref(tok):
        x = t[pre + "embed_tokens.weight"][tok].astype(np.float64) + t[pre + "embed_positions.weight"][2:2 + len(tok)]
        for i in range(L):
            p = pre + f"layers.{i}."
            lin = lambda h, n: h @ t[p + n + ".weight"].T + t[p + n + ".bias"]  # noqa: E731
            h = layer_norm(x, t[p + "self_attn_layer_norm.weight"], t[p + "self_attn_layer_norm.bias"])
            a = attention(lin(h, "self_attn.q_proj"), lin(h, "self_attn.k_proj"), lin(h, "self_attn.v_proj"), H, H, lambda z: z)
            x = x + lin(a, "self_attn.out_proj")
            h = layer_norm(x, t[p + "final_layer_norm.weight"], t[p + "final_layer_norm.bias"])
            x = x + lin(np.maximum(lin(h, "fc1"), 0), "fc2")
        x = layer_norm(x, t[pre + "final_layer_norm.weight"], t[pre + "final_layer_norm.bias"])
        return x @ t[pre + "embed_tokens.weight"].T

    m = load_model(str(tmp_path))
    assert m.arch == "opt"
    check(m, ref, tokens_batch())


# --------------------------------------------------------------------------- GPT-NeoX


@pytest.mark.parametrize("parallel", [True, False])
def test_hf_gpt_neox(tmp_path, parallel):
    pre = "gpt_neox."
    t = {pre + "embed_in.weight": rnd(V, D, scale=1.0), "embed_out.weight": rnd(V, D),
         pre + "final_layer_norm.weight": 1 + rnd(D, scale=0.1), pre + "final_layer_norm.bias": rnd(D, scale=0.1)}
    for i in range(L):
        p = pre + f"layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            t[p + n + ".weight"], t[p + n + ".bias"] = 1 + rnd(D, scale=0.1), rnd(D, scale=0.1)
        t[p + "attention.query_key_value.weight"], t[p + "attention.query_key_value.bias"] = rnd(3 * D, D), rnd(3 * D)
        t[p + "attention.dense.weight"], t[p + "attention.dense.bias"] = rnd(D, D), rnd(D)
        t[p + "mlp.dense_h_to_4h.weight"], t[p + "mlp.dense_h_to_4h.bias"] = rnd(F, D), rnd(F)
        t[p + "mlp.dense_4h_to_h.weight"], t[p + "mlp.dense_4h_to_h.bias"] = rnd(D, F), rnd(D)
        t[p + "attention.rotary_emb.inv_freq"] = np.ones(1, np.float32)
    write_hf(str(tmp_path), {"model_type": "gpt_neox", "hidden_size": D, "intermediate_size": F,
                             "num_hidden_layers": L, "num_attention_heads": H, "vocab_size": V,
                             "rotary_pct": 0.5, "rotary_emb_base": 10000, "max_position_embeddings": 64,
                             "layer_norm_eps": 1e-5, "use_parallel_residual": parallel, "hidden_act": "gelu",
                             "tie_word_embeddings": False}, t)

    def ref(tok):
        x = t[pre + "embed_in.weight"][tok].astype(np.float64)
        for i in range(L):
            p = pre + f"layers.{i}."
            lin = lambda h, n: h @ t[p + n + ".weight"].T + t[p + n + ".bias"]  # noqa: E731

            def attn(h):
                qkv = lin(h, "attention.query_key_value").reshape(len(tok), H, 3, HD)
                q, k, v = (qkv[:, :, j].reshape(len(tok), D) for j in range(3))
                return lin(attention(q, k, v, H, H, lambda z: rope_half(z, 10000.0, rot=HD // 2)), "attention.dense")

            mlp = lambda h: lin(gelu_erf(lin(h, "mlp.dense_h_to_4h")), "mlp.dense_4h_to_h")  # noqa: E731
            ln1 = layer_norm(x, t[p + "input_layernorm.weight"], t[p + "input_layernorm.bias"])
            if parallel:
                ln2 = layer_norm(x, t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"])
                x = x + attn(ln1) + mlp(ln2)
            else:
                x = x + attn(ln1)
                x = x + mlp(layer_norm(x, t[p + "post_attention_layernorm.weight"], t[p + "post_attention_layernorm.bias"]))
        x = layer_norm(x, t[pre + "final_layer_norm.weight"], t[pre + "final_layer_norm.bias"])
        return x @ t["embed_out.weight"].T

    m = load_model(str(tmp_path))
    assert m.arch == "gpt_neox" and m.config["rotary_dim"] == HD // 2
    check(m, ref, tokens_batch())


# --------------------------------------------------------------------------- llama2.c


def write_llama2c(path, w, shared=True, seq=32):
    header = struct.pack("<7i", D, F, L, H, KV, V if shared else -V, seq)
    parts = [w["emb"], w["rms_att"], w["wq"], w["wk"], w["wv"], w["wo"], w["rms_ffn"], w["w1"], w["w2"], w["w3"],
             w["rms_final"], np.zeros(seq * HD, np.float32)]
    if not shared:
        parts.append(w["wcls"])
    with open(path, "wb") as f:
        f.write(header)
        for a in parts:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def llama2c_weights():
    return {"emb": rnd(V, D, scale=1.0), "rms_att": 1 + rnd(L, D, scale=0.1), "wq": rnd(L, D, D),
            "wk": rnd(L, KV * HD, D), "wv": rnd(L, KV * HD, D), "wo": rnd(L, D, D),
            "rms_ffn": 1 + rnd(L, D, scale=0.1), "w1": rnd(L, F, D), "w2": rnd(L, D, F), "w3": rnd(L, F, D),
            "rms_final": 1 + rnd(D, scale=0.1), "wcls": rnd(V, D)}


def llama2c_ref(w, tok, shared=False):
    """float64 logits (T, vocab) of the llama2c_weights() model w for the token ids tok."""
    x = w["emb"][tok].astype(np.float64)
    for i in range(L):
        h = rms(x, w["rms_att"][i], 1e-5)
        a = attention(h @ w["wq"][i].T, h @ w["wk"][i].T, h @ w["wv"][i].T, H, KV, rope_complex)
        x = x + a @ w["wo"][i].T
        h = rms(x, w["rms_ffn"][i], 1e-5)
        x = x + (silu(h @ w["w1"][i].T) * (h @ w["w3"][i].T)) @ w["w2"][i].T
    return rms(x, w["rms_final"], 1e-5) @ (w["emb"] if shared else w["wcls"]).T


@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_roundtrip(tmp_path, shared):
    w = llama2c_weights()
    p = str(tmp_path / "m.bin")
    write_llama2c(p, w, shared)

    m = load_model(p)
    assert m.config["tie_embeddings"] is shared and m.tokenizer is None
    check(m, lambda tok: llama2c_ref(w, tok, shared), tokens_batch())


# --------------------------------------------------------------------------- GGUF


def _gguf_tokenizer(writer):
    import gguf

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["\u2581", "a", "b", "\u2581a", "\u2581b", "ab", "\u2581ab"]
    pieces = pieces[:V] if len(pieces) <= V else pieces
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -0.5]
    types = [2, 3, 3] + [6] * 256 + [1] * 7
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    return len(pieces)


def _permute(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_llama_roundtrip(tmp_path):
    import gguf

    t = llama_tensors(tied=False)
    vocab_tok = 266
    t["model.embed_tokens.weight"] = rnd(vocab_tok, D, scale=1.0)
    t["lm_head.weight"] = rnd(vocab_tok, D)
    q8 = gguf.GGMLQuantizationType.Q8_0
    path = str(tmp_path / "m.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(500.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HD)
    n = _gguf_tokenizer(w)
    assert n == vocab_tok
    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
    w.add_tensor("output.weight", t["lm_head.weight"])
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    for i in range(L):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(t[p + "self_attn.q_proj.weight"], H))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(t[p + "self_attn.k_proj.weight"], KV))
        w.add_tensor(f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", t[p + "mlp.up_proj.weight"])
        # one quantized tensor (Q8_0 blocks of 32 along rows of length F): the loader
        # dequantizes it and the baseline note says so
        down = t[p + "mlp.down_proj.weight"]
        qd = gguf.quants.quantize(down, q8)
        w.add_tensor(f"blk.{i}.ffn_down.weight", qd, raw_shape=qd.shape, raw_dtype=q8)
        t[p + "mlp.down_proj.weight"] = gguf.quants.dequantize(qd, q8).reshape(down.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    global V
    old_v, V = V, vocab_tok
    try:
        m = load_model(path)
        assert m.arch == "llama" and m.config["vocab_size"] == vocab_tok
        assert "Q8_0" in m.baseline_note and "dequantized" in m.baseline_note
        check(m, llama_ref(t, 500.0, 1e-5), tokens_batch())
    finally:
        V = old_v
    tok = m.tokenizer
    ids = tok.encode("ab ba", bos=True)
    assert ids[0] == 1 and tok.pieces[ids[1]] == "\u2581ab"
    assert tok.decode(ids) == "ab ba"
    assert tok.decode(tok.encode("é")) == "é"  # byte fallback


def test_gguf_gemma3_roundtrip(tmp_path):
    import gguf

    nl, hd, window, vocab = 6, 8, 3, 40
    theta, local = 1e6, 1e4
    t = {"embd": rnd(vocab, D, scale=1.0), "out_norm": 1 + rnd(D, scale=0.1)}
    path = str(tmp_path / "g.gguf")
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_block_count(nl)
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(1)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(window)
    w.add_tensor("token_embd.weight", t["embd"])
    w.add_tensor("output_norm.weight", t["out_norm"])
    names = {"attn_norm": (D,), "post_attention_norm": (D,), "ffn_norm": (D,), "post_ffw_norm": (D,),
             "attn_q_norm": (hd,), "attn_k_norm": (hd,), "attn_q": (H * hd, D), "attn_k": (hd, D),
             "attn_v": (hd, D), "attn_output": (D, H * hd), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    for i in range(nl):
        for n, shape in names.items():
            a = 1 + rnd(*shape, scale=0.1) if len(shape) == 1 else rnd(*shape)
            t[f"{i}.{n}"] = a
            w.add_tensor(f"blk.{i}.{n}.weight", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def ref(tok):
        x = t["embd"][tok].astype(np.float64) * np.sqrt(D)
        for i in range(nl):
            g = lambda n: t[f"{i}.{n}"]  # noqa: E731
            sliding = (i + 1) % 6 != 0
            base = local if sliding else theta
            h = rms(x, g("attn_norm"), 1e-6)
            q, k, v = h @ g("attn_q").T, h @ g("attn_k").T, h @ g("attn_v").T
            q = np.concatenate([rms(q[:, j * hd:(j + 1) * hd], g("attn_q_norm"), 1e-6) for j in range(H)], 1)
            k = rms(k, g("attn_k_norm"), 1e-6)
            a = attention(q, k, v, H, 1, lambda z: rope_half(z, base), scale=hd ** -0.5,
                          window=window if sliding else None)
            x = x + rms(a @ g("attn_output").T, g("post_attention_norm"), 1e-6)
            h = rms(x, g("ffn_norm"), 1e-6)
            m_ = (gelu_tanh(h @ g("ffn_gate").T) * (h @ g("ffn_up").T)) @ g("ffn_down").T
            x = x + rms(m_, g("post_ffw_norm"), 1e-6)
        return rms(x, t["out_norm"], 1e-6) @ t["embd"].T

    m = load_model(path)
    assert m.arch == "gemma3" and m.config["sliding_layers"] == [True] * 5 + [False]
    assert m.baseline_note == ""
    toks = RNG.integers(0, vocab, size=(2, 9))
    check(m, ref, toks)
    # incremental decoding with a cache matches the full forward also with the sliding window
    cache = {}
    a = m.forward(toks[:1, :5], cache=cache)
    b = m.forward(toks[:1, 5:], start_pos=5, cache=cache)
    np.testing.assert_allclose(np.concatenate([a, b], 1), m.forward(toks[:1]), rtol=1e-4, atol=1e-4)


def test_hf_gemma3_matches_gguf_convention(tmp_path):
    """HF Gemma 3 norms multiply by (1 + w); the loader folds the 1 in."""
    nl, hd = 2, 8
    t = {"model.embed_tokens.weight": rnd(V, D, scale=1.0), "model.norm.weight": rnd(D, scale=0.1)}
    for i in range(nl):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            t[p + n + ".weight"] = rnd(D, scale=0.1)
        t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"] = rnd(hd, scale=0.1), rnd(hd, scale=0.1)
        t[p + "self_attn.q_proj.weight"], t[p + "self_attn.k_proj.weight"] = rnd(H * hd, D), rnd(hd, D)
        t[p + "self_attn.v_proj.weight"], t[p + "self_attn.o_proj.weight"] = rnd(hd, D), rnd(D, H * hd)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"] = rnd(F, D), rnd(F, D), rnd(D, F)
    write_hf(str(tmp_path), {"model_type": "gemma3_text", "hidden_size": D, "intermediate_size": F,
                             "num_hidden_layers": nl, "num_attention_heads": H, "num_key_value_heads": 1,
                             "head_dim": hd, "vocab_size": V, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                             "rope_local_base_freq": 1e4, "sliding_window": 3, "query_pre_attn_scalar": hd,
                             "layer_types": ["sliding_attention", "full_attention"],
                             "hidden_activation": "gelu_pytorch_tanh"}, t)

    def ref(tok):
        x = t["model.embed_tokens.weight"][tok].astype(np.float64) * np.sqrt(D)
        n1 = lambda z, k: rms(z, 1 + t[k], 1e-6)  # noqa: E731
        for i in range(nl):
            p = f"model.layers.{i}."
            sliding = i == 0
            h = n1(x, p + "input_layernorm.weight")
            q, k, v = (h @ t[p + f"self_attn.{a}_proj.weight"].T for a in "qkv")
            q = np.concatenate([n1(q[:, j * hd:(j + 1) * hd], p + "self_attn.q_norm.weight") for j in range(H)], 1)
            k = n1(k, p + "self_attn.k_norm.weight")
            a = attention(q, k, v, H, 1, lambda z: rope_half(z, 1e4 if sliding else 1e6), scale=hd ** -0.5,
                          window=3 if sliding else None)
            x = x + n1(a @ t[p + "self_attn.o_proj.weight"].T, p + "post_attention_layernorm.weight")
            h = n1(x, p + "pre_feedforward_layernorm.weight")
            mm = (gelu_tanh(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
            x = x + n1(mm, p + "post_feedforward_layernorm.weight")
        return n1(x, "model.norm.weight") @ t["model.embed_tokens.weight"].T

    m = load_model(str(tmp_path))
    check(m, ref, RNG.integers(0, V, size=(2, 8)))


# --------------------------------------------------------------------------- quantized forward on a loaded model


def test_quantized_methods_on_hf_model(tmp_path):
    t = llama_tensors()
    write_hf(str(tmp_path), llama_config(), t)
    m = load_model(str(tmp_path))
    toks = tokens_batch()
    ref = m.forward(toks)
    for method in ("fp16", "llm.int8", "vectorwise", "rowwise", "absmax", "zeropoint"):
        q = m.quantize(method)
        got = q.forward(toks)
        assert got.shape == ref.shape and np.all(np.isfinite(got))
        rel = np.abs(got - ref).mean() / np.abs(ref).mean()
        assert rel < 0.1, (method, rel)
    q = m.quantize("llm.int8", threshold=0.5, calibration_tokens=toks)
    assert np.abs(q.forward(toks) - ref).mean() / np.abs(ref).mean() < 0.05


def test_tokenizer_override_gpt2_bpe(tmp_path):
    from data_paths import require

    folder = os.path.dirname(require("tokenizers", "gpt2_bpe", "encoder.json"))
    t = llama_tensors()
    write_hf(str(tmp_path), llama_config(), t)
    m = load_model(str(tmp_path), tokenizer=folder)
    ids = m.tokenizer.encode("Hello world, it's 2024!", bos=False)
    assert ids[:2] == [15496, 995]  # GPT-2's ids for "Hello" and " world"
    assert m.tokenizer.decode(ids) == "Hello world, it's 2024!"


def test_float16_overflow_warns(tmp_path):
    t = llama_tensors()
    t["model.layers.0.self_attn.o_proj.weight"] *= 1e6  # residual stream far beyond float16's 65504
    write_hf(str(tmp_path), llama_config(), t)
    with pytest.warns(RuntimeWarning, match="overflowed float16"):
        load_model(str(tmp_path), dtype="float16").forward(tokens_batch())
    assert np.all(np.isfinite(load_model(str(tmp_path)).forward(tokens_batch())))
