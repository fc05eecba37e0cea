"""Checkpoints as transformers 5 writes them: RoPE settings in ``rope_parameters`` (one dict, or
one per layer type for Gemma 3) as well as the older top-level ``rope_theta`` / ``rope_scaling``;
8-bit folders sharded so that a module's ``weight`` and ``SCB`` sit in different files; strict
config values; bitsandbytes' forward. Configs are written here in transformers-5 style; the
forwards are compared with float64 NumPy references whose RoPE frequencies are computed here,
independently, with the theta and scaling the config asks for."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import llmint8
from llmint8.models import load_model, save_quantized
from llmint8.models.loaders import validate_config
from test_models_formats import attention, gelu_tanh, rms, silu, write_hf

D, H, KV, HD, F, V, L, T = 32, 2, 1, 16, 48, 40, 2, 12
RNG = np.random.default_rng(77)
# the float path computes in float32 against a float64 reference (as test_models_formats)
LOGITS_TOL = 2e-4


def rnd(*shape, scale=0.3):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------- RoPE reference


def inv_freqs(theta, dim=HD, scaling=None):
    """float64 inverse frequencies of RoPE over ``dim`` dims, one at a time, with transformers'
    scaling schemes written out from their definitions."""
    out = []
    for i in range(0, dim, 2):
        f = 1.0 / theta ** (i / dim)
        kind = (scaling or {}).get("rope_type", "default")
        if kind == "linear":
            f /= scaling["factor"]
        elif kind == "llama3":
            fac, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
            old = scaling["original_max_position_embeddings"]
            wavelen = 2 * math.pi / f
            if wavelen > old / lo:         # long wavelengths: interpolated
                f /= fac
            elif wavelen >= old / hi:      # between: a smooth blend
                s = (old / wavelen - lo) / (hi - lo)
                f = (1 - s) * f / fac + s * f
        out.append(f)
    return np.array(out)


def rope_with(inv):
    """Hugging Face rotate_half RoPE on (T, hd) with the given inverse frequencies."""
    def rope(x):
        ang = np.arange(x.shape[0])[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
        h = x.shape[1] // 2
        return x * cos + np.concatenate([-x[:, h:], x[:, :h]], 1) * sin
    return rope


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def test_llama3_reference_covers_every_branch():
    # with theta 5e5 and 16 dims the wavelengths are 6.3, 32.6, 169, ...: kept, blended, divided
    f0, f = inv_freqs(5e5), inv_freqs(5e5, scaling=LLAMA3)
    assert f[0] == f0[0] and f0[1] / 8 < f[1] < f0[1] and np.allclose(f[2:], f0[2:] / 8)


# --------------------------------------------------------------------------- Llama family


def llama_tensors(bias=False):
    t = {"model.embed_tokens.weight": rnd(V, D, scale=1.0), "model.norm.weight": 1 + rnd(D, scale=0.1),
         "lm_head.weight": rnd(V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rnd(D, scale=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rnd(D, scale=0.1)
        # large q/k so that the RoPE angles matter to the attention weights
        t[p + "self_attn.q_proj.weight"] = rnd(H * HD, D, scale=1.0)
        t[p + "self_attn.k_proj.weight"] = rnd(KV * HD, D, scale=1.0)
        t[p + "self_attn.v_proj.weight"] = rnd(KV * HD, D)
        t[p + "self_attn.o_proj.weight"] = rnd(D, H * HD)
        if bias:
            for a, n in (("q", H), ("k", KV), ("v", KV)):
                t[p + f"self_attn.{a}_proj.bias"] = rnd(n * HD)
        t[p + "mlp.gate_proj.weight"] = rnd(F, D)
        t[p + "mlp.up_proj.weight"] = rnd(F, D)
        t[p + "mlp.down_proj.weight"] = rnd(D, F)
    return t


def llama_ref(t, inv, eps=1e-5):
    def run(tok):
        x = t["model.embed_tokens.weight"][tok].astype(np.float64)
        for i in range(L):
            p = f"model.layers.{i}."
            h = rms(x, t[p + "input_layernorm.weight"], eps)
            q, k, v = (h @ t[p + f"self_attn.{a}_proj.weight"].T + t.get(p + f"self_attn.{a}_proj.bias", 0)
                       for a in "qkv")
            x = x + attention(q, k, v, H, KV, rope_with(inv)) @ t[p + "self_attn.o_proj.weight"].T
            h = rms(x, t[p + "post_attention_layernorm.weight"], eps)
            x = x + (silu(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
        return rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T
    return run


def hf5_config(model_type="llama", **rope):
    """A config.json as transformers 5 writes it: RoPE only inside rope_parameters."""
    return {"model_type": model_type, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
            "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD, "vocab_size": V,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "hidden_act": "silu",
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "rope_parameters": rope,
            "transformers_version": "5.24.0"}


def check_logits(model, ref, tol=LOGITS_TOL):
    toks = RNG.integers(0, V, size=(2, T))
    got = model(toks)
    for b in range(toks.shape[0]):
        want = ref(toks[b])
        np.testing.assert_allclose(got[b], want, rtol=tol, atol=tol * np.abs(want).max())


CASES = {
    # name: (model_type, config keys, theta, scaling)
    "llama theta 1e5": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e5}), 1e5, None),
    "llama3 scaled": ("llama", dict(rope_parameters=dict(LLAMA3, rope_theta=5e5)), 5e5, LLAMA3),
    "qwen2 theta 1e6": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), 1e6, None),
    "mistral linear x2": ("mistral", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
                          1e6, {"rope_type": "linear", "factor": 2.0}),
    # transformers 4: top-level keys, "type" instead of "rope_type"
    "llama old linear": ("llama", dict(rope_parameters=None, rope_theta=2e4, rope_scaling={"type": "linear", "factor": 4.0}),
                         2e4, {"rope_type": "linear", "factor": 4.0}),
    "llama old llama3": ("llama", dict(rope_parameters=None, rope_theta=5e5, rope_scaling=LLAMA3), 5e5, LLAMA3),
    # both written (as llmint8's writer does): the values inside rope_parameters win
    "both conventions": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 3e4}, rope_theta=999.0),
                         3e4, None),
    # llama3 without original_max_position_embeddings: transformers takes max_position_embeddings
    "llama3 default length": ("llama", dict(rope_parameters={k: v for k, v in dict(LLAMA3, rope_theta=5e5).items()
                                                             if k != "original_max_position_embeddings"}),
                              5e5, dict(LLAMA3, original_max_position_embeddings=256)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_settings_llama_family(tmp_path, case):
    mt, keys, theta, scaling = CASES[case]
    t = llama_tensors(bias=mt == "qwen2")
    cfg = hf5_config(mt)
    cfg.update(keys)
    if cfg["rope_parameters"] is None:
        del cfg["rope_parameters"]
    write_hf(str(tmp_path), cfg, t)
    m = load_model(str(tmp_path))
    check_logits(m, llama_ref(t, inv_freqs(theta, scaling=scaling)))


def test_default_theta_differs_from_the_set_one(tmp_path):
    # the check above can tell theta 1e5 from the 1e4 a loader would fall back to
    t = llama_tensors()
    write_hf(str(tmp_path), hf5_config(rope_type="default", rope_theta=1e5), t)
    m = load_model(str(tmp_path))
    toks = RNG.integers(0, V, size=(1, T))
    wrong = llama_ref(t, inv_freqs(1e4))(toks[0])
    assert np.abs(m(toks)[0] - wrong).max() > 100 * LOGITS_TOL * np.abs(wrong).max()


@pytest.mark.parametrize("rope,msg", [
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, r"RoPE type 'yarn' is not supported; llmint8 implements 'default', 'linear', 'llama3'"),
    ({"rope_type": "dynamic", "factor": 2.0}, r"'dynamic' is not supported"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, r"'longrope' is not supported"),
    ({"rope_type": "linear", "rope_theta": 1e4}, r"rope_parameters\.factor is None; RoPE type 'linear' needs"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     r"high_freq_factor=1\.0 must exceed low_freq_factor=4\.0"),
    ({"rope_type": "linear", "factor": -2.0}, r"factor is -2\.0"),
])
def test_unimplemented_or_broken_rope_is_refused(tmp_path, rope, msg):
    write_hf(str(tmp_path), hf5_config(**rope), llama_tensors())
    with pytest.raises(ValueError, match=msg):
        load_model(str(tmp_path))


def test_old_rope_scaling_type_is_refused_too(tmp_path):
    cfg = hf5_config()
    del cfg["rope_parameters"]
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    write_hf(str(tmp_path), cfg, llama_tensors())
    with pytest.raises(ValueError, match=r"rope_scaling: RoPE type 'yarn' is not supported"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- Gemma 3, one RoPE per layer type


def gemma_tensors(nl):
    t = {"model.embed_tokens.weight": rnd(V, D, scale=1.0), "model.norm.weight": rnd(D, scale=0.1)}
    for i in range(nl):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            t[p + n + ".weight"] = rnd(D, scale=0.1)
        t[p + "self_attn.q_norm.weight"], t[p + "self_attn.k_norm.weight"] = rnd(HD, scale=0.1), rnd(HD, scale=0.1)
        t[p + "self_attn.q_proj.weight"], t[p + "self_attn.k_proj.weight"] = rnd(H * HD, D), rnd(KV * HD, D)
        t[p + "self_attn.v_proj.weight"], t[p + "self_attn.o_proj.weight"] = rnd(KV * HD, D), rnd(D, H * HD)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"], t[p + "mlp.down_proj.weight"] = rnd(F, D), rnd(F, D), rnd(D, F)
    return t


def gemma_ref(t, nl, sliding, inv_full, inv_local, window):
    def run(tok):
        x = t["model.embed_tokens.weight"][tok].astype(np.float64) * np.sqrt(D)
        n1 = lambda z, k: rms(z, 1 + t[k], 1e-6)  # noqa: E731
        for i in range(nl):
            p = f"model.layers.{i}."
            h = n1(x, p + "input_layernorm.weight")
            q, k, v = (h @ t[p + f"self_attn.{a}_proj.weight"].T for a in "qkv")
            q = np.concatenate([n1(q[:, j * HD:(j + 1) * HD], p + "self_attn.q_norm.weight") for j in range(H)], 1)
            k = n1(k, p + "self_attn.k_norm.weight")
            inv = inv_local if sliding[i] else inv_full
            a = attention(q, k, v, H, KV, rope_with(inv), scale=HD ** -0.5, window=window if sliding[i] else None)
            x = x + n1(a @ t[p + "self_attn.o_proj.weight"].T, p + "post_attention_layernorm.weight")
            h = n1(x, p + "pre_feedforward_layernorm.weight")
            mm = (gelu_tanh(h @ t[p + "mlp.gate_proj.weight"].T) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
            x = x + n1(mm, p + "post_feedforward_layernorm.weight")
        return n1(x, "model.norm.weight") @ t["model.embed_tokens.weight"].T
    return run


def gemma_config(nl, sliding, **rope_keys):
    return dict({"model_type": "gemma3_text", "hidden_size": D, "intermediate_size": F, "num_hidden_layers": nl,
                 "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD, "vocab_size": V,
                 "rms_norm_eps": 1e-6, "sliding_window": 4, "query_pre_attn_scalar": HD,
                 "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
                 "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 256}, **rope_keys)


GEMMA_CASES = {
    "per layer type": (dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        (1e6, {"rope_type": "linear", "factor": 8.0}), (1e4, None)),
    "scaled local layers": (dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 3e3}}),
        (5e5, None), (3e3, {"rope_type": "linear", "factor": 2.0})),
    "old convention": (dict(rope_theta=2e5, rope_local_base_freq=5e3, rope_scaling={"rope_type": "linear", "factor": 4.0}),
                       (2e5, {"rope_type": "linear", "factor": 4.0}), (5e3, None)),
    "defaults": (dict(), (1e6, None), (1e4, None)),
}


@pytest.mark.parametrize("case", sorted(GEMMA_CASES))
def test_rope_settings_gemma3(tmp_path, case):
    keys, (tg, sg), (tl, sl) = GEMMA_CASES[case]
    nl, sliding = 3, [True, False, True]
    t = gemma_tensors(nl)
    write_hf(str(tmp_path), gemma_config(nl, sliding, **keys), t)
    m = load_model(str(tmp_path))
    ref = gemma_ref(t, nl, sliding, inv_freqs(tg, scaling=sg), inv_freqs(tl, scaling=sl), window=4)
    check_logits(m, ref)


def test_gemma3_unknown_rope_layer_type_is_refused(tmp_path):
    nl, sliding = 2, [True, False]
    write_hf(str(tmp_path), gemma_config(nl, sliding, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
             gemma_tensors(nl))
    with pytest.raises(ValueError, match="expected one object per layer type"):
        load_model(str(tmp_path))
    write_hf(str(tmp_path), gemma_config(nl, sliding, rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 2.0}, "sliding_attention": {"rope_type": "default"}}),
        gemma_tensors(nl))
    with pytest.raises(ValueError, match=r"full_attention: RoPE type 'yarn' is not supported"):
        load_model(str(tmp_path))


def test_gpt_neox_partial_rotary_from_rope_parameters(tmp_path):
    t = {"gpt_neox.embed_in.weight": rnd(V, D), "gpt_neox.final_layer_norm.weight": 1 + rnd(D, scale=0.1),
         "gpt_neox.final_layer_norm.bias": rnd(D, scale=0.1), "embed_out.weight": rnd(V, D)}
    p = "gpt_neox.layers.0."
    for n in ("input_layernorm", "post_attention_layernorm"):
        t[p + n + ".weight"], t[p + n + ".bias"] = 1 + rnd(D, scale=0.1), rnd(D, scale=0.1)
    t[p + "attention.query_key_value.weight"], t[p + "attention.query_key_value.bias"] = rnd(3 * D, D), rnd(3 * D)
    t[p + "attention.dense.weight"], t[p + "attention.dense.bias"] = rnd(D, D), rnd(D)
    t[p + "mlp.dense_h_to_4h.weight"], t[p + "mlp.dense_h_to_4h.bias"] = rnd(F, D), rnd(F)
    t[p + "mlp.dense_4h_to_h.weight"], t[p + "mlp.dense_4h_to_h.bias"] = rnd(D, F), rnd(D)
    base = {"model_type": "gpt_neox", "hidden_size": D, "intermediate_size": F, "num_hidden_layers": 1,
            "num_attention_heads": H, "vocab_size": V, "hidden_act": "gelu", "max_position_embeddings": 64}
    write_hf(str(tmp_path / "new"), dict(base, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                                "partial_rotary_factor": 0.5}), t)
    write_hf(str(tmp_path / "old"), dict(base, rotary_emb_base=500.0, rotary_pct=0.5), t)
    new, old = load_model(str(tmp_path / "new")), load_model(str(tmp_path / "old"))
    assert new.config["rotary_dim"] == old.config["rotary_dim"] == HD // 2
    assert new.config["rope_theta"] == old.config["rope_theta"] == 500.0
    toks = RNG.integers(0, V, size=(1, 6))
    assert np.array_equal(new(toks), old(toks))
    # transformers' default when neither names it: a quarter of the head, theta 1e4
    write_hf(str(tmp_path / "dflt"), base, t)
    cfg = load_model(str(tmp_path / "dflt")).config
    assert cfg["rotary_dim"] == HD // 4 and cfg["rope_theta"] == 10000.0


# --------------------------------------------------------------------------- the writer


def test_bitsandbytes_writer_keeps_rope_settings(tmp_path):
    t = llama_tensors()
    write_hf(str(tmp_path / "f"), hf5_config(**dict(LLAMA3, rope_theta=5e5)), t)
    q = load_model(str(tmp_path / "f")).quantize("llm.int8")
    save_quantized(q, tmp_path / "b", format="bitsandbytes")
    hc = json.loads((tmp_path / "b" / "config.json").read_text())
    want = dict(LLAMA3, rope_theta=5e5)
    assert hc["rope_parameters"] == want                        # what transformers 5 reads
    assert hc["rope_theta"] == 5e5 and hc["rope_scaling"] == LLAMA3  # what transformers 4 reads
    assert isinstance(hc["rope_scaling"]["original_max_position_embeddings"], int)
    back = load_model(str(tmp_path / "b"))
    assert back.config["rope_theta"] == 5e5 and back.config["rope_scaling"] == LLAMA3
    toks = RNG.integers(0, V, size=(2, T))
    # the same int8 layers: identical logits
    assert np.array_equal(back(toks), q(toks))


def test_bitsandbytes_writer_default_rope(tmp_path):
    t = llama_tensors()
    write_hf(str(tmp_path / "f"), hf5_config(rope_type="default", rope_theta=1e5), t)
    save_quantized(load_model(str(tmp_path / "f")).quantize("llm.int8"), tmp_path / "b", format="bitsandbytes")
    hc = json.loads((tmp_path / "b" / "config.json").read_text())
    assert hc["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e5}
    assert hc["rope_theta"] == 1e5 and hc["rope_scaling"] is None


# --------------------------------------------------------------------------- sharded 8-bit folders


def bnb_folder(tmp_path, shards, t=None):
    """A bitsandbytes 8-bit Llama folder written from the documented layout, with its tensors
    dealt round-robin over ``shards`` files so that weight / SCB / weight_format of a module
    land in different shards."""
    t = llama_tensors() if t is None else t
    out = {}
    for name, a in t.items():
        if name.endswith("_proj.weight"):
            w16 = a.astype(np.float16).astype(np.float64)
            scb = np.abs(w16).max(axis=1)
            base = name[:-len(".weight")]
            out[name] = np.rint(w16 * 127.0 / scb[:, None]).astype(np.int8)
            out[base + ".SCB"] = scb.astype(np.float32)
            out[base + ".weight_format"] = np.array(0, dtype=np.uint8)
        else:
            out[name] = a
    cfg = hf5_config(rope_type="default", rope_theta=1e5)
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 6.0,
                                  "llm_int8_skip_modules": ["lm_head"]}
    os.makedirs(tmp_path, exist_ok=True)
    write_hf(str(tmp_path), cfg, out, shards=shards)
    return out


def test_sharded_bitsandbytes_folder_loads(tmp_path):
    t = llama_tensors()
    one = bnb_folder(tmp_path / "one", shards=1, t=t)
    bnb_folder(tmp_path / "many", shards=5, t=t)
    wm = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())["weight_map"]
    split = [k for k in wm if k.endswith(".SCB") and wm[k] != wm[k[:-4] + ".weight"]]
    assert len(split) >= 5  # the case that used to be refused
    a, b = load_model(str(tmp_path / "one")), load_model(str(tmp_path / "many"))
    layer = b.linears["layers.1.attn.v"].layer
    assert np.array_equal(layer.weight_int8, one["model.layers.1.self_attn.v_proj.weight"])
    assert np.array_equal(layer.weight_scale, one["model.layers.1.self_attn.v_proj.SCB"])
    toks = RNG.integers(0, V, size=(2, T))
    assert np.array_equal(a(toks), b(toks))


def test_sharded_index_must_match_the_shards(tmp_path):
    bnb_folder(tmp_path, shards=3)
    ip = tmp_path / "model.safetensors.index.json"
    idx = json.loads(ip.read_text())
    name = "model.layers.0.self_attn.q_proj.SCB"
    real = idx["weight_map"][name]
    idx["weight_map"][name] = next(v for v in idx["weight_map"].values() if v != real)
    ip.write_text(json.dumps(idx))
    with pytest.raises(ValueError, match=r"q_proj\.SCB' is listed in .* but found in"):
        load_model(str(tmp_path))
    # a tensor in two shards
    idx["weight_map"][name] = real
    ip.write_text(json.dumps(idx))
    other = tmp_path / idx["weight_map"]["model.norm.weight"]
    from safetensors.numpy import load_file

    dup = load_file(str(other))
    dup[name] = np.ones(H * HD, np.float32)
    save_file(dup, str(other))
    with pytest.raises(ValueError, match=r"q_proj\.SCB' is in both"):
        load_model(str(tmp_path))


def test_sharded_bitsandbytes_missing_scb_names_it(tmp_path):
    bnb_folder(tmp_path, shards=3)
    ip = tmp_path / "model.safetensors.index.json"
    idx = json.loads(ip.read_text())
    name = "model.layers.1.mlp.up_proj.SCB"
    shard = tmp_path / idx["weight_map"].pop(name)
    ip.write_text(json.dumps(idx))
    from safetensors.numpy import load_file

    d = load_file(str(shard))
    del d[name]
    save_file(d, str(shard))
    with pytest.raises(ValueError, match=r"up_proj\.SCB' row scales in any shard"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- strict configs (llmint8 format)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    write_hf(str(root / "f"), hf5_config(rope_type="default", rope_theta=1e5), llama_tensors())
    save_quantized(load_model(str(root / "f")).quantize("llm.int8"), root / "q")
    return root / "q"


@pytest.mark.parametrize("key,value,msg", [
    ("norm", "batch", r"norm='batch' .* expected one of 'rms', 'layer'"),
    ("norm", "RMS", r"norm='RMS'"),
    ("rope", "rotary", r"rope='rotary' .* expected one of null, 'half', 'interleaved'"),
    ("act", "tanh", r"act='tanh'"),
    ("gated", "yes", r"gated='yes' .* expected true or false"),
    ("tie_embeddings", "false", r"tie_embeddings='false' .* expected true or false"),
    ("qk_norm", 0, r"qk_norm=0 .* expected true or false"),
    ("sliding_layers", [True], r"sliding_layers=\[True\]"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 2.0}, r"RoPE type 'yarn' is not supported"),
    ("rope_local_scaling", {"rope_type": "linear"}, r"rope_local_scaling\.factor is None"),
    ("n_experts", 8, r"unknown key\(s\) 'n_experts'"),
])
def test_strict_llmint8_config(saved, tmp_path, key, value, msg):
    import shutil

    folder = tmp_path / "q"
    shutil.copytree(saved, folder)
    cp = folder / "config.json"
    root = json.loads(cp.read_text())
    root["llmint8"]["config"][key] = value
    cp.write_text(json.dumps(root))
    with pytest.raises(ValueError, match=msg):
        load_model(str(folder))


@pytest.mark.parametrize("key,value", [("tie_word_embeddings", "false"), ("tie_word_embeddings", 0),
                                       ("use_sliding_window", "yes")])
def test_strict_hf_booleans(tmp_path, key, value):
    cfg = hf5_config(rope_type="default", rope_theta=1e5)
    cfg[key] = value
    write_hf(str(tmp_path), cfg, llama_tensors())
    with pytest.raises(ValueError, match=f"{key}={value!r} is not a boolean"):
        load_model(str(tmp_path))


def test_validate_config_accepts_what_loaders_build(saved):
    root = json.loads((saved / "config.json").read_text())
    validate_config("x", root["llmint8"]["config"])  # does not raise


# --------------------------------------------------------------------------- tokenizer of a bitsandbytes save


def test_bitsandbytes_save_of_stories_keeps_its_tokenizer(tmp_path):
    from data_paths import require

    require("models", "stories260K", "stories260K.bin")
    m = load_model("stories260K")
    save_quantized(m.quantize("llm.int8"), tmp_path / "b", format="bitsandbytes")
    assert (tmp_path / "b" / "llmint8_tokenizer.json").exists()
    back = load_model(str(tmp_path / "b"))
    assert back.tokenizer is not None
    text = "Once upon a time, Lily saw a big dog."
    assert back.tokenizer.encode(text, bos=True) == m.tokenizer.encode(text, bos=True)
    ids = m.tokenizer.encode(text, bos=False)
    assert back.tokenizer.decode(ids) == m.tokenizer.decode(ids)


# --------------------------------------------------------------------------- bitsandbytes' forward


def ref_bnb_forward(x, wq, scb, bias, thr):
    """bitsandbytes' LLM.int8() forward in float64 from its definition: x rounded to fp16; the
    elements with |x| >= thr zeroed before each row's absmax; int8 codes of the other columns;
    the outlier columns of x against the dequantized int8 weight."""
    x16 = x.astype(np.float16).astype(np.float64)
    big = np.abs(x16) >= thr
    cols = np.flatnonzero(big.any(axis=0))
    z = np.where(big, 0.0, x16)
    s = np.abs(z).max(axis=1)
    codes = np.where(s[:, None] > 0, np.rint(z * 127.0 / np.where(s > 0, s, 1)[:, None]), 0)
    codes[:, cols] = 0
    w = wq.astype(np.float64) * scb[:, None] / 127.0
    y = (codes @ wq.T.astype(np.float64)) * s[:, None] * scb[None, :] / 127.0 ** 2
    y += x.astype(np.float64)[:, cols] @ w[:, cols].T
    if bias is not None:
        y += bias
    return y, codes, s


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_bitsandbytes_forward_matches_its_definition(dtype):
    from llmint8.compat import bitsandbytes_forward, quantize_rows_bitsandbytes

    rng = np.random.default_rng(5)
    k, n, m = 96, 40, 9
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 0.5).astype(dtype)
    x[:, 5] = np.clip(rng.standard_normal(m) * 3, -5.5, 5.5)  # large values below threshold ...
    x[3, 5] = 9.0   # ... in an outlier column: they set bitsandbytes' row scales, not llmint8's
    x[0, 5] = 4.0
    x[2, 17] = 9.0  # one element above threshold in an otherwise small column
    x[4] = 0        # an all-zero row: scale 0, codes 0
    layer = llmint8.Int8Linear.from_float(w, b, threshold=6.0)
    wq, ws = layer.weight_int8, layer.weight_scale
    ref, rcodes, rs = ref_bnb_forward(x, wq, ws, b, 6.0)
    codes, s, cols = quantize_rows_bitsandbytes(x.astype(np.float16), 6.0)
    assert np.array_equal(s, rs.astype(np.float32)) and cols.tolist() == [5, 17]
    # the same codes, except (rarely, by one) where x * 127 / s is a .5 tie to float32 rounding
    diff = codes != rcodes
    assert np.mean(diff) < 0.01 and np.abs(codes - rcodes.astype(int)).max() <= 1
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.abs(x.astype(np.float16).astype(np.float64) * 127 / rs[:, None]) % 1
    assert np.all(np.abs(frac[diff] - 0.5) < 1e-5)
    y = bitsandbytes_forward(layer, x)
    assert y.dtype == dtype and y.shape == (m, n)
    # float32: float32 rounding and those rare ties; float16: the fp16 output's rounding
    tol = 5e-5 if dtype == np.float32 else 5e-4
    assert llmint8.relative_error(y, ref) < tol
    # llmint8's own forward scales those rows without column 5: measurably another result
    own = layer(x).astype(np.float64)
    assert llmint8.relative_error(own, ref) > 4 * tol
    assert s[0] == 4.0 > np.abs(np.delete(x[0], 5)).max()


def test_bitsandbytes_forward_is_closer_to_exact_only_when_llmint8s_is_not():
    """On rows whose absmax lies in an outlier column, bitsandbytes' coarser scale costs accuracy."""
    from llmint8.compat import bitsandbytes_forward

    rng = np.random.default_rng(9)
    k, n, m = 256, 64, 32
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    x = rng.standard_normal((m, k)).astype(np.float32) * 0.3
    x[:, 7] = rng.standard_normal(m) * 3.0   # large but mostly below 6: sets bitsandbytes' row scales
    x[0, 7] = 20.0                           # ... and makes column 7 an outlier column
    layer = llmint8.Int8Linear.from_float(w, threshold=6.0)
    exact = x.astype(np.float64) @ layer.dequantized_weight().astype(np.float64).T
    e_bnb = llmint8.relative_error(bitsandbytes_forward(layer, x), exact)
    e_l8 = llmint8.relative_error(layer(x), exact)
    assert e_bnb > 1.5 * e_l8


def test_load_model_row_scale(tmp_path):
    bnb_folder(tmp_path / "b", shards=2)
    own = load_model(str(tmp_path / "b"))
    as_bnb = load_model(str(tmp_path / "b"), row_scale="bitsandbytes")
    assert as_bnb.linears["layers.0.attn.q"].layer is not None
    from llmint8.compat import bitsandbytes_forward

    x = RNG.standard_normal((5, D)).astype(np.float32) * 3
    lq = own.linears["layers.0.attn.q"].layer
    np.testing.assert_array_equal(as_bnb.linears["layers.0.attn.q"](x), bitsandbytes_forward(lq, x))
    toks = RNG.integers(0, V, size=(1, T))
    assert np.isfinite(as_bnb(toks)).all()
    with pytest.raises(ValueError, match="row_scale must be one of 'llmint8', 'bitsandbytes'"):
        load_model(str(tmp_path / "b"), row_scale="bnb")
    write_hf(str(tmp_path / "f"), hf5_config(rope_type="default", rope_theta=1e5), llama_tensors())
    with pytest.raises(ValueError, match="applies to quantized folders"):
        load_model(str(tmp_path / "f"), row_scale="bitsandbytes")
    # a saved llmint8 model with the writer's outlier columns: still loads and runs
    q = load_model(str(tmp_path / "f")).quantize("llm.int8", threshold=0.5, calibration_tokens=toks)
    save_quantized(q, tmp_path / "q")
    m = load_model(str(tmp_path / "q"), row_scale="bitsandbytes")
    assert np.isfinite(m(toks)).all() and llmint8.relative_error(m(toks), q(toks)) < 0.05


# --------------------------------------------------------------------------- GGUF RoPE scaling


def write_gguf_llama(path, t, theta, scaling_type=None, factor=None, rope_freqs=False):
    import gguf

    from test_models_formats import _permute

    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(L)
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HD)
    if scaling_type is not None:
        w.add_string("llama.rope.scaling.type", scaling_type)
    if factor is not None:
        w.add_float32("llama.rope.scaling.factor", factor)
    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
    w.add_tensor("output.weight", t["lm_head.weight"])
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    if rope_freqs:
        w.add_tensor("rope_freqs.weight", np.ones(HD // 2, np.float32))
    for i in range(L):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(t[p + "self_attn.q_proj.weight"], H))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(t[p + "self_attn.k_proj.weight"], KV))
        for a, b in (("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
                     ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            w.add_tensor(f"blk.{i}.{a}.weight", t[p + b + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_rope_scaling(tmp_path):
    t = llama_tensors()
    write_gguf_llama(str(tmp_path / "lin.gguf"), t, 2e4, "linear", 4.0)
    check_logits(load_model(str(tmp_path / "lin.gguf")), llama_ref(t, inv_freqs(2e4, scaling={"rope_type": "linear", "factor": 4.0})))
    write_gguf_llama(str(tmp_path / "yarn.gguf"), t, 2e4, "yarn", 4.0)
    with pytest.raises(ValueError, match=r"llama\.rope\.scaling\.type 'yarn' is not supported"):
        load_model(str(tmp_path / "yarn.gguf"))
    write_gguf_llama(str(tmp_path / "ff.gguf"), t, 5e5, rope_freqs=True)
    with pytest.raises(ValueError, match=r"rope_freqs\.weight .* is not supported"):
        load_model(str(tmp_path / "ff.gguf"))
