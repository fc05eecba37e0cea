"""Hostile and broken checkpoint files must raise a clear ValueError before any large allocation."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmint8.models import load_model
from test_models_formats import (D, F, H, KV, L, V, llama2c_weights, llama_config, llama_tensors, write_hf,
                                 write_llama2c)


# --------------------------------------------------------------------------- llama2.c


@pytest.fixture
def l2c(tmp_path):
    p = tmp_path / "m.bin"
    write_llama2c(str(p), llama2c_weights())
    return p


def test_llama2c_truncated(l2c):
    data = l2c.read_bytes()
    l2c.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"truncated.*implies \d+ bytes, the file has \d+"):
        load_model(str(l2c))
    l2c.write_bytes(data[:10])
    with pytest.raises(ValueError, match="shorter than the 28-byte"):
        load_model(str(l2c))


def test_llama2c_trailing_bytes(l2c):
    l2c.write_bytes(l2c.read_bytes() + b"\0" * 8)
    with pytest.raises(ValueError, match="longer than expected"):
        load_model(str(l2c))


@pytest.mark.parametrize("field,value,msg", [
    (0, -64, "dim=-64"), (2, 0, "n_layers=0"), (5, 2**31 - 1, "vocab_size"), (6, 2**30, "seq_len"),
    (1, 2**30, "hidden_dim"), (4, 3, "not a multiple"),
])
def test_llama2c_absurd_header(l2c, field, value, msg):
    data = bytearray(l2c.read_bytes())
    vals = list(struct.unpack_from("<7i", data, 0))
    vals[field] = value
    struct.pack_into("<7i", data, 0, *vals)
    l2c.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=msg):
        load_model(str(l2c))


def test_llama2c_huge_sizes_are_checked_against_file_size(l2c):
    # plausible-looking but large header: must fail on the size check, not allocate gigabytes
    data = bytearray(l2c.read_bytes())
    struct.pack_into("<7i", data, 0, 4096, 11008, 32, 32, 32, 32000, 2048)
    l2c.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated"):
        load_model(str(l2c))


def test_llama2c_version1_magic(l2c):
    data = bytearray(l2c.read_bytes())
    struct.pack_into("<I", data, 0, 0x616B3432)
    l2c.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="version 1/2"):
        load_model(str(l2c))


# --------------------------------------------------------------------------- safetensors


@pytest.fixture
def hf(tmp_path):
    write_hf(str(tmp_path), llama_config(), llama_tensors())
    return tmp_path


def test_safetensors_truncated(hf):
    p = hf / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-64])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(str(hf))


def test_safetensors_absurd_header_length(hf):
    p = hf / "model.safetensors"
    data = bytearray(p.read_bytes())
    struct.pack_into("<Q", data, 0, 2**62)
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="header length .* exceeds the file size"):
        load_model(str(hf))


def test_safetensors_not_json(hf):
    p = hf / "model.safetensors"
    p.write_bytes(struct.pack("<Q", 16) + b"GGUF" + b"\x00" * 60)
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(hf))


def test_safetensors_offsets_past_end(hf):
    p = hf / "model.safetensors"
    header = json.dumps({"x": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ValueError, match="needs 4000000 bytes"):
        load_model(str(hf))


def test_shape_disagrees_with_config(tmp_path):
    t = llama_tensors()
    t["model.layers.1.mlp.down_proj.weight"] = np.zeros((D, F + 1), np.float32)
    write_hf(str(tmp_path), llama_config(), t)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down\.weight.*\(16, 33\).*\(16, 32\)"):
        load_model(str(tmp_path))


def test_config_disagrees_with_shapes(tmp_path):
    cfg = llama_config()
    cfg["num_key_value_heads"] = H
    write_hf(str(tmp_path), cfg, llama_tensors())
    with pytest.raises(ValueError, match=r"attn\.k\.weight.*shape"):
        load_model(str(tmp_path))


def test_missing_tensor_and_bad_config(tmp_path):
    t = llama_tensors()
    del t["model.layers.0.mlp.up_proj.weight"]
    write_hf(str(tmp_path), llama_config(), t)
    with pytest.raises(ValueError, match="missing"):
        load_model(str(tmp_path))
    cfg = llama_config()
    cfg["model_type"] = "t5"
    write_hf(str(tmp_path), cfg, llama_tensors())
    with pytest.raises(ValueError, match="model_type 't5' is not supported"):
        load_model(str(tmp_path))
    cfg = llama_config()
    cfg["num_hidden_layers"] = -3
    write_hf(str(tmp_path), cfg, llama_tensors())
    with pytest.raises(ValueError, match="n_layers=-3"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(str(tmp_path))


def test_missing_shard(tmp_path):
    write_hf(str(tmp_path), llama_config(), llama_tensors(), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="shard files missing"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- GGUF


@pytest.fixture
def gguf_file(tmp_path):
    import gguf

    p = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_block_count(1)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_context_length(32)
    rng = np.random.default_rng(0)
    hd = D // H
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
              "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (D, D), "blk.0.attn_k.weight": (KV * hd, D),
              "blk.0.attn_v.weight": (KV * hd, D), "blk.0.attn_output.weight": (D, D),
              "blk.0.ffn_gate.weight": (F, D), "blk.0.ffn_up.weight": (F, D), "blk.0.ffn_down.weight": (D, F)}
    for n, s in shapes.items():
        w.add_tensor(n, rng.standard_normal(s).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def test_gguf_loads(gguf_file):
    m = load_model(str(gguf_file))
    assert m.forward(np.array([[1, 2, 3]])).shape == (1, 3, V)


def test_gguf_wrong_magic(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    data[:4] = b"GGML"
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="wrong magic"):
        load_model(str(gguf_file))


def test_gguf_truncated(gguf_file):
    data = gguf_file.read_bytes()
    for cut in (len(data) - 100, 200, 30, 10):
        gguf_file.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|too short|not a readable GGUF"):
            load_model(str(gguf_file))


def test_gguf_absurd_counts(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    struct.pack_into("<Q", data, 8, 2**40)
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="more than a .*-byte file can hold"):
        load_model(str(gguf_file))


def test_gguf_unsupported_arch(tmp_path):
    import gguf

    p = tmp_path / "x.gguf"
    w = gguf.GGUFWriter(str(p), "mamba")
    w.add_tensor("a", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'mamba' is not supported"):
        load_model(str(p))


def test_unknown_path_or_name():
    with pytest.raises(FileNotFoundError, match="neither an existing path nor a zoo model"):
        load_model("/no/such/model.bin")
    with pytest.raises(FileNotFoundError, match="zoo"):
        load_model("not-a-zoo-model")


def test_directory_without_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="cannot tell the model format"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------- impossible config values


@pytest.mark.parametrize("key,value,msg", [
    ("rms_norm_eps", float("nan"), r"norm_eps=nan .*rms_norm_eps"),
    ("rms_norm_eps", -1e-5, r"norm_eps=-1e-05"),
    ("rope_theta", -1.0, r"rope_theta=-1\.0"),
    ("rope_theta", float("inf"), r"rope_theta=inf"),
    ("hidden_size", 64.5, r"hidden_size=64\.5 is not an integer"),
    ("num_attention_heads", True, r"num_attention_heads=True is not an integer"),
    ("rms_norm_eps", None, None),  # null: the default applies
    ("rms_norm_eps", "abc", r"rms_norm_eps='abc' is not a number"),
])
def test_impossible_config_values(tmp_path, key, value, msg):
    cfg = llama_config()
    if value is None:
        del cfg[key]
    else:
        cfg[key] = value
    write_hf(str(tmp_path), cfg, llama_tensors())
    if msg is None:
        assert np.isfinite(load_model(str(tmp_path))(np.array([[1, 2, 3]]))).all()
        return
    with pytest.raises(ValueError, match=msg):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name,value", [("model.layers.1.mlp.up_proj.weight", np.nan),
                                        ("model.norm.weight", np.inf), ("model.embed_tokens.weight", -np.inf)])
def test_nonfinite_weights_are_rejected(tmp_path, name, value):
    t = llama_tensors()
    t[name].flat[7] = value
    write_hf(str(tmp_path), llama_config(), t)
    canon = {"model.layers.1.mlp.up_proj.weight": "layers.1.mlp.up.weight", "model.norm.weight": "final_norm.weight",
             "model.embed_tokens.weight": "embed"}[name]
    with pytest.raises(ValueError, match=rf"weight '{canon}' holds .* at flat index 7"):
        load_model(str(tmp_path))


def test_nonfinite_weights_llama2c(tmp_path):
    w = llama2c_weights()
    w["wq"].flat[3] = np.nan
    write_llama2c(str(tmp_path / "m.bin"), w)
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.q\.weight' holds nan"):
        load_model(str(tmp_path / "m.bin"))


def test_context_beyond_the_model_maximum(tmp_path):
    from llmint8.models import perplexity

    write_hf(str(tmp_path), llama_config(), llama_tensors())  # max_position_embeddings 64
    m = load_model(str(tmp_path))
    toks = np.arange(100) % V
    with pytest.raises(ValueError, match=r"context=65 exceeds .*max_seq_len=64"):
        perplexity(m, toks, context=65, stride=32, progress=False)
    assert np.isfinite(perplexity(m, toks, context=64, stride=32, progress=False)["ppl"])


# --------------------------------------------------------------------------- quantized folders


@pytest.fixture
def qfolder(tmp_path):
    from llmint8.models import save_quantized

    write_hf(str(tmp_path / "f"), llama_config(), llama_tensors(bias=True))
    m = load_model(str(tmp_path / "f"))
    # a threshold that gives some layer a few (not all) known outlier columns: the weights are random
    for thr in (0.5, 1.0, 1.5, 2.0, 3.0, 4.0):
        q = m.quantize("llm.int8", threshold=thr, calibration_tokens=np.arange(40) % V)
        if any(2 <= len(layer.layer.outlier_columns) < 16 for layer in q.linears.values()):
            break
    else:
        pytest.fail("no threshold gave a layer between 2 and 15 outlier columns")
    save_quantized(q, tmp_path / "q")
    return tmp_path / "q"


def _rewrite(folder, fn):
    from safetensors.numpy import load_file

    p = str(folder / "model.safetensors")
    t = load_file(p)
    fn(t)
    save_file(t, p)


def test_quantized_folder_loads(qfolder):
    m = load_model(str(qfolder))
    assert m.method == "llm.int8" and np.isfinite(m(np.array([[1, 2, 3]]))).all()


def _first_with_outliers(folder):
    from safetensors.numpy import load_file

    t = load_file(str(folder / "model.safetensors"))
    return next(k[: -len(".outlier_columns")] for k, v in t.items() if k.endswith(".outlier_columns") and 2 <= v.size < 16)


@pytest.mark.parametrize("case,msg", [
    ("weight_int8_dtype", r"layers\.0\.attn\.q\.weight_int8' has dtype I16, expected I8"),
    ("weight_scale_dtype", r"layers\.0\.attn\.q\.weight_scale' has dtype F16, expected F32"),
    ("weight_int8_shape", r"layers\.1\.mlp\.down\.weight_int8' has shape \(16, 33\), expected \(16, 32\)"),
    ("outlier_weight_shape", r"outlier_weight' has shape"),
    ("scale_negative", r"weight_scale' holds -1\.0 at \[3\]; expected finite row absmax values >= 0"),
    ("scale_nan", r"weight_scale' holds nan at \[0\]"),
    ("columns_out_of_range", r"outlier_columns' must be strictly increasing column indices in \[0, 16\)"),
    ("columns_unsorted", r"strictly increasing"),
    ("columns_too_many", r"expected I32 \(k,\) with k <= in_features = 16"),
    ("missing_scale", r"layers\.0\.mlp\.up\.weight_scale' is missing"),
    ("missing_embed", r"'embed' is missing"),
    ("unexpected", r"unexpected tensor 'layers\.0\.attn\.q\.weight'"),
    ("bias_dtype", r"bias' has dtype F16, expected F32"),
])
def test_hostile_quantized_folders(qfolder, case, msg):
    col = _first_with_outliers(qfolder)

    def edit(t):
        if case == "weight_int8_dtype":
            t["layers.0.attn.q.weight_int8"] = t["layers.0.attn.q.weight_int8"].astype(np.int16)
        elif case == "weight_scale_dtype":
            t["layers.0.attn.q.weight_scale"] = t["layers.0.attn.q.weight_scale"].astype(np.float16)
        elif case == "weight_int8_shape":
            t["layers.1.mlp.down.weight_int8"] = np.zeros((D, F + 1), np.int8)
        elif case == "outlier_weight_shape":
            t[col + ".outlier_weight"] = t[col + ".outlier_weight"][:, :-1].copy()
        elif case == "scale_negative":
            t["layers.0.attn.o.weight_scale"][3] = -1.0
        elif case == "scale_nan":
            t["layers.1.attn.v.weight_scale"][0] = np.nan
        elif case == "columns_out_of_range":
            t[col + ".outlier_columns"][-1] = 16
        elif case == "columns_unsorted":
            t[col + ".outlier_columns"] = t[col + ".outlier_columns"][::-1].copy()
            t[col + ".outlier_weight"] = t[col + ".outlier_weight"][:, ::-1].copy()
        elif case == "columns_too_many":
            n = t[col + ".outlier_columns"].shape[0]
            t[col + ".outlier_columns"] = np.arange(17, dtype=np.int32)
            t[col + ".outlier_weight"] = np.zeros((t[col + ".outlier_weight"].shape[0], 17), np.float16)
            assert n != 17
        elif case == "missing_scale":
            del t["layers.0.mlp.up.weight_scale"]
        elif case == "missing_embed":
            del t["embed"]
        elif case == "unexpected":
            t["layers.0.attn.q.weight"] = np.zeros((D, D), np.float32)
        elif case == "bias_dtype":
            t["layers.0.attn.q.bias"] = t["layers.0.attn.q.bias"].astype(np.float16)

    _rewrite(qfolder, edit)
    with pytest.raises(ValueError, match=msg):
        load_model(str(qfolder))


def test_hostile_quantized_truncated_and_huge(qfolder):
    import tracemalloc

    p = qfolder / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(str(qfolder))
    # a config and header promising a huge model in a small file: rejected from the header alone
    cfgp = qfolder / "config.json"
    root = json.loads(cfgp.read_text())
    root["llmint8"]["config"].update(dim=65536, hidden_dim=262144, n_heads=512, n_kv_heads=512, head_dim=128,
                                     rotary_dim=128)
    cfgp.write_text(json.dumps(root))
    p.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"has shape \(16, 16\), expected \(65536, 65536\)"):
            load_model(str(qfolder))
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.update(format_version=99), "format_version is 99"),
    (lambda m: m.update(method="gptq"), "method is 'gptq'"),
    (lambda m: m.update(threshold=-1), "threshold is -1"),
    (lambda m: m.update(threshold=float("nan")), "threshold is nan"),
    (lambda m: m["config"].update(n_layers=1.5), r"n_layers=1\.5"),
    (lambda m: m["config"].update(norm_eps=float("nan")), r"norm_eps=nan"),
    (lambda m: m["config"].update(rope_theta=-1), r"rope_theta=-1"),
    (lambda m: m.pop("config"), "config is missing"),
])
def test_hostile_quantized_config(qfolder, edit, msg):
    cfgp = qfolder / "config.json"
    root = json.loads(cfgp.read_text())
    edit(root["llmint8"])
    cfgp.write_text(json.dumps(root))
    with pytest.raises(ValueError, match=msg):
        load_model(str(qfolder))


@pytest.fixture
def bnbfolder(tmp_path):
    from llmint8.models import save_quantized

    write_hf(str(tmp_path / "f"), llama_config(), llama_tensors())
    save_quantized(load_model(str(tmp_path / "f")).quantize("llm.int8"), tmp_path / "b", format="bitsandbytes")
    return tmp_path / "b"


@pytest.mark.parametrize("case,msg", [
    ("format_turing", r"weight_format is 2 \(col_turing\); only 0 \(row-major\)"),
    ("no_scb", r"has no 'model\.layers\.0\.mlp\.up_proj\.SCB' row scales"),
    ("scb_nan", r"SCB' holds nan"),
    ("scb_negative", r"SCB' holds -2\.0"),
    ("scb_shape", r"SCB' has shape \(3,\), expected \(32,\)"),
    ("weight_1d", r"int8 weight .* expected \(out_features, in_features\)"),
    ("scb_alone", r"has no int8 weight"),
    ("int16", r"dtype I16"),
])
def test_hostile_bitsandbytes(bnbfolder, case, msg):
    def edit(t):
        p = "model.layers.0.mlp.up_proj"
        if case == "format_turing":
            t[p + ".weight_format"] = np.array(2, np.uint8)
        elif case == "no_scb":
            del t[p + ".SCB"]
        elif case == "scb_nan":
            t[p + ".SCB"][1] = np.nan
        elif case == "scb_negative":
            t[p + ".SCB"][1] = -2.0
        elif case == "scb_shape":
            t[p + ".SCB"] = np.ones(3, np.float32)
        elif case == "weight_1d":
            t[p + ".weight"] = t[p + ".weight"].reshape(-1)
        elif case == "scb_alone":
            del t[p + ".weight"]
        elif case == "int16":
            t["model.norm.weight"] = np.ones(D, np.int16)

    _rewrite(bnbfolder, edit)
    with pytest.raises(ValueError, match=msg):
        load_model(str(bnbfolder))


@pytest.mark.parametrize("key,value,msg", [
    ("load_in_4bit", True, "4-bit"), ("llm_int8_threshold", -1.0, "llm_int8_threshold is -1.0"),
    ("quant_method", "gptq", "quant_method is 'gptq'"), ("load_in_8bit", False, "load_in_8bit is not true"),
])
def test_hostile_bitsandbytes_config(bnbfolder, key, value, msg):
    cfgp = bnbfolder / "config.json"
    hc = json.loads(cfgp.read_text())
    hc["quantization_config"][key] = value
    if key == "load_in_8bit":
        hc["quantization_config"]["_load_in_8bit"] = False
    cfgp.write_text(json.dumps(hc))
    with pytest.raises(ValueError, match=msg):
        load_model(str(bnbfolder))
