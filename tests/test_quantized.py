"""Saving and loading quantized models: llmint8's format (bit-identical round trip, in a fresh
process), Int8Linear.to_dict/from_dict, and Hugging Face + bitsandbytes 8-bit checkpoints (one
written here by hand from the documented layout, and llmint8's own writer)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import llmint8
from llmint8.models import load_model, save_quantized
from llmint8.models.loaders import read_safetensors_header
from llmint8.models.quantized import FORMAT_NAME
from data_paths import REPO_ROOT, require

# Model-level tolerance for the bitsandbytes layouts, as a normalized RMS error of the logits
# (||a - b|| / ||b||). The int8 weights are checked exactly, layer by layer; the logits cannot be
# bit-identical because q/k rows are stored in Hugging Face order (RoPE on rotated halves instead
# of llama2.c's pairs) and bitsandbytes quantizes the fp16 weight: the float differences this
# makes flip some int8 roundings of the activations, a difference of the size of LLM.int8()'s
# own quantization noise (measured 0.7% on stories260K; int8 vs float is 1%). Wrong mappings
# measured: q/k rows left in llama2.c order 16%, SCB read as absmax/127 280%.
BNB_LOGIT_NRMSE = 0.02


def nrmse(a, b):
    """Normalized RMS error ||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def _stories():
    require("models", "stories260K", "stories260K.bin")
    return load_model("stories260K")


@pytest.fixture(scope="module")
def stories():
    return _stories()


@pytest.fixture(scope="module")
def calib(stories):
    p = require("text", "tinyshakespeare.txt")
    with open(p, encoding="utf-8") as f:
        return np.array(stories.tokenizer.encode(f.read(4000), bos=True)[:600])


def _tokens(stories):
    rng = np.random.default_rng(0)
    return rng.integers(0, stories.config["vocab_size"], size=(2, 24))


def _logits_in_fresh_process(folder, tokens, tmp_path):
    tp, op = tmp_path / "tokens.npy", tmp_path / "logits.npy"
    np.save(tp, tokens)
    code = ("import sys, numpy as np; from llmint8.models import load_model; "
            "m = load_model(sys.argv[1]); np.save(sys.argv[3], m(np.load(sys.argv[2])))")
    r = subprocess.run([sys.executable, "-c", code, str(folder), str(tp), str(op)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return np.load(op)


# --------------------------------------------------------------------------- llmint8 format


def test_roundtrip_stories_bit_identical_in_fresh_process(stories, calib, tmp_path):
    q = stories.quantize("llm.int8", threshold=6.0, calibration_tokens=calib)
    n_known = sum(len(layer.layer.outlier_columns) for layer in q.linears.values())
    assert n_known > 0, "calibration should fix some outlier columns, so that they are saved too"
    folder = tmp_path / "q"
    save_quantized(q, folder)
    toks = _tokens(stories)
    want = q(toks)
    got = _logits_in_fresh_process(folder, toks, tmp_path)
    assert got.dtype == want.dtype and np.array_equal(got, want)

    # provenance and the layers as saved
    meta = json.loads((folder / "config.json").read_text())["llmint8"]
    assert meta["format"] == FORMAT_NAME and meta["method"] == "llm.int8" and meta["threshold"] == 6.0
    assert meta["calibration_tokens"] == calib.size and meta["llmint8_version"] == llmint8.__version__
    assert meta["source"] == os.path.abspath(stories.source) and len(meta["source_sha256"]) == 64
    m2 = load_model(str(folder))
    assert m2.method == "llm.int8" and m2.threshold == 6.0 and m2.calibration_tokens == calib.size
    for n in q.linear_names:
        a, b = q.linears[n].layer.to_dict(), m2.linears[n].layer.to_dict()
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert m2.tokenizer.encode("Once upon a time, a cat") == stories.tokenizer.encode("Once upon a time, a cat")
    assert m2.n_params == stories.n_params

    # size: the linear layers take about half their fp16 bytes (int8 + per-row scales + the known
    # fp16 outlier columns); the other weights are stored exactly as held (float32 here)
    lin_params = sum(stories.weights[n + ".weight"].size for n in stories.linear_names)
    other = sum(a.nbytes for k, a in stories.weights.items()
                if k.rsplit(".", 1)[0] not in q.linear_names and k != "lm_head.weight")
    held = sum(layer.layer.out_features * 4 + layer.layer.out_features * len(layer.layer.outlier_columns) * 2
               for layer in q.linears.values())
    size = (folder / "model.safetensors").stat().st_size
    assert size <= lin_params + held + other + 16384            # 16 KiB: header
    assert lin_params + held <= 0.5 * (2 * lin_params) * 1.1   # int8 part ~ half of fp16


def test_save_rejects_float_model_and_existing_folder(stories, tmp_path):
    with pytest.raises(ValueError, match="quantize"):
        save_quantized(stories, tmp_path / "x")
    q = stories.quantize("llm.int8")
    save_quantized(q, tmp_path / "x")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(q, tmp_path / "x")
    save_quantized(q, tmp_path / "x", overwrite=True)
    m = load_model(str(tmp_path / "x"))
    with pytest.raises(ValueError, match="already quantized"):
        m.quantize("fp16")
    with pytest.raises(ValueError, match="format"):
        save_quantized(q, tmp_path / "y", format="gptq")


def test_roundtrip_float16_activations_and_vectorwise(stories, tmp_path):
    q = stories.quantize("vectorwise")
    save_quantized(q, tmp_path / "v")
    m = load_model(str(tmp_path / "v"), dtype="float16")
    toks = _tokens(stories)
    ref = stories.quantize("vectorwise")
    ref.dtype = np.dtype(np.float16)
    assert m.method == "vectorwise" and np.array_equal(m(toks), ref(toks))


def _cached_smollm2():
    from llmint8.models import zoo

    name = zoo.canonical_name("smollm2-135m")
    p = os.path.join(zoo.cache_dir(), name, zoo.ZOO[name].filename)
    if not os.path.exists(p):
        pytest.skip("smollm2-135m is not in the zoo cache (python -c \"from llmint8.models import zoo; "
                    "zoo.fetch('smollm2-135m')\")")
    return p


def test_roundtrip_smollm2_when_cached(tmp_path):
    p = _cached_smollm2()
    m = load_model(p)
    q = m.quantize("llm.int8")
    save_quantized(q, tmp_path / "s")
    toks = np.array([[1, 504, 3458, 282, 253, 1345, 30, 2]])
    got = _logits_in_fresh_process(tmp_path / "s", toks, tmp_path)
    assert np.array_equal(got, q(toks))
    # the linear layers in about half their fp16 bytes; the tied embedding (dequantized from the
    # GGUF file, not exactly fp16/bf16) is kept as float32 so that the logits stay bit-identical
    lin = sum(layer.out_features * layer.in_features for layer in q.linears.values())
    scales = sum(layer.out_features * 4 for layer in q.linears.values())
    other = sum(a.nbytes for k, a in m.weights.items()
                if k.rsplit(".", 1)[0] not in q.linear_names and k != "lm_head.weight")
    size = (tmp_path / "s" / "model.safetensors").stat().st_size
    assert lin + scales <= 0.51 * (2 * lin)
    assert size <= lin + scales + other + 65536


# --------------------------------------------------------------------------- one layer


def test_int8linear_to_dict_from_dict():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    b = rng.standard_normal(24).astype(np.float32)
    layer = llmint8.Int8Linear.from_float(w, bias=b, threshold=3.0, outlier_columns=[33, 2, 17])
    d = layer.to_dict()
    spec = {"weight_int8": (np.int8, (24, 40)), "weight_scale": (np.float32, (24,)),
            "outlier_columns": (np.int32, (3,)), "outlier_weight": (np.float16, (24, 3)),
            "threshold": (np.float32, ()), "bias": (np.float32, (24,))}
    assert set(d) == set(spec)
    for k, (dt, shape) in spec.items():
        assert d[k].dtype == dt and d[k].shape == shape, k
    assert d["outlier_columns"].tolist() == [2, 17, 33]
    assert np.array_equal(d["outlier_weight"], w[:, [2, 17, 33]].astype(np.float16))
    assert np.all(d["weight_int8"][:, [2, 17, 33]] == 0)
    x = rng.standard_normal((5, 40)).astype(np.float32) * 4
    back = llmint8.Int8Linear.from_dict(d)
    assert np.array_equal(back(x), layer(x)) and back.threshold == 3.0
    assert np.array_equal(pickle.loads(pickle.dumps(layer))(x), layer(x))  # pickling stays
    nob = {k: v for k, v in d.items() if k != "bias"}
    assert not llmint8.Int8Linear.from_dict(nob).has_bias
    with pytest.raises(ValueError, match="missing key.*weight_scale"):
        llmint8.Int8Linear.from_dict({k: v for k, v in d.items() if k != "weight_scale"})
    with pytest.raises(ValueError, match="strictly increasing"):
        llmint8.Int8Linear.from_dict(dict(d, outlier_columns=np.array([17, 2, 33], np.int32)))


# --------------------------------------------------------------------------- bitsandbytes format


_HF = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
       "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
       "mlp.down": "mlp.down_proj"}


def _interleaved_to_half(a, n_heads):
    # llama2.c rotates pairs (2i, 2i+1); Hugging Face Llama rotates (i, i + hd/2): reorder rows
    out = a.shape[0]
    return a.reshape((n_heads, out // n_heads // 2, 2) + a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _hf_config(cfg, threshold):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg["dim"],
            "intermediate_size": cfg["hidden_dim"], "num_hidden_layers": cfg["n_layers"],
            "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg["n_kv_heads"],
            "vocab_size": cfg["vocab_size"], "max_position_embeddings": cfg["max_seq_len"],
            "rms_norm_eps": cfg["norm_eps"], "rope_theta": cfg["rope_theta"], "hidden_act": "silu",
            "tie_word_embeddings": True, "torch_dtype": "float32",
            "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
                                    "llm_int8_threshold": threshold, "llm_int8_skip_modules": None,
                                    "llm_int8_has_fp16_weight": False,
                                    "llm_int8_enable_fp32_cpu_offload": False}}


def write_bnb_by_hand(model, folder, threshold=6.0):
    """A bitsandbytes 8-bit checkpoint as transformers saves it, from the documented layout:
    per linear module int8 ``weight`` (out, in) = round(w16 * 127 / SCB) of the fp16 weight,
    float32 ``SCB`` (out,) = row absmax of the fp16 weight, uint8 scalar ``weight_format`` = 0
    ("row"); embeddings and norms in ``torch_dtype`` (float32 here, as the float model holds them)."""
    cfg = model.config
    t = {"model.embed_tokens.weight": model.weights["embed"].astype(np.float32),
         "model.norm.weight": model.weights["final_norm.weight"].astype(np.float32)}
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = model.weights[f"layers.{i}.attn_norm.weight"].astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = model.weights[f"layers.{i}.ffn_norm.weight"].astype(np.float32)
        for ours, theirs in _HF.items():
            w16 = model.weights[f"layers.{i}.{ours}.weight"].astype(np.float16).astype(np.float64)
            if ours in ("attn.q", "attn.k"):
                w16 = _interleaved_to_half(w16, cfg["n_heads"] if ours == "attn.q" else cfg["n_kv_heads"])
            scb = np.abs(w16).max(axis=1)
            q = np.rint(w16 * 127.0 / scb[:, None]).astype(np.int8)
            t[p + theirs + ".weight"] = np.ascontiguousarray(q)
            t[p + theirs + ".SCB"] = scb.astype(np.float32)
            t[p + theirs + ".weight_format"] = np.array(0, dtype=np.uint8)
    os.makedirs(folder, exist_ok=True)
    save_file(t, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(_hf_config(cfg, threshold), f)
    return t


def test_bitsandbytes_checkpoint_written_by_hand_loads(stories, tmp_path):
    t = write_bnb_by_hand(stories, tmp_path / "bnb", threshold=6.0)
    m = load_model(str(tmp_path / "bnb"))
    assert m.method == "llm.int8" and m.threshold == 6.0
    layer = m.linears["layers.2.mlp.down"].layer
    assert np.array_equal(layer.weight_int8, t["model.layers.2.mlp.down_proj.weight"])
    assert np.array_equal(layer.weight_scale, t["model.layers.2.mlp.down_proj.SCB"])
    assert len(layer.outlier_columns) == 0 and layer.threshold == 6.0
    # every layer: the checkpoint's int8 rows and SCB, exactly
    for i in range(stories.config["n_layers"]):
        for ours, theirs in _HF.items():
            layer = m.linears[f"layers.{i}.{ours}"].layer
            p = f"model.layers.{i}.{theirs}"
            assert np.array_equal(layer.weight_int8, t[p + ".weight"]) and np.array_equal(layer.weight_scale, t[p + ".SCB"])
    toks = _tokens(stories)
    ours = stories.quantize("llm.int8", threshold=6.0)(toks)
    got = m(toks)
    assert nrmse(got, ours) <= BNB_LOGIT_NRMSE
    assert nrmse(got, ours) <= 1.5 * nrmse(ours, stories(toks))  # within LLM.int8()'s own noise


def test_bitsandbytes_writer_keys_dtypes_shapes(stories, tmp_path):
    q = stories.quantize("llm.int8", threshold=5.0)
    save_quantized(q, tmp_path / "w", format="bitsandbytes")
    hc = json.loads((tmp_path / "w" / "config.json").read_text())
    qc = hc["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] is True and qc["llm_int8_threshold"] == 5.0
    assert hc["model_type"] == "llama" and hc["tie_word_embeddings"] is True
    header, _ = read_safetensors_header(str(tmp_path / "w" / "model.safetensors"))
    header.pop("__metadata__")
    cfg = stories.config
    d, F, V = cfg["dim"], cfg["hidden_dim"], cfg["vocab_size"]
    qo, kvo = cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"]
    shapes = {"self_attn.q_proj": (qo, d), "self_attn.k_proj": (kvo, d), "self_attn.v_proj": (kvo, d),
              "self_attn.o_proj": (d, qo), "mlp.gate_proj": (F, d), "mlp.up_proj": (F, d), "mlp.down_proj": (d, F)}
    want = {"model.embed_tokens.weight": ("F32", (V, d)), "model.norm.weight": ("F32", (d,))}
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        want[p + "input_layernorm.weight"] = ("F32", (d,))
        want[p + "post_attention_layernorm.weight"] = ("F32", (d,))
        for mod, shape in shapes.items():
            want[p + mod + ".weight"] = ("I8", shape)
            want[p + mod + ".SCB"] = ("F32", shape[:1])
            want[p + mod + ".weight_format"] = ("U8", ())
    got = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    assert got == want
    # values: the row-major int8 weights and absmax scales of the saved layers (q/k in HF row order)
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "w" / "model.safetensors"))
    assert int(t["model.layers.0.mlp.up_proj.weight_format"]) == 0
    assert np.array_equal(t["model.layers.0.mlp.up_proj.weight"], q.linears["layers.0.mlp.up"].layer.weight_int8)
    lq = q.linears["layers.1.attn.q"].layer
    assert np.array_equal(t["model.layers.1.self_attn.q_proj.SCB"], _interleaved_to_half(lq.weight_scale, cfg["n_heads"]))
    # and it loads back as the same LLM.int8() model
    m = load_model(str(tmp_path / "w"))
    toks = _tokens(stories)
    assert nrmse(m(toks), q(toks)) <= BNB_LOGIT_NRMSE


def test_bitsandbytes_writer_requantizes_known_outliers(stories, calib, tmp_path):
    q = stories.quantize("llm.int8", threshold=6.0, calibration_tokens=calib)
    with pytest.warns(RuntimeWarning, match="re-quantized"):
        save_quantized(q, tmp_path / "w", format="bitsandbytes")
    m = load_model(str(tmp_path / "w"))
    toks = _tokens(stories)
    assert nrmse(m(toks), q(toks)) <= BNB_LOGIT_NRMSE


# --------------------------------------------------------------------------- command line


def test_cli_quantize_then_perplexity(stories, tmp_path, capsys):
    from llmint8.__main__ import main

    text = require("text", "tinyshakespeare.txt")
    out = tmp_path / "cli"
    assert main(["quantize", "--model", "stories260K", "--out", str(out), "--calibration-text", text,
                 "--calibration-tokens", "300", "--no-progress"]) == 0
    assert "300 calibration tokens" in capsys.readouterr().out
    assert main(["quantize", "--model", "stories260K", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["quantize", "--model", "stories260K", "--out", str(tmp_path / "b"), "--format", "bitsandbytes",
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    capsys.readouterr()
    assert main(["perplexity", "--model", str(out), "--text", text, "--max-tokens", "200", "--context", "64",
                 "--stride", "64", "--no-progress"]) == 0
    o = capsys.readouterr().out
    assert "already quantized" in o and "llm.int8" in o
    assert main(["quantize", "--model", "stories260K", "--out", str(tmp_path / "z"), "--threshold", "nan"]) == 2


def test_cli_analyze_accepts_saved_folder(stories, tmp_path, capsys):
    from llmint8.__main__ import main

    text = require("text", "tinyshakespeare.txt")
    save_quantized(stories.quantize("llm.int8"), tmp_path / "q")
    assert main(["analyze", "--model", str(tmp_path / "q"), "--text", text, "--tokens", "64", "--no-zeroing",
                 "--out", str(tmp_path / "an"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "an" / "report.json").read_text())
    assert report["n_tokens"] == 64 and report["model"]["name"] == "stories260K"
    assert np.isfinite(report["perplexity"]["ppl"])


def test_roundtrip_of_a_fused_model_is_bit_identical(stories, tmp_path):
    # without calibration q/k/v and gate/up are fused into one layer each; saving writes each
    # part as its own layer (its rows), and the loaded model computes the same logits
    q = stories.quantize("llm.int8", threshold=6.0)
    assert q._fused, "expected fused layers without calibration"
    save_quantized(q, tmp_path / "f")
    toks = np.array([[1, 403, 407, 261, 378, 2]])
    assert np.array_equal(_logits_in_fresh_process(tmp_path / "f", toks, tmp_path), q(toks))
