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
