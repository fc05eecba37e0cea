"""Checkpoint loaders: llama2.c ``.bin`` (legacy version 0), Hugging Face ``config.json`` +
``.safetensors`` (Llama family, GPT-2, OPT, GPT-NeoX, Gemma 3) and GGUF (llama, qwen2, gemma3).

Each loader returns a :class:`Checkpoint`: a config dict in one canonical vocabulary, weights
under canonical names, and a tokenizer (or None). Canonical weight names:

- ``embed`` (vocab, dim); ``pos_embed`` (n_positions, dim) for learned positions;
  ``final_norm.weight``/``.bias``; ``lm_head.weight`` (vocab, dim) (the same array as ``embed``
  when tied), ``lm_head.bias``.
- per layer ``layers.{i}.``: ``attn_norm.*``, ``ffn_norm.*`` (pre-attention / pre-FFN norms),
  ``post_attn_norm.weight``, ``post_ffn_norm.weight`` (Gemma 3), ``attn.q_norm.weight``,
  ``attn.k_norm.weight`` (Gemma 3), and linear layers ``attn.{q,k,v,o}.weight/.bias``,
  ``mlp.{up,gate,down}.weight/.bias`` with weights shaped (out_features, in_features).

Q/K rows are always in Hugging Face order (RoPE on rotated halves) except for llama2.c files,
whose interleaved-pair RoPE is kept as ``config["rope"] = "interleaved"``.

Every reader checks sizes from headers against the file size before allocating, and raises
``ValueError`` naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from .tokenizers import load_hf_tokenizer, load_llama2c_tokenizer, tokenizer_from_gguf_fields

__all__ = ["Checkpoint", "load_checkpoint", "load_llama2c", "load_hf", "load_gguf", "validate_config",
           "validate_finite"]

# Sanity bounds for header values; far above any model this package can run in NumPy.
_MAX_DIM = 1 << 17
_MAX_LAYERS = 1 << 12
_MAX_VOCAB = 1 << 22
_MAX_SEQ = 1 << 24


@dataclass
class Checkpoint:
    """What a loader returns: canonical ``config`` dict, ``weights`` name -> array, ``tokenizer``."""

    config: dict
    weights: dict
    tokenizer: object = None
    name: str = ""
    baseline_note: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)


def _base_config(**kw) -> dict:
    cfg = dict(
        arch="llama", dim=None, n_layers=None, n_heads=None, n_kv_heads=None, head_dim=None,
        vocab_size=None, hidden_dim=None, max_seq_len=2048,
        norm="rms", norm_eps=1e-5, act="silu", gated=True,
        rope="half", rope_theta=10000.0, rotary_dim=None, rope_local_theta=None, rope_scaling=None,
        rope_local_scaling=None,
        pos_offset=0, parallel_residual=False, sandwich_norm=False, qk_norm=False,
        embed_scale=1.0, attn_scale=None, sliding_window=None, sliding_layers=None,
        tie_embeddings=True, bos_id=None, eos_id=None,
    )
    cfg.update(kw)
    if cfg["n_kv_heads"] is None:
        cfg["n_kv_heads"] = cfg["n_heads"]
    if cfg["head_dim"] is None and cfg["dim"] and cfg["n_heads"]:
        cfg["head_dim"] = cfg["dim"] // cfg["n_heads"]
    if cfg["rotary_dim"] is None:
        cfg["rotary_dim"] = cfg["head_dim"]
    return cfg


def _check_positive(path, **vals):
    limits = dict(dim=_MAX_DIM, hidden_dim=_MAX_DIM * 8, n_layers=_MAX_LAYERS, n_heads=_MAX_DIM,
                  n_kv_heads=_MAX_DIM, vocab_size=_MAX_VOCAB, seq_len=_MAX_SEQ, head_dim=_MAX_DIM)
    for k, v in vals.items():
        if v is None or not isinstance(v, (int, np.integer)) or not 0 < int(v) <= limits.get(k, _MAX_SEQ):
            raise ValueError(f"{path}: header field {k}={v!r} is not a plausible size "
                             f"(expected an integer in 1..{limits.get(k, _MAX_SEQ)})")


def _check_heads(path, dim, n_heads, n_kv_heads):
    if n_heads % n_kv_heads:
        raise ValueError(f"{path}: n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")


def expected_shapes(cfg: dict) -> dict:
    """Canonical weight name -> expected shape for ``cfg`` (biases and optional norms excluded)."""
    d, hd, H, KV = cfg["dim"], cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"]
    V, F = cfg["vocab_size"], cfg["hidden_dim"]
    s = {"embed": (V, d), "final_norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        s.update({p + "attn_norm.weight": (d,), p + "ffn_norm.weight": (d,),
                  p + "attn.q.weight": (H * hd, d), p + "attn.k.weight": (KV * hd, d),
                  p + "attn.v.weight": (KV * hd, d), p + "attn.o.weight": (d, H * hd),
                  p + "mlp.up.weight": (F, d), p + "mlp.down.weight": (d, F)})
        if cfg["gated"]:
            s[p + "mlp.gate.weight"] = (F, d)
        if cfg["sandwich_norm"]:
            s[p + "post_attn_norm.weight"] = (d,)
            s[p + "post_ffn_norm.weight"] = (d,)
        if cfg["qk_norm"]:
            s[p + "attn.q_norm.weight"] = (hd,)
            s[p + "attn.k_norm.weight"] = (hd,)
    return s


def validate_weights(path: str, cfg: dict, weights: dict) -> None:
    """Raise ValueError when a required weight is missing or has a shape other than the config implies."""
    for name, shape in expected_shapes(cfg).items():
        w = weights.get(name)
        if w is None:
            raise ValueError(f"{path}: weight {name!r} is missing (expected shape {shape})")
        if tuple(w.shape) != tuple(shape):
            raise ValueError(f"{path}: weight {name!r} has shape {tuple(w.shape)}, "
                             f"but the config implies {tuple(shape)}")
    for name, w in weights.items():
        if name.endswith(".bias") and name.replace(".bias", ".weight") in weights:
            out = weights[name.replace(".bias", ".weight")].shape[0]
            if tuple(w.shape) != (out,):
                raise ValueError(f"{path}: bias {name!r} has shape {tuple(w.shape)}, expected ({out},)")


# --------------------------------------------------------------------------- RoPE configuration

# RoPE frequency schemes llmint8 implements (transformers' ``rope_type`` names), each with the
# keys it needs; ``default`` is plain ``theta ** (-2i / d)``.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ROPE_TYPES = ("default",) + tuple(ROPE_SCALING_KEYS)
# transformers 5 gives models with local and global attention one RoPE entry per layer type
_ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")


def canonical_rope_scaling(rs, where: str):
    """The canonical form of a RoPE scaling dict (``rope_scaling`` of transformers 4, or a
    ``rope_parameters`` entry of transformers 5): None for the default scheme, else
    ``{"rope_type": kind, <the keys ROPE_SCALING_KEYS[kind] lists> as floats}``. ``where``
    names the dict in errors. Raises ValueError for a scheme llmint8 does not implement (naming
    it and the implemented ones) and for a missing or impossible parameter; nothing is guessed."""
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"{where} is {rs!r}; expected an object such as {{'rope_type': 'linear', 'factor': 2.0}}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"{where}: RoPE type {kind!r} is not supported; llmint8 implements "
                         f"{', '.join(repr(k) for k in ROPE_TYPES)}")
    out = {"rope_type": kind}
    for k in ROPE_SCALING_KEYS[kind]:
        v = rs.get(k)
        if not _finite_positive(v):
            raise ValueError(f"{where}.{k} is {v!r}; RoPE type {kind!r} needs a finite number > 0")
        if k == "original_max_position_embeddings":
            if float(v) != int(v):
                raise ValueError(f"{where}.{k} is {v!r}; expected an integer (a sequence length)")
            out[k] = int(v)
        else:
            out[k] = float(v)
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor={out['high_freq_factor']!r} must exceed "
                         f"low_freq_factor={out['low_freq_factor']!r} for RoPE type 'llama3'")
    return out


def _rope_theta(v, where):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{where}={v!r} is not a number")
    return float(v)


def _rope_dict(v, where):
    if v is not None and not isinstance(v, dict):
        raise ValueError(f"{where} is {v!r}; expected an object")
    return dict(v or {})


def hf_rope(hc: dict, cpath: str) -> dict:
    """RoPE settings of a Hugging Face config in canonical keys: ``rope_theta``,
    ``rope_scaling``, ``rope_local_theta`` and ``rope_local_scaling`` (Gemma 3's sliding-window
    layers), and ``partial_rotary_factor`` (None = the whole head).

    Reads both conventions as transformers 5 resolves them: ``rope_parameters`` (one dict
    ``{"rope_theta", "rope_type", <scaling keys>}``, or for Gemma 3 one per layer type,
    ``full_attention`` / ``sliding_attention``), and the older top-level ``rope_theta``,
    ``rope_scaling``, ``rope_local_base_freq`` (Gemma 3), ``rotary_emb_base`` / ``rotary_pct``
    (GPT-NeoX). A ``rope_theta`` inside the dict wins over the top-level one; an old
    ``rope_scaling`` replaces ``rope_parameters`` (Gemma 3: updates its ``full_attention``)."""
    mt = hc.get("model_type")
    rs = _rope_dict(hc.get("rope_scaling"), f"{cpath}: rope_scaling")
    rp = hc.get("rope_parameters")
    rp = None if rp is None else _rope_dict(rp, f"{cpath}: rope_parameters")

    def top(key, default):
        v = hc.get(key)
        return default if v is None else _rope_theta(v, f"{cpath}: {key}")

    out = dict(rope_local_theta=None, rope_local_scaling=None)
    if mt == "gemma3_text":
        if rp is not None and any(k not in _ROPE_LAYER_TYPES for k in rp):
            raise ValueError(f"{cpath}: Gemma 3 rope_parameters has keys {sorted(rp)}; expected one object per "
                             f"layer type ({', '.join(_ROPE_LAYER_TYPES)})")
        rp = rp or {}
        glob = _rope_dict(rp.get("full_attention"), f"{cpath}: rope_parameters.full_attention")
        loc = _rope_dict(rp.get("sliding_attention"), f"{cpath}: rope_parameters.sliding_attention")
        glob.update(rs)
        glob.setdefault("rope_theta", top("rope_theta", 1e6))
        loc.setdefault("rope_theta", top("rope_local_base_freq", 10000.0))
        where = f"{cpath}: rope_parameters.full_attention"
        out["rope_local_theta"] = _rope_theta(loc["rope_theta"], f"{cpath}: rope_parameters.sliding_attention.rope_theta")
        out["rope_local_scaling"] = canonical_rope_scaling(loc, f"{cpath}: rope_parameters.sliding_attention")
    else:
        glob = rs if rs else (rp or {})
        where = f"{cpath}: " + ("rope_scaling" if rs else "rope_parameters")
        nested = [k for k in glob if k in _ROPE_LAYER_TYPES]
        if nested:
            # one RoPE for every layer here: per-layer-type entries must agree
            first = glob[nested[0]]
            if any(k not in _ROPE_LAYER_TYPES for k in glob) or any(glob[k] != first for k in nested):
                raise ValueError(f"{where} gives different RoPE settings per layer type ({', '.join(nested)}); "
                                 f"model_type {mt!r} runs one RoPE for every layer")
            glob, where = _rope_dict(first, f"{where}.{nested[0]}"), f"{where}.{nested[0]}"
        else:
            glob = dict(glob)
        if mt == "gpt_neox":
            glob.setdefault("rope_theta", top("rotary_emb_base", top("rope_theta", 10000.0)))
            glob.setdefault("partial_rotary_factor", hc.get("rotary_pct", 0.25))
        else:
            glob.setdefault("rope_theta", top("rope_theta", 10000.0))
    if hc.get("partial_rotary_factor") is not None:
        glob.setdefault("partial_rotary_factor", hc["partial_rotary_factor"])
    if glob.get("rope_type", glob.get("type")) == "llama3":
        # transformers' default for a missing pretraining length
        glob.setdefault("original_max_position_embeddings",
                        hc.get("original_max_position_embeddings") or hc.get("max_position_embeddings"))
    out["rope_theta"] = _rope_theta(glob["rope_theta"], where + ".rope_theta")
    out["rope_scaling"] = canonical_rope_scaling(glob, where)
    out["partial_rotary_factor"] = glob.get("partial_rotary_factor")
    return out


def _rotary_dim(head_dim: int, prf, cpath: str):
    """head_dim * partial_rotary_factor as an even integer (None = the whole head)."""
    if prf is None:
        return None
    if not _finite_positive(prf) or float(prf) > 1:
        raise ValueError(f"{cpath}: partial_rotary_factor={prf!r}; expected a number in (0, 1]")
    return int(head_dim * float(prf))


# where each canonical config value comes from, for error messages
_CONFIG_SOURCES = {
    "dim": "hidden_size / n_embd / embedding_length", "n_layers": "num_hidden_layers / n_layer / block_count",
    "n_heads": "num_attention_heads / n_head", "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim / key_length", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size / ffn_dim / n_inner",
    "max_seq_len": "max_position_embeddings / n_positions / seq_len / context_length",
    "norm_eps": "rms_norm_eps / layer_norm_eps / layer_norm_epsilon",
    "rope_theta": "rope_theta / rotary_emb_base / rope.freq_base", "rope_local_theta": "rope_local_base_freq",
    "rotary_dim": "rotary_pct / rope.dimension_count", "embed_scale": "hidden_size",
    "attn_scale": "query_pre_attn_scalar", "sliding_window": "sliding_window",
}


_NORMS = ("rms", "layer")
_ROPE_STYLES = (None, "half", "interleaved")
_ACT_NAMES = ("silu", "gelu", "gelu_tanh", "relu")
_BOOL_KEYS = ("gated", "tie_embeddings", "parallel_residual", "sandwich_norm", "qk_norm")


def _finite_positive(v) -> bool:
    return (not isinstance(v, bool)) and isinstance(v, (int, float, np.floating, np.integer)) and \
        bool(np.isfinite(float(v))) and float(v) > 0


def validate_config(path: str, cfg: dict) -> None:
    """Raise ValueError naming the key when a canonical config holds an impossible value: sizes
    that are not positive integers, a non-finite or non-positive norm epsilon, RoPE base,
    attention or embedding scale, or a rotary dimension that does not fit the head."""

    def bad(key, v, want):
        src = _CONFIG_SOURCES.get(key)
        raise ValueError(f"{path}: config value {key}={v!r}{f' (from {src})' if src else ''} is impossible; "
                         f"expected {want}")

    limits = dict(dim=_MAX_DIM, hidden_dim=_MAX_DIM * 8, n_layers=_MAX_LAYERS, n_heads=_MAX_DIM,
                  n_kv_heads=_MAX_DIM, vocab_size=_MAX_VOCAB, max_seq_len=_MAX_SEQ, head_dim=_MAX_DIM)
    for k, lim in limits.items():
        v = cfg.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 < int(v) <= lim:
            bad(k, v, f"an integer in 1..{lim}")
    if cfg["n_heads"] % cfg["n_kv_heads"]:
        bad("n_kv_heads", cfg["n_kv_heads"], f"a divisor of n_heads={cfg['n_heads']}")
    if not _finite_positive(cfg.get("norm_eps")):
        bad("norm_eps", cfg.get("norm_eps"), "a finite number > 0")
    # the switches of the runner: a value outside these sets would silently pick another computation
    for key, allowed in (("norm", _NORMS), ("rope", _ROPE_STYLES), ("act", _ACT_NAMES)):
        v = cfg.get(key)
        if isinstance(v, bool) or v not in allowed:
            bad(key, v, "one of " + ", ".join("null" if a is None else repr(a) for a in allowed))
    for key in _BOOL_KEYS:
        v = cfg.get(key)
        if not isinstance(v, (bool, np.bool_)):
            bad(key, v, "true or false")
    if not isinstance(cfg.get("arch"), str) or not cfg["arch"]:
        bad("arch", cfg.get("arch"), "a non-empty string")
    po = cfg.get("pos_offset", 0)
    if isinstance(po, bool) or not isinstance(po, (int, np.integer)) or po < 0:
        bad("pos_offset", po, "an integer >= 0")
    sl = cfg.get("sliding_layers")
    if sl is not None and (not isinstance(sl, (list, tuple)) or len(sl) != cfg["n_layers"]
                           or not all(isinstance(b, (bool, np.bool_)) for b in sl)):
        bad("sliding_layers", sl, f"null or a list of n_layers={cfg['n_layers']} true/false values")
    if cfg.get("rope"):
        if not _finite_positive(cfg.get("rope_theta")):
            bad("rope_theta", cfg.get("rope_theta"), "a finite number > 0")
        if cfg.get("rope_local_theta") is not None and not _finite_positive(cfg["rope_local_theta"]):
            bad("rope_local_theta", cfg["rope_local_theta"], "a finite number > 0")
        rd = cfg.get("rotary_dim")
        if isinstance(rd, bool) or not isinstance(rd, (int, np.integer)) or not 0 < rd <= cfg["head_dim"] or rd % 2:
            bad("rotary_dim", rd, f"an even integer in 2..head_dim={cfg['head_dim']}")
        for key in ("rope_scaling", "rope_local_scaling"):
            # raises naming an unimplemented RoPE type, or a missing / impossible parameter
            canonical_rope_scaling(cfg.get(key), f"{path}: config value {key}")
    es = cfg.get("embed_scale", 1.0)
    if not _finite_positive(es):
        bad("embed_scale", es, "a finite number > 0")
    if cfg.get("attn_scale") is not None and not _finite_positive(cfg["attn_scale"]):
        bad("attn_scale", cfg["attn_scale"], "a finite number > 0")
    sw = cfg.get("sliding_window")
    if sw is not None and (isinstance(sw, bool) or not isinstance(sw, (int, np.integer)) or sw < 1):
        bad("sliding_window", sw, "a positive integer or null")


def validate_finite(path: str, weights: dict) -> None:
    """Raise ValueError naming the first float weight that holds NaN or Inf (min/max scan: no
    temporary copies)."""
    seen = set()
    for name, w in weights.items():
        if id(w) in seen or not isinstance(w, np.ndarray) or w.size == 0 or w.dtype.kind != "f":
            continue
        seen.add(id(w))
        with np.errstate(invalid="ignore"):
            lo, hi = w.min(), w.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            flat = np.asarray(w).reshape(-1)
            i = int(np.argmax(~np.isfinite(flat)))
            raise ValueError(f"{path}: weight {name!r} holds {flat[i]} at flat index {i}; expected finite values")


# --------------------------------------------------------------------------- llama2.c

_LLAMA2C_MAGIC = 0x616B3432  # "ak42": llama2.c export versions 1 and 2


def load_llama2c(path: str, tokenizer_path: str | None = None) -> Checkpoint:
    """Load a llama2.c legacy (version 0) fp32 checkpoint.

    Layout: 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
    seq_len; negative vocab_size = classifier not shared), then fp32 arrays token_embedding,
    rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, seq_len*head_size floats of legacy
    RoPE tables (skipped), then the classifier if not shared. The tokenizer (``tok{vocab}.bin``
    or ``tokenizer.bin`` beside the checkpoint unless given) is optional.
    """
    size = os.path.getsize(path)
    if size < 28:
        raise ValueError(f"{path}: file is {size} bytes, shorter than the 28-byte llama2.c header")
    with open(path, "rb") as f:
        head = f.read(28)
    vals = struct.unpack("<7i", head)
    if vals[0] == _LLAMA2C_MAGIC:
        raise ValueError(f"{path}: llama2.c export version 1/2 (magic 'ak42') is not supported; "
                         f"expected the legacy version 0 layout (export with --version 0)")
    dim, hidden, L, H, KV, vocab, seq = vals
    shared = vocab > 0
    vocab = abs(vocab)
    _check_positive(path, dim=dim, hidden_dim=hidden, n_layers=L, n_heads=H, n_kv_heads=KV,
                    vocab_size=vocab, seq_len=seq)
    if dim % H:
        raise ValueError(f"{path}: dim={dim} is not divisible by n_heads={H}")
    _check_heads(path, dim, H, KV)
    hd = dim // H
    kv = KV * hd
    counts = [("embed", (vocab, dim)), ("rms_att", (L, dim)), ("wq", (L, dim, dim)), ("wk", (L, kv, dim)),
              ("wv", (L, kv, dim)), ("wo", (L, dim, dim)), ("rms_ffn", (L, dim)), ("w1", (L, hidden, dim)),
              ("w2", (L, dim, hidden)), ("w3", (L, hidden, dim)), ("rms_final", (dim,)),
              ("_rope", (seq * hd,))]
    if not shared:
        counts.append(("wcls", (vocab, dim)))
    n_floats = sum(int(np.prod(s, dtype=np.int64)) for _, s in counts)
    expected = 28 + 4 * n_floats
    if size != expected:
        what = "truncated" if size < expected else "longer than expected"
        raise ValueError(f"{path}: file is {what}: the header (dim={dim}, hidden_dim={hidden}, n_layers={L}, "
                         f"n_heads={H}, n_kv_heads={KV}, vocab_size={vocab}, seq_len={seq}) implies "
                         f"{expected} bytes, the file has {size}")
    raw = np.memmap(path, dtype="<f4", mode="r", offset=28, shape=(n_floats,))
    arrays, off = {}, 0
    for name, shape in counts:
        n = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.array(raw[off:off + n], dtype=np.float32).reshape(shape)
        off += n
    del raw
    w = {"embed": arrays["embed"], "final_norm.weight": arrays["rms_final"]}
    w["lm_head.weight"] = arrays["embed"] if shared else arrays["wcls"]
    for i in range(L):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = arrays["rms_att"][i]
        w[p + "ffn_norm.weight"] = arrays["rms_ffn"][i]
        w[p + "attn.q.weight"] = arrays["wq"][i]
        w[p + "attn.k.weight"] = arrays["wk"][i]
        w[p + "attn.v.weight"] = arrays["wv"][i]
        w[p + "attn.o.weight"] = arrays["wo"][i]
        w[p + "mlp.gate.weight"] = arrays["w1"][i]
        w[p + "mlp.down.weight"] = arrays["w2"][i]
        w[p + "mlp.up.weight"] = arrays["w3"][i]
    cfg = _base_config(arch="llama", dim=dim, n_layers=L, n_heads=H, n_kv_heads=KV, vocab_size=vocab,
                       hidden_dim=hidden, max_seq_len=seq, norm="rms", norm_eps=1e-5, act="silu",
                       gated=True, rope="interleaved", rope_theta=10000.0, tie_embeddings=shared,
                       bos_id=1, eos_id=2)
    validate_weights(path, cfg, w)
    if tokenizer_path is None:
        folder = os.path.dirname(os.path.abspath(path))
        for cand in (f"tok{vocab}.bin", "tokenizer.bin"):
            if os.path.exists(os.path.join(folder, cand)):
                tokenizer_path = os.path.join(folder, cand)
                break
    tok = load_llama2c_tokenizer(tokenizer_path, vocab) if tokenizer_path else None
    name = os.path.splitext(os.path.basename(path))[0]
    return Checkpoint(cfg, w, tok, name=name, source=path)


# --------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16",
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """Validate a safetensors file's header against its size; returns (header dict, data offset)."""
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header length first)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: safetensors header length {n} exceeds the file size {size}; "
                             f"not a safetensors file or truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({e}); wrong file type?") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if dt not in _ST_ITEMSIZE:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt!r}")
        if any((not isinstance(s, int)) or s < 0 for s in shape):
            raise ValueError(f"{path}: tensor {name!r} has invalid shape {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[dt]
        if not (0 <= a <= b <= data_len) or b - a != nbytes:
            raise ValueError(f"{path}: tensor {name!r} (shape {shape}, {dt}) has data offsets [{a}, {b}) "
                             f"but needs {nbytes} bytes inside a data section of {data_len} bytes; "
                             f"truncated or corrupt file")
    return header, 8 + n


def read_safetensors(path: str) -> dict:
    """Read all tensors of a safetensors file as NumPy arrays (BF16 widened to float32)."""
    from safetensors import safe_open

    header, data_start = read_safetensors_header(path)
    out = {}
    bf16 = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "BF16"]
    others = [k for k in header if k != "__metadata__" and k not in bf16]
    if others:
        with safe_open(path, framework="numpy") as f:
            for k in others:
                out[k] = f.get_tensor(k)
    if bf16:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for k in bf16:
            a, b = header[k]["data_offsets"]
            u16 = np.frombuffer(mm[data_start + a: data_start + b].tobytes(), dtype="<u2")
            out[k] = (u16.astype(np.uint32) << 16).view(np.float32).reshape(header[k]["shape"])
        del mm
    return out


def _float(a):
    if a.dtype in (np.float16, np.float32):
        return a
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32)
    raise ValueError(f"expected a floating-point tensor, got dtype {a.dtype}")


def _strip_prefix(tensors: dict, prefixes) -> dict:
    out = {}
    for k, v in tensors.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def _hf_files(folder: str) -> list[str]:
    idx = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(idx):
        with open(idx) as f:
            try:
                wm = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise ValueError(f"{idx}: not a safetensors index (expected a JSON object with 'weight_map')") from None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise ValueError(f"{idx}: weight_map must map tensor names to shard file names")
        files = sorted(set(wm.values()))
        missing = [x for x in files if not os.path.exists(os.path.join(folder, x))]
        if missing:
            raise ValueError(f"{idx}: shard files missing from {folder}: {', '.join(missing)}")
        return [os.path.join(folder, x) for x in files]
    files = sorted(x for x in os.listdir(folder) if x.endswith(".safetensors"))
    if not files:
        raise ValueError(f"{folder}: no .safetensors files (expected model.safetensors or an index json)")
    return [os.path.join(folder, x) for x in files]


def hf_tensor_index(folder: str) -> dict:
    """Every tensor of a Hugging Face folder across its shards: name -> (file, data start,
    header entry), from the headers alone. With ``model.safetensors.index.json`` each tensor
    must be in the shard its ``weight_map`` names (a module's pieces, e.g. an 8-bit ``weight``
    and its ``SCB``, may be in different shards); a tensor in two files is refused."""
    files = _hf_files(folder)
    idx = os.path.join(folder, "model.safetensors.index.json")
    wm = None
    if os.path.exists(idx):
        with open(idx) as f:
            wm = json.load(f)["weight_map"]  # _hf_files checked it
    out = {}
    for path in files:
        header, data_start = read_safetensors_header(path)
        header.pop("__metadata__", None)
        for name, info in header.items():
            if name in out:
                raise ValueError(f"{folder}: tensor {name!r} is in both {os.path.basename(out[name][0])} and "
                                 f"{os.path.basename(path)}; expected each tensor in one shard")
            out[name] = (path, data_start, info)
    if wm is not None:
        for name, fn in wm.items():
            got = out.get(name)
            if got is None:
                raise ValueError(f"{idx}: tensor {name!r} is listed in {fn!r} but no shard holds it")
            if os.path.basename(got[0]) != os.path.basename(str(fn)):
                raise ValueError(f"{idx}: tensor {name!r} is listed in {fn!r} but found in "
                                 f"{os.path.basename(got[0])}")
    return out


def read_hf_config(folder: str) -> tuple[dict, str]:
    """(config.json as a dict, its path) of a Hugging Face folder; Gemma 3's ``text_config`` is
    lifted to the top (keeping ``quantization_config``)."""
    cpath = os.path.join(folder, "config.json")
    if not os.path.exists(cpath):
        raise ValueError(f"{folder}: no config.json (needed for a Hugging Face checkpoint)")
    with open(cpath) as f:
        try:
            hc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cpath}: not valid JSON ({e})") from None
    if not isinstance(hc, dict):
        raise ValueError(f"{cpath}: expected a JSON object")
    if hc.get("model_type") == "gemma3" and isinstance(hc.get("text_config"), dict):
        qc = hc.get("quantization_config")
        hc = dict(hc["text_config"], model_type="gemma3_text")
        if qc is not None:
            hc.setdefault("quantization_config", qc)
    return hc, cpath


def load_hf(folder: str) -> Checkpoint:
    """Load a Hugging Face checkpoint folder: ``config.json`` + ``.safetensors`` (sharded via
    ``model.safetensors.index.json``) + optional ``tokenizer.json``. Supported ``model_type``:
    llama, mistral, qwen2, gpt2, opt, gpt_neox, gemma3_text/gemma3."""
    if os.path.isfile(folder):
        folder = os.path.dirname(os.path.abspath(folder))
    hc, cpath = read_hf_config(folder)
    if isinstance(hc.get("quantization_config"), dict):
        raise ValueError(f"{cpath}: a quantized checkpoint (quantization_config); load it with "
                         f"llmint8.models.load_model, which reads bitsandbytes 8-bit folders")
    hf_tensor_index(folder)  # every tensor in one shard, where the index says
    tensors = {}
    for p in _hf_files(folder):
        tensors.update(read_safetensors(p))
    return hf_checkpoint(folder, hc, tensors)


def hf_checkpoint(folder: str, hc: dict, tensors: dict) -> Checkpoint:
    """Build the canonical :class:`Checkpoint` from a Hugging Face config dict and its tensors
    (name -> array); checks shapes and loads the tokenizer found in ``folder``."""
    cpath = os.path.join(folder, "config.json")
    mt = hc.get("model_type")
    for k in _HF_FLOAT_KEYS:
        v = hc.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{cpath}: {k}={v!r} is not a number")
    builders = {"llama": _hf_llama, "mistral": _hf_llama, "qwen2": _hf_llama, "gpt2": _hf_gpt2,
                "opt": _hf_opt, "gpt_neox": _hf_neox, "gemma3_text": _hf_gemma3}
    if mt not in builders:
        raise ValueError(f"{cpath}: model_type {mt!r} is not supported; expected one of {sorted(builders)}")
    try:
        cfg, w = builders[mt](hc, tensors, cpath)
    except KeyError as e:
        raise ValueError(f"{folder}: tensor or config key {e} missing for model_type {mt!r}") from None
    except TypeError as e:
        raise ValueError(f"{cpath}: a config value has the wrong type ({e})") from None
    cfg.setdefault("bos_id", hc.get("bos_token_id"))
    if cfg.get("bos_id") is None:
        cfg["bos_id"] = hc.get("bos_token_id")
    eos = hc.get("eos_token_id")
    cfg["eos_id"] = eos[0] if isinstance(eos, list) and eos else eos
    validate_weights(folder, cfg, w)
    tok = load_hf_tokenizer(folder, hc)
    return Checkpoint(cfg, w, tok, name=hc.get("_name_or_path") or os.path.basename(os.path.abspath(folder)),
                      source=folder)


_HF_FLOAT_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "rotary_emb_base",
                  "rotary_pct", "rope_local_base_freq", "query_pre_attn_scalar")


def _hf_int(hc, *keys, default=None):
    for k in keys:
        v = hc.get(k)
        if v is not None:
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
                raise ValueError(f"config.json: {k}={v!r} is not an integer")
            return int(v)
    if default is not None:
        return default
    raise KeyError(keys[0])


def _hf_bool(hc, key, default: bool) -> bool:
    """A true/false config value; JSON strings such as "false" are refused, not read as true."""
    v = hc.get(key)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    raise ValueError(f"config.json: {key}={v!r} is not a boolean (expected true or false)")


def _hf_llama(hc, t, cpath="config.json"):
    t = _strip_prefix(t, ("model.",))
    d = _hf_int(hc, "hidden_size")
    H = _hf_int(hc, "num_attention_heads")
    L = _hf_int(hc, "num_hidden_layers")
    _check_positive("config.json", dim=d, n_heads=H, n_layers=L)
    hd = _hf_int(hc, "head_dim", default=d // H)
    rope = hf_rope(hc, cpath)
    cfg = _base_config(arch="llama", dim=d, n_layers=L, n_heads=H,
                       n_kv_heads=_hf_int(hc, "num_key_value_heads", default=H),
                       head_dim=hd, vocab_size=_hf_int(hc, "vocab_size"),
                       hidden_dim=_hf_int(hc, "intermediate_size"),
                       max_seq_len=_hf_int(hc, "max_position_embeddings", default=2048),
                       norm_eps=float(hc.get("rms_norm_eps", 1e-6)), act=_act(hc.get("hidden_act", "silu")),
                       rope_theta=rope["rope_theta"], rope_scaling=rope["rope_scaling"],
                       rotary_dim=_rotary_dim(hd, rope["partial_rotary_factor"], cpath),
                       tie_embeddings=_hf_bool(hc, "tie_word_embeddings", False))
    window = hc.get("sliding_window")
    use_window = _hf_bool(hc, "use_sliding_window", False)
    if window and (hc.get("model_type") == "mistral" or use_window):
        # Mistral-style local attention on every layer (only matters beyond `window` tokens)
        cfg["sliding_window"] = int(window)
        cfg["sliding_layers"] = [True] * L
    w = {"embed": _float(t["embed_tokens.weight"]), "final_norm.weight": _float(t["norm.weight"])}
    w["lm_head.weight"] = _float(t["lm_head.weight"]) if "lm_head.weight" in t and not cfg["tie_embeddings"] else w["embed"]
    cfg["tie_embeddings"] = w["lm_head.weight"] is w["embed"]
    for i in range(L):
        s, p = f"layers.{i}.", f"layers.{i}."
        w[p + "attn_norm.weight"] = _float(t[s + "input_layernorm.weight"])
        w[p + "ffn_norm.weight"] = _float(t[s + "post_attention_layernorm.weight"])
        for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            w[p + f"attn.{a}.weight"] = _float(t[s + f"self_attn.{b}.weight"])
            if s + f"self_attn.{b}.bias" in t:
                w[p + f"attn.{a}.bias"] = _float(t[s + f"self_attn.{b}.bias"])
        for a in ("gate", "up", "down"):
            w[p + f"mlp.{a}.weight"] = _float(t[s + f"mlp.{a}_proj.weight"])
    return cfg, w


def _hf_gemma3(hc, t, cpath="config.json"):
    t = _strip_prefix(t, ("model.language_model.", "language_model.model.", "model."))
    d = _hf_int(hc, "hidden_size")
    H = _hf_int(hc, "num_attention_heads")
    L = _hf_int(hc, "num_hidden_layers")
    _check_positive("config.json", dim=d, n_heads=H, n_layers=L)
    hd = _hf_int(hc, "head_dim", default=256)
    rope = hf_rope(hc, cpath)
    window = hc.get("sliding_window")
    if hc.get("layer_types"):
        sliding = [lt == "sliding_attention" for lt in hc["layer_types"]]
    else:
        pat = int(hc.get("sliding_window_pattern", 6))
        sliding = [bool((i + 1) % pat) for i in range(L)]
    cfg = _base_config(arch="gemma3", dim=d, n_layers=L, n_heads=H,
                       n_kv_heads=_hf_int(hc, "num_key_value_heads", default=H), head_dim=hd,
                       vocab_size=_hf_int(hc, "vocab_size"), hidden_dim=_hf_int(hc, "intermediate_size"),
                       max_seq_len=_hf_int(hc, "max_position_embeddings", default=32768),
                       norm_eps=float(hc.get("rms_norm_eps", 1e-6)),
                       act=_act(hc.get("hidden_activation") or hc.get("hidden_act") or "gelu_pytorch_tanh"),
                       rope_theta=rope["rope_theta"], rope_local_theta=rope["rope_local_theta"],
                       rope_scaling=rope["rope_scaling"], rope_local_scaling=rope["rope_local_scaling"],
                       rotary_dim=_rotary_dim(hd, rope["partial_rotary_factor"], cpath),
                       sandwich_norm=True, qk_norm=True,
                       embed_scale=float(np.sqrt(d)),
                       attn_scale=float(hc.get("query_pre_attn_scalar", hd)) ** -0.5,
                       sliding_window=window, sliding_layers=sliding, tie_embeddings=True)
    # Gemma's RMSNorm multiplies by (1 + weight); fold the 1 in, as GGUF files do.
    n = lambda k: _float(t[k]).astype(np.float32) + 1.0  # noqa: E731
    w = {"embed": _float(t["embed_tokens.weight"]), "final_norm.weight": n("norm.weight")}
    w["lm_head.weight"] = w["embed"]
    for i in range(L):
        s = p = f"layers.{i}."
        w[p + "attn_norm.weight"] = n(s + "input_layernorm.weight")
        w[p + "post_attn_norm.weight"] = n(s + "post_attention_layernorm.weight")
        w[p + "ffn_norm.weight"] = n(s + "pre_feedforward_layernorm.weight")
        w[p + "post_ffn_norm.weight"] = n(s + "post_feedforward_layernorm.weight")
        w[p + "attn.q_norm.weight"] = n(s + "self_attn.q_norm.weight")
        w[p + "attn.k_norm.weight"] = n(s + "self_attn.k_norm.weight")
        for a in ("q", "k", "v", "o"):
            w[p + f"attn.{a}.weight"] = _float(t[s + f"self_attn.{a}_proj.weight"])
        for a in ("gate", "up", "down"):
            w[p + f"mlp.{a}.weight"] = _float(t[s + f"mlp.{a}_proj.weight"])
    return cfg, w


def _hf_gpt2(hc, t, cpath="config.json"):
    t = _strip_prefix(t, ("transformer.",))
    d = _hf_int(hc, "n_embd", "hidden_size")
    H = _hf_int(hc, "n_head", "num_attention_heads")
    L = _hf_int(hc, "n_layer", "num_hidden_layers")
    _check_positive("config.json", dim=d, n_heads=H, n_layers=L)
    cfg = _base_config(arch="gpt2", dim=d, n_layers=L, n_heads=H, vocab_size=_hf_int(hc, "vocab_size"),
                       hidden_dim=hc.get("n_inner") or 4 * d, max_seq_len=_hf_int(hc, "n_positions", default=1024),
                       norm="layer", norm_eps=float(hc.get("layer_norm_epsilon", 1e-5)),
                       act=_act(hc.get("activation_function", "gelu_new")), gated=False, rope=None,
                       tie_embeddings=True, bos_id=hc.get("bos_token_id", 50256))
    w = {"embed": _float(t["wte.weight"]), "pos_embed": _float(t["wpe.weight"]),
         "final_norm.weight": _float(t["ln_f.weight"]), "final_norm.bias": _float(t["ln_f.bias"])}
    w["lm_head.weight"] = w["embed"]
    for i in range(L):
        s, p = f"h.{i}.", f"layers.{i}."
        w[p + "attn_norm.weight"], w[p + "attn_norm.bias"] = _float(t[s + "ln_1.weight"]), _float(t[s + "ln_1.bias"])
        w[p + "ffn_norm.weight"], w[p + "ffn_norm.bias"] = _float(t[s + "ln_2.weight"]), _float(t[s + "ln_2.bias"])
        # Conv1D stores (in, out): transpose to (out, in)
        qkv = _float(t[s + "attn.c_attn.weight"])
        if qkv.shape != (d, 3 * d):
            raise ValueError(f"GPT-2 tensor {s}attn.c_attn.weight has shape {qkv.shape}, expected {(d, 3 * d)}")
        qkv_b = _float(t[s + "attn.c_attn.bias"])
        for j, a in enumerate("qkv"):
            w[p + f"attn.{a}.weight"] = np.ascontiguousarray(qkv[:, j * d:(j + 1) * d].T)
            w[p + f"attn.{a}.bias"] = qkv_b[j * d:(j + 1) * d]
        w[p + "attn.o.weight"] = np.ascontiguousarray(_float(t[s + "attn.c_proj.weight"]).T)
        w[p + "attn.o.bias"] = _float(t[s + "attn.c_proj.bias"])
        w[p + "mlp.up.weight"] = np.ascontiguousarray(_float(t[s + "mlp.c_fc.weight"]).T)
        w[p + "mlp.up.bias"] = _float(t[s + "mlp.c_fc.bias"])
        w[p + "mlp.down.weight"] = np.ascontiguousarray(_float(t[s + "mlp.c_proj.weight"]).T)
        w[p + "mlp.down.bias"] = _float(t[s + "mlp.c_proj.bias"])
    return cfg, w


def _hf_opt(hc, t, cpath="config.json"):
    t = _strip_prefix(t, ("model.decoder.", "decoder."))
    d = _hf_int(hc, "hidden_size")
    H = _hf_int(hc, "num_attention_heads")
    L = _hf_int(hc, "num_hidden_layers")
    _check_positive("config.json", dim=d, n_heads=H, n_layers=L)
    if not _hf_bool(hc, "do_layer_norm_before", True) or hc.get("word_embed_proj_dim", d) != d:
        raise ValueError("OPT variants with post-layer-norm or projected embeddings (opt-350m) are not supported")
    cfg = _base_config(arch="opt", dim=d, n_layers=L, n_heads=H, vocab_size=_hf_int(hc, "vocab_size"),
                       hidden_dim=_hf_int(hc, "ffn_dim"), max_seq_len=_hf_int(hc, "max_position_embeddings", default=2048),
                       norm="layer", norm_eps=1e-5, act=_act(hc.get("activation_function", "relu")), gated=False,
                       rope=None, pos_offset=2, tie_embeddings=True, bos_id=hc.get("bos_token_id", 2))
    w = {"embed": _float(t["embed_tokens.weight"]), "pos_embed": _float(t["embed_positions.weight"]),
         "final_norm.weight": _float(t["final_layer_norm.weight"]), "final_norm.bias": _float(t["final_layer_norm.bias"])}
    w["lm_head.weight"] = _float(t["lm_head.weight"]) if "lm_head.weight" in t and not _hf_bool(hc, "tie_word_embeddings", True) else w["embed"]
    cfg["tie_embeddings"] = w["lm_head.weight"] is w["embed"]
    for i in range(L):
        s = p = f"layers.{i}."
        for a, b in (("attn_norm", "self_attn_layer_norm"), ("ffn_norm", "final_layer_norm")):
            w[p + a + ".weight"], w[p + a + ".bias"] = _float(t[s + b + ".weight"]), _float(t[s + b + ".bias"])
        for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            w[p + f"attn.{a}.weight"] = _float(t[s + f"self_attn.{b}.weight"])
            w[p + f"attn.{a}.bias"] = _float(t[s + f"self_attn.{b}.bias"])
        for a, b in (("up", "fc1"), ("down", "fc2")):
            w[p + f"mlp.{a}.weight"] = _float(t[s + b + ".weight"])
            w[p + f"mlp.{a}.bias"] = _float(t[s + b + ".bias"])
    return cfg, w


def _hf_neox(hc, t, cpath="config.json"):
    t = _strip_prefix(t, ("gpt_neox.",))
    d = _hf_int(hc, "hidden_size")
    H = _hf_int(hc, "num_attention_heads")
    L = _hf_int(hc, "num_hidden_layers")
    _check_positive("config.json", dim=d, n_heads=H, n_layers=L)
    hd = d // H
    rope = hf_rope(hc, cpath)
    rd = _rotary_dim(hd, rope["partial_rotary_factor"], cpath)
    cfg = _base_config(arch="gpt_neox", dim=d, n_layers=L, n_heads=H, vocab_size=_hf_int(hc, "vocab_size"),
                       hidden_dim=_hf_int(hc, "intermediate_size"),
                       max_seq_len=_hf_int(hc, "max_position_embeddings", default=2048),
                       norm="layer", norm_eps=float(hc.get("layer_norm_eps", 1e-5)),
                       act=_act(hc.get("hidden_act", "gelu")), gated=False, rope="half", rotary_dim=rd,
                       rope_theta=rope["rope_theta"], rope_scaling=rope["rope_scaling"],
                       parallel_residual=_hf_bool(hc, "use_parallel_residual", True),
                       tie_embeddings=_hf_bool(hc, "tie_word_embeddings", False))
    w = {"embed": _float(t["embed_in.weight"]), "final_norm.weight": _float(t["final_layer_norm.weight"]),
         "final_norm.bias": _float(t["final_layer_norm.bias"])}
    w["lm_head.weight"] = w["embed"] if cfg["tie_embeddings"] else _float(t["embed_out.weight"])
    for i in range(L):
        s = p = f"layers.{i}."
        for a, b in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            w[p + a + ".weight"], w[p + a + ".bias"] = _float(t[s + b + ".weight"]), _float(t[s + b + ".bias"])
        # fused QKV rows are grouped per head: (head, [q|k|v], head_dim)
        qkv = _float(t[s + "attention.query_key_value.weight"])
        if qkv.shape != (3 * d, d):
            raise ValueError(f"GPT-NeoX tensor {s}attention.query_key_value.weight has shape {qkv.shape}, expected {(3 * d, d)}")
        qkv = qkv.reshape(H, 3, hd, d)
        qkv_b = _float(t[s + "attention.query_key_value.bias"]).reshape(H, 3, hd)
        for j, a in enumerate("qkv"):
            w[p + f"attn.{a}.weight"] = np.ascontiguousarray(qkv[:, j].reshape(d, d))
            w[p + f"attn.{a}.bias"] = np.ascontiguousarray(qkv_b[:, j].reshape(d))
        w[p + "attn.o.weight"] = _float(t[s + "attention.dense.weight"])
        w[p + "attn.o.bias"] = _float(t[s + "attention.dense.bias"])
        w[p + "mlp.up.weight"] = _float(t[s + "mlp.dense_h_to_4h.weight"])
        w[p + "mlp.up.bias"] = _float(t[s + "mlp.dense_h_to_4h.bias"])
        w[p + "mlp.down.weight"] = _float(t[s + "mlp.dense_4h_to_h.weight"])
        w[p + "mlp.down.bias"] = _float(t[s + "mlp.dense_4h_to_h.bias"])
    return cfg, w


_ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
         "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


def _act(name):
    if name not in _ACTS:
        raise ValueError(f"activation {name!r} is not supported; expected one of {sorted(_ACTS)}")
    return _ACTS[name]


# --------------------------------------------------------------------------- GGUF

_GGUF_MAGIC = b"GGUF"


def _gguf_precheck(path: str) -> None:
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes)")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != _GGUF_MAGIC:
        raise ValueError(f"{path}: wrong magic {head[:4]!r}; expected b'GGUF'")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", head, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported; expected 2 or 3")
    # every tensor info takes at least 8+4+8+4+8 bytes and every key/value at least 8+4+1
    if n_tensors * 32 + n_kv * 13 > size - 24:
        raise ValueError(f"{path}: header claims {n_tensors} tensors and {n_kv} metadata entries, "
                         f"more than a {size}-byte file can hold; truncated or corrupt")


def _gguf_fields(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception:  # exotic field types are not needed by the loader
            continue
    return out


class _InMemoryNumpy:
    """Stand-in for the ``np`` module inside ``gguf.gguf_reader`` whose ``memmap`` reads the
    file into an ordinary array: the reader slices the buffer once per vocabulary entry, and
    slicing a memmap costs ~10x more (30 s vs 3 s for a 262k-token vocabulary)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def memmap(path, mode="r", **kw):
        return np.fromfile(path, dtype=np.uint8)


def _open_gguf_reader(path: str):
    import gguf
    from gguf import gguf_reader

    if os.path.getsize(path) > (2 << 30) or getattr(gguf_reader, "np", None) is not np:
        return gguf.GGUFReader(path, "r")
    gguf_reader.np = _InMemoryNumpy()
    try:
        return gguf.GGUFReader(path, "r")
    finally:
        gguf_reader.np = np


def read_gguf(path: str):
    """Open a GGUF file with ``gguf.GGUFReader`` after checking its header; returns (reader, fields)."""
    import gguf

    _gguf_precheck(path)
    try:
        reader = _open_gguf_reader(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path}: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                             f"past the end of the {size}-byte file; truncated")
    return reader, _gguf_fields(reader)


def _dequant(t) -> np.ndarray:
    import gguf

    shape = tuple(int(x) for x in reversed(list(t.shape)))
    qt = t.tensor_type
    if qt == gguf.GGMLQuantizationType.F32:
        a = np.asarray(t.data, dtype=np.float32)
    elif qt == gguf.GGMLQuantizationType.F16:
        a = np.asarray(t.data, dtype=np.float16)
    else:
        a = gguf.quants.dequantize(np.asarray(t.data), qt).astype(np.float32, copy=False)
    return a.reshape(shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert-time Q/K row permutation (interleaved pairs -> rotated halves)."""
    out, inn = w.shape
    return np.ascontiguousarray(w.reshape(n_head, out // n_head // 2, 2, inn).swapaxes(1, 2).reshape(out, inn))


def load_gguf(path: str) -> Checkpoint:
    """Load a GGUF model (architectures llama, qwen2, gemma3), dequantizing every tensor to
    float32 (F16 kept as float16). Q/K weights of ``llama`` files are un-permuted to Hugging Face
    order. Quantized files get a ``baseline_note`` saying their float baseline is dequantized."""
    import gguf

    reader, fields = read_gguf(path)
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen2", "gemma3"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; expected llama, qwen2 or gemma3")

    def g(key, default=None):
        v = fields.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"{path}: GGUF metadata key {arch}.{key} is missing")
        return v

    tinfo = {t.name: t for t in reader.tensors}
    d, L, H = int(g("embedding_length")), int(g("block_count")), int(g("attention.head_count"))
    KV = int(g("attention.head_count_kv", H))
    _check_positive(path, dim=d, n_layers=L, n_heads=H, n_kv_heads=KV)
    _check_heads(path, d, H, KV)
    hd = int(g("attention.key_length", d // H))
    if "token_embd.weight" not in tinfo:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    vocab = int(list(tinfo["token_embd.weight"].shape)[1])
    common = dict(dim=d, n_layers=L, n_heads=H, n_kv_heads=KV, head_dim=hd, vocab_size=vocab,
                  hidden_dim=int(g("feed_forward_length")), max_seq_len=int(g("context_length", 2048)),
                  norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
                  bos_id=fields.get("tokenizer.ggml.bos_token_id"), eos_id=fields.get("tokenizer.ggml.eos_token_id"))
    if arch == "gemma3":
        window = fields.get("gemma3.attention.sliding_window")
        cfg = _base_config(arch="gemma3", act="gelu_tanh", rope_theta=float(g("rope.freq_base", 1e6)),
                           rope_local_theta=10000.0, sandwich_norm=True, qk_norm=True,
                           embed_scale=float(np.sqrt(d)), attn_scale=hd ** -0.5, sliding_window=window,
                           sliding_layers=[bool((i + 1) % 6) for i in range(L)] if window else None, **common)
    else:
        cfg = _base_config(arch=arch if arch != "llama" else "llama", act="silu",
                           rope_theta=float(g("rope.freq_base", 10000.0)),
                           rotary_dim=int(fields.get(f"{arch}.rope.dimension_count", hd)), **common)
    # RoPE scaling as llama.cpp records it; a scheme we do not implement is refused, not ignored
    kind = fields.get(f"{arch}.rope.scaling.type")
    sf = fields.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none", "linear") and sf is not None and float(sf) not in (0.0, 1.0):
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(sf)}
    elif kind not in (None, "none", "linear"):
        raise ValueError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported; llmint8 implements "
                         f"'none' and 'linear' for GGUF files")
    if "rope_freqs.weight" in tinfo:
        raise ValueError(f"{path}: tensor rope_freqs.weight (per-frequency RoPE factors, as Llama 3.1+ GGUF files "
                         f"store their 'llama3' scaling) is not supported; load the Hugging Face folder instead, "
                         f"whose rope_parameters llmint8 reads")
    cfg["tie_embeddings"] = "output.weight" not in tinfo

    qtypes = set()
    w = {}

    def get(name, required=True):
        t = tinfo.get(name)
        if t is None:
            if required:
                raise ValueError(f"{path}: tensor {name} is missing")
            return None
        qtypes.add(t.tensor_type.name)
        return _dequant(t)

    w["embed"] = get("token_embd.weight")
    w["final_norm.weight"] = get("output_norm.weight")
    w["lm_head.weight"] = w["embed"] if cfg["tie_embeddings"] else get("output.weight")
    names = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm", "attn_q": "attn.q", "attn_k": "attn.k",
             "attn_v": "attn.v", "attn_output": "attn.o", "ffn_up": "mlp.up", "ffn_gate": "mlp.gate",
             "ffn_down": "mlp.down", "post_attention_norm": "post_attn_norm", "post_ffw_norm": "post_ffn_norm",
             "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm"}
    for i in range(L):
        for src, dst in names.items():
            for suffix in ("weight", "bias"):
                a = get(f"blk.{i}.{src}.{suffix}", required=False)
                if a is not None:
                    w[f"layers.{i}.{dst}.{suffix}"] = a
        if arch == "llama":
            p = f"layers.{i}.attn."
            if w.get(p + "q.weight") is not None and w[p + "q.weight"].shape == (H * hd, d):
                w[p + "q.weight"] = _unpermute(w[p + "q.weight"], H)
                if p + "q.bias" in w:
                    w[p + "q.bias"] = _unpermute(w[p + "q.bias"][:, None], H)[:, 0]
            if w.get(p + "k.weight") is not None and w[p + "k.weight"].shape == (KV * hd, d):
                w[p + "k.weight"] = _unpermute(w[p + "k.weight"], KV)
                if p + "k.bias" in w:
                    w[p + "k.bias"] = _unpermute(w[p + "k.bias"][:, None], KV)[:, 0]
    validate_weights(path, cfg, w)
    tok = tokenizer_from_gguf_fields(fields, source=path)
    quant = sorted(q for q in qtypes if q not in ("F32", "F16", "BF16"))
    note = ""
    if quant:
        ft = fields.get("general.file_type")
        ftn = ""
        try:
            ftn = gguf.LlamaFileType(int(ft)).name.replace("MOSTLY_", "") if ft is not None else ""
        except ValueError:
            pass
        note = (f"weights dequantized from {ftn or '/'.join(quant)} GGUF (tensor types {', '.join(quant)}): "
                f"the float baseline is the dequantized model, not the original fp16/bf16 weights")
    name = fields.get("general.name") or os.path.splitext(os.path.basename(path))[0]
    del reader
    return Checkpoint(cfg, w, tok, name=str(name), baseline_note=note, source=path)


# --------------------------------------------------------------------------- dispatch


def load_checkpoint(path: str, tokenizer: str | None = None) -> Checkpoint:
    """Detect the format of ``path`` (file or folder) and load it; the config and weights are
    checked for impossible values (:func:`validate_config`, :func:`validate_finite`)."""
    ck = _load_checkpoint(path, tokenizer)
    validate_config(ck.source or path, ck.config)
    validate_finite(ck.source or path, ck.weights)
    return ck


def _load_checkpoint(path: str, tokenizer: str | None = None) -> Checkpoint:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "config.json")):
            return load_hf(path)
        ggufs = sorted(x for x in os.listdir(path) if x.endswith(".gguf"))
        if len(ggufs) == 1:
            return load_gguf(os.path.join(path, ggufs[0]))
        bins = sorted(x for x in os.listdir(path) if x.endswith(".bin") and not x.startswith("tok"))
        if len(bins) == 1:
            return load_llama2c(os.path.join(path, bins[0]), tokenizer)
        raise ValueError(f"{path}: cannot tell the model format (expected config.json + .safetensors, "
                         f"one .gguf, or one llama2.c .bin)")
    with open(path, "rb") as f:
        magic = f.read(4)
    low = path.lower()
    if magic == _GGUF_MAGIC or low.endswith(".gguf"):
        return load_gguf(path)
    if low.endswith(".safetensors") or low.endswith(".json"):
        return load_hf(os.path.dirname(os.path.abspath(path)))
    return load_llama2c(path, tokenizer)
