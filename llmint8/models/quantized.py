"""Save and load quantized models: llmint8's own format, and Hugging Face + bitsandbytes 8-bit.

Quantize once, keep the result::

    from llmint8.models import load_model, save_quantized
    qm = load_model("smollm2-135m").quantize("llm.int8", calibration_tokens=toks)
    save_quantized(qm, "smollm2-int8")                       # llmint8 format
    save_quantized(qm, "smollm2-bnb", format="bitsandbytes") # what transformers writes
    qm2 = load_model("smollm2-int8")                         # no re-quantizing

**llmint8 format** (``format="llmint8"``), one folder:

- ``config.json``: ``{"llmint8": {...}}`` with ``format`` = ``"llmint8-quantized"``,
  ``format_version`` (1), ``config`` (the canonical model config of
  :mod:`llmint8.models.loaders`), ``method`` ("llm.int8" or "vectorwise"), ``threshold``,
  ``llmint8_version``, ``name``, ``source`` (the float checkpoint), ``source_sha256``,
  ``calibration_tokens`` (how many tokens fixed the outlier columns; 0 = none),
  ``baseline_note``, ``bos_id``/``eos_id`` and ``widen`` (names stored narrower than held,
  losslessly, and widened back to float32 when loaded).
- ``model.safetensors``: per linear layer ``{name}.weight_int8`` I8 (out, in),
  ``{name}.weight_scale`` F32 (out,) (each row's absmax over its non-outlier columns),
  ``{name}.outlier_columns`` I32 (k,) strictly increasing, ``{name}.outlier_weight``
  F16 (out, k), optionally ``{name}.bias`` F32 (out,) -- exactly
  :meth:`llmint8.Int8Linear.to_dict` -- with ``name`` as in ``Model.linear_names``
  (``layers.{i}.attn.q`` ...); every other weight under its canonical name (``embed``,
  ``final_norm.weight``, ``layers.{i}.attn_norm.weight`` ...; ``lm_head.weight`` only when
  not tied) as F32, F16 or BF16.
- the tokenizer: ``tokenizer.json`` (Hugging Face tokenizers) or ``llmint8_tokenizer.json``
  (sentencepiece-style pieces, scores and options).

Loading copies the int8 weights into each layer's own (packed) layout straight from a memory
map of the file, one tensor at a time, and keeps the other weights memory-mapped: nothing is
re-quantized and the logits are bit-identical to those of the model that was saved.

**bitsandbytes format** (``format="bitsandbytes"``): a Hugging Face Llama folder as
transformers' ``save_pretrained`` writes it for a model loaded with ``load_in_8bit=True``:
``config.json`` with ``quantization_config`` (``quant_method`` "bitsandbytes",
``load_in_8bit`` true, ``llm_int8_threshold``, ``llm_int8_skip_modules``), and per quantized
linear module ``{module}.weight`` I8 (out, in) row-major, ``{module}.SCB`` F32 (out,) (the
row's absmax: ``weight ~= int8 * SCB / 127``) and ``{module}.weight_format`` U8 shape ()
equal to 0 ("row"); biases, norms and embeddings stay float. Sharded folders
(``model.safetensors.index.json``) are read across their shards: a module's ``weight`` and
``SCB`` may be in different files. The writer puts the RoPE settings in both
``rope_parameters`` (transformers 5) and ``rope_theta`` / ``rope_scaling`` (transformers 4).
The key names, dtypes and
meanings follow bitsandbytes ``bitsandbytes/nn/modules.py`` (``Int8Params._quantize``,
``Linear8bitLt._save_to_state_dict``, ``maybe_rearrange_weight``) at commit
005a63c2badadd7fb2c45a4b67c1dcbabb72b297 (the revision that saves only the "row" layout, with
``weight_format`` kept for compatibility, and rejects the col32/col_turing/col_ampere codes
1-3 when loading) and transformers ``src/transformers/quantizers/quantizer_bnb_8bit.py`` at
commit 01080c629600d4ff3121446bb4f4a2e240c2cf41 (a pre-quantized ``weight`` must be int8 and
needs its ``SCB``; ``weight_format`` is dropped; Conv1D weights are stored already as
(out, in)). Nothing of their code is used here. A bitsandbytes layer has no known
outlier columns: it maps onto an :class:`llmint8.Int8Linear` with ``weight_scale = SCB``,
no outlier columns and ``threshold = llm_int8_threshold``, which computes LLM.int8() as
bitsandbytes does (columns of x with |x| >= threshold in fp16 against the int8 weight
dequantized). Layers calibrated with known outlier columns are re-quantized over the whole
row when written in this format (the format has no place for fp16 columns).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import warnings

import numpy as np

from .loaders import (_ST_ITEMSIZE, canonical_rope_scaling, expected_shapes, read_safetensors_header,
                      validate_config, validate_finite)

__all__ = ["save_quantized", "load_quantized", "load_bitsandbytes", "detect_quantized_format", "with_bitsandbytes_forward",
           "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "llmint8-quantized"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "llmint8_tokenizer.json"
_QUANT_METHODS = ("llm.int8", "vectorwise")

# the tensors of one saved Int8Linear: key suffix -> (safetensors dtype, shape builder)
_LINEAR_DTYPES = {"weight_int8": "I8", "weight_scale": "F32", "outlier_columns": "I32",
                  "outlier_weight": "F16", "bias": "F32"}
_NP_OF = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "I32": np.int32, "U8": np.uint8,
          "I64": np.int64, "F64": np.float64}
_ST_OF = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int8): "I8",
          np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8"}
_BNB_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


# --------------------------------------------------------------------------- safetensors writing


class _Tensor:
    """One tensor to write: safetensors dtype, shape, and a function returning its bytes."""

    def __init__(self, name, dtype, shape, get):
        self.name, self.dtype, self.shape, self.get = name, dtype, tuple(int(s) for s in shape), get

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * _ST_ITEMSIZE[self.dtype]


def _write_safetensors(path: str, tensors: list, metadata: dict | None = None, progress=None) -> None:
    """Write ``tensors`` (list of _Tensor) as one safetensors file, fetching one tensor's bytes
    at a time (so a model is never held twice), through a temporary file renamed at the end."""
    header, off = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the reference writer does
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            data = t.get()
            if len(data) != t.nbytes:
                raise RuntimeError(f"internal error: tensor {t.name} produced {len(data)} bytes, expected {t.nbytes}")
            f.write(data)
            if progress is not None:
                progress.update(1)
    os.replace(tmp, path)


def _le_bytes(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes()


def _compact(a: np.ndarray):
    """(safetensors dtype, array to store, widened) for a float weight: float32 arrays whose values
    all fit bfloat16 or float16 exactly are stored in 2 bytes (widened back when loaded)."""
    a = np.asarray(a)
    if a.dtype == np.float32 and a.size:
        u = np.ascontiguousarray(a).view(np.uint32)
        if not np.any(u & np.uint32(0xFFFF)):
            return "BF16", (u >> np.uint32(16)).astype(np.uint16), True
        h = a.astype(np.float16)
        if np.array_equal(h.astype(np.float32), a):
            return "F16", h, True
    if a.dtype in (np.float32, np.float16):
        return _ST_OF[a.dtype], a, False
    return "F32", a.astype(np.float32), False


def _sha256_of(path: str) -> str:
    """sha256 of a file, or of a folder's weight files (sorted by name, concatenated)."""
    if not path or not os.path.exists(path):
        return ""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, x) for x in os.listdir(path)
                       if x.endswith((".safetensors", ".gguf", ".bin")) and os.path.isfile(os.path.join(path, x)))
    else:
        files = [path]
    h = hashlib.sha256()
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _progress_bar(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", leave=False)


# --------------------------------------------------------------------------- tokenizer files


def _save_tokenizer(tok, folder: str) -> None:
    from .tokenizers import HFTokenizer, SentencePieceBPETokenizer

    if tok is None:
        return
    if isinstance(tok, HFTokenizer):
        tok.tok.save(os.path.join(folder, "tokenizer.json"))
        return
    if isinstance(tok, SentencePieceBPETokenizer):
        # the compiled pattern is the tokenizer's only record of its user-defined pieces
        user = [p for p in tok.pieces if p and tok._user_re is not None and tok._user_re.fullmatch(p)]
        d = dict(type="sentencepiece_bpe", pieces=tok.pieces, scores=tok.scores, bos_id=tok.bos_id,
                 eos_id=tok.eos_id, space=tok.space, add_dummy_prefix=tok.add_dummy_prefix,
                 special_ids=sorted(tok.special_ids), user_defined=user,
                 bos_token_id=getattr(tok, "bos_token_id", tok.bos_id))
        with open(os.path.join(folder, TOKENIZER_FILE), "w", encoding="utf-8") as f:
            json.dump(d, f, ensure_ascii=False)
        return
    warnings.warn(f"tokenizer of type {type(tok).__name__} is not saved", RuntimeWarning, stacklevel=3)


def _load_tokenizer(folder: str, bos_id=None, eos_id=None):
    from .tokenizers import HFTokenizer, SentencePieceBPETokenizer

    p = os.path.join(folder, TOKENIZER_FILE)
    if os.path.exists(p):
        with open(p, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: not valid JSON ({e})") from None
        try:
            tok = SentencePieceBPETokenizer(d["pieces"], d["scores"], bos_id=d.get("bos_id"), eos_id=d.get("eos_id"),
                                            space=d.get("space", " "), add_dummy_prefix=d.get("add_dummy_prefix", True),
                                            special_ids=d.get("special_ids", ()), user_defined=d.get("user_defined", ()))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{p}: not an llmint8 tokenizer file (missing or malformed {e})") from None
        tok.bos_token_id = d.get("bos_token_id", tok.bos_id)
        return tok
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.exists(tj):
        import tokenizers

        return HFTokenizer(tokenizers.Tokenizer.from_file(tj), bos_id=bos_id, eos_id=eos_id)
    return None


# --------------------------------------------------------------------------- saving


def _int8_layers(model):
    from .transformer import Int8LinearLayer, _FusedPart

    if model.method not in _QUANT_METHODS:
        raise ValueError(f"save_quantized needs a model quantized with method 'llm.int8' (or 'vectorwise'), "
                         f"got method {model.method!r}; call model.quantize('llm.int8', ...) first")
    out = {}
    for n in model.linear_names:
        layer = model.linears[n]
        if isinstance(layer, _FusedPart):  # one part of a fused q/k/v or gate/up layer: its rows
            out[n] = layer.layer
            continue
        if not isinstance(layer, Int8LinearLayer):
            raise ValueError(f"layer {n} is a {type(layer).__name__}, not an llmint8 Int8Linear; "
                             f"only llm.int8 / vectorwise models can be saved")
        out[n] = layer.layer
    return out


def _nonlinear_weights(model) -> dict:
    """Canonical non-linear weights (embeddings, norms, head) without the linear layers' weights."""
    from .device import to_host

    lin = {n + s for n in model.linear_names for s in (".weight", ".bias")}
    w = {k: v for k, v in model.weights.items() if k not in lin}
    if model.config.get("tie_embeddings") and w.get("lm_head.weight") is w.get("embed"):
        w.pop("lm_head.weight", None)
    # a GPU model's weights are copied to the host here, so the files do not depend on the device
    return {k: to_host(v) for k, v in w.items()}


def save_quantized(model, folder: str, format: str = "llmint8", overwrite: bool = False,
                   progress: bool = False) -> str:
    """Save a quantized :class:`~llmint8.models.Model` (from ``model.quantize("llm.int8", ...)``)
    to ``folder`` (created if needed); returns the folder.

    format: "llmint8" (int8 weights, row scales, known outlier columns and their fp16 weights,
        biases, other weights, config, tokenizer and provenance; loads bit-identically) or
        "bitsandbytes" (the Hugging Face + bitsandbytes 8-bit layout, Llama-family models only).
    overwrite: replace a model already saved in ``folder`` (otherwise FileExistsError).
    progress: show a progress bar while writing.

    See the module docstring for both layouts. :func:`llmint8.models.load_model` reads both."""
    if format not in ("llmint8", "bitsandbytes"):
        raise ValueError(f"format must be 'llmint8' or 'bitsandbytes', got {format!r}")
    layers = _int8_layers(model)
    folder = str(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder!r} exists and is not a folder")
    if os.path.isdir(folder) and os.path.exists(os.path.join(folder, "config.json")) and not overwrite:
        raise FileExistsError(f"{folder!r} already holds a model (config.json); pass overwrite=True to replace it")
    if format == "bitsandbytes":
        _check_bnb_writable(model)
    os.makedirs(folder, exist_ok=True)
    if format == "llmint8":
        _save_llmint8(model, layers, folder, progress)
    else:
        _save_bnb(model, layers, folder, progress)
    return folder


def _save_llmint8(model, layers, folder, progress):
    import llmint8

    tensors, widen = [], []
    for n, layer in layers.items():
        cache = {}

        def get(key, n=n, layer=layer, cache=cache):
            # one export per layer, dropped once its last tensor is written
            if not cache:
                cache.update(layer.to_dict())
            a = cache[key]
            data = _le_bytes(a)
            if key == ("bias" if layer.has_bias else "outlier_weight"):
                cache.clear()
            return data

        out, inn, k = layer.out_features, layer.in_features, len(layer.outlier_columns)
        shapes = {"weight_int8": (out, inn), "weight_scale": (out,), "outlier_columns": (k,),
                  "outlier_weight": (out, k), "bias": (out,)}
        for key in ("weight_int8", "weight_scale", "outlier_columns", "outlier_weight") + (("bias",) if layer.has_bias else ()):
            tensors.append(_Tensor(f"{n}.{key}", _LINEAR_DTYPES[key], shapes[key], lambda key=key, get=get: get(key)))
    for name, a in _nonlinear_weights(model).items():
        dt, stored, widened = _compact(a)
        if widened:
            widen.append(name)
        tensors.append(_Tensor(name, dt, stored.shape, lambda s=stored: _le_bytes(s)))
    meta = dict(format=FORMAT_NAME, format_version=FORMAT_VERSION, method=model.method,
                threshold=float(model.threshold if model.threshold is not None else 0.0),
                llmint8_version=llmint8.__version__, name=model.name, source=os.path.abspath(model.source) if model.source else "",
                source_sha256=_sha256_of(model.source), calibration_tokens=int(model.calibration_tokens),
                baseline_note=model.baseline_note, bos_id=model.config.get("bos_id"), eos_id=model.config.get("eos_id"),
                widen=widen, config=model.config)
    bar = _progress_bar(len(tensors), "writing", progress)
    try:
        _write_safetensors(os.path.join(folder, WEIGHTS_FILE), tensors,
                           metadata={"format": FORMAT_NAME, "format_version": FORMAT_VERSION}, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    _save_tokenizer(model.tokenizer, folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"llmint8": meta}, f, indent=1, default=_json_default)


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


# ---- bitsandbytes writer


def _check_bnb_writable(model):
    cfg = model.config
    ok = (cfg["arch"] == "llama" and cfg["gated"] and cfg["act"] == "silu" and cfg["norm"] == "rms"
          and cfg["rope"] in ("half", "interleaved") and not cfg["sandwich_norm"] and not cfg["qk_norm"]
          and not cfg["parallel_residual"] and cfg["embed_scale"] == 1.0 and cfg["attn_scale"] is None
          and not cfg["sliding_window"] and cfg["rotary_dim"] == cfg["head_dim"] and "pos_embed" not in model.weights)
    if not ok:
        raise ValueError(f"format='bitsandbytes' writes Llama-family models only (model arch {cfg['arch']!r}); "
                         f"save this model with format='llmint8'")


def _hf_rope_scaling(cfg):
    """The canonical ``rope_scaling`` as transformers 4 writes it (null for the default scheme)."""
    rs = canonical_rope_scaling(cfg.get("rope_scaling"), "config value rope_scaling")
    return None if rs is None else dict(rs)


def _hf_rope_parameters(cfg):
    """transformers 5's ``rope_parameters``: ``rope_type``, ``rope_theta`` and the scaling keys."""
    rs = _hf_rope_scaling(cfg) or {"rope_type": "default"}
    return dict(rs, rope_theta=float(cfg["rope_theta"]))


def _hf_rows(a, n_heads, rope):
    """Rows of a q/k projection (and its SCB/bias) in Hugging Face order: llama2.c's interleaved
    RoPE pairs (2i, 2i+1) become rotated halves (i, i + hd/2). Row-wise quantities permute exactly."""
    if rope != "interleaved":
        return a
    out = a.shape[0]
    rest = a.shape[1:]
    return np.ascontiguousarray(a.reshape((n_heads, out // n_heads // 2, 2) + rest).swapaxes(1, 2).reshape(a.shape))


def _bnb_quantize_rows(w32: np.ndarray):
    """bitsandbytes' weight quantization: fp16 weight, per-row absmax SCB, int8 = round(w * 127 / SCB)."""
    w = w32.astype(np.float16).astype(np.float32)
    scb = np.abs(w).max(axis=1).astype(np.float32)
    safe = np.where(scb > 0, scb, 1.0).astype(np.float32)
    q = np.clip(np.rint(w * (np.float32(127.0) / safe)[:, None]), -127, 127).astype(np.int8)
    return q, scb


def _save_bnb(model, layers, folder, progress):
    cfg = model.config
    names = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
             "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
             "mlp.down": "mlp.down_proj"}
    tensors, requantized = [], []
    for n, layer in layers.items():
        i, sub = n.split(".", 2)[1], n.split(".", 2)[2]
        hf = f"model.layers.{i}.{names[sub]}"
        heads = {"attn.q": cfg["n_heads"], "attn.k": cfg["n_kv_heads"]}.get(sub)

        def arrays(layer=layer, heads=heads, n=n):
            wq, ws, wo, b = layer._export()
            if len(layer.outlier_columns):
                requantized.append(n)
                wq, ws = _bnb_quantize_rows(layer.dequantized_weight())
            if heads:
                wq, ws = _hf_rows(wq, heads, cfg["rope"]), _hf_rows(ws, heads, cfg["rope"])
                b = None if b is None else _hf_rows(b, heads, cfg["rope"])
            return wq, ws, b

        cache = {}

        def get(j, arrays=arrays, cache=cache):
            if not cache:
                cache["a"] = arrays()
            a = cache["a"][j]
            if j == 2 or (j == 1 and cache["a"][2] is None):
                cache.clear()
            return _le_bytes(a)

        out, inn = layer.out_features, layer.in_features
        tensors.append(_Tensor(hf + ".weight", "I8", (out, inn), lambda get=get: get(0)))
        tensors.append(_Tensor(hf + ".SCB", "F32", (out,), lambda get=get: get(1)))
        tensors.append(_Tensor(hf + ".weight_format", "U8", (), lambda: b"\x00"))
        if layer.has_bias:
            tensors.append(_Tensor(hf + ".bias", "F32", (out,), lambda get=get: get(2)))
    dtypes = set()
    for name, a in _nonlinear_weights(model).items():
        if name == "embed":
            hf = "model.embed_tokens.weight"
        elif name == "final_norm.weight":
            hf = "model.norm.weight"
        elif name == "lm_head.weight":
            hf = "lm_head.weight"
        elif name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            rest = {"attn_norm.weight": "input_layernorm.weight",
                    "ffn_norm.weight": "post_attention_layernorm.weight"}.get(rest)
            if rest is None:
                raise ValueError(f"weight {name!r} has no place in a Llama checkpoint; save with format='llmint8'")
            hf = f"model.layers.{i}.{rest}"
        else:
            raise ValueError(f"weight {name!r} has no place in a Llama checkpoint; save with format='llmint8'")
        a = np.asarray(a)
        if a.dtype not in (np.float16, np.float32):
            a = a.astype(np.float32)
        dtypes.add(a.dtype)
        tensors.append(_Tensor(hf, _ST_OF[a.dtype], a.shape, lambda a=a: _le_bytes(a)))
    bar = _progress_bar(len(tensors), "writing", progress)
    try:
        _write_safetensors(os.path.join(folder, "model.safetensors"), tensors, metadata={"format": "pt"}, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if requantized:
        warnings.warn(f"{len(requantized)} layers with known outlier columns were re-quantized over whole rows for "
                      f"the bitsandbytes format (it keeps no fp16 columns); format='llmint8' keeps them",
                      RuntimeWarning, stacklevel=3)
    has_attn_bias = any(layers[n].has_bias for n in layers if ".attn." in n)
    hc = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg["dim"], "intermediate_size": cfg["hidden_dim"], "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg["n_kv_heads"], "head_dim": cfg["head_dim"],
        "vocab_size": cfg["vocab_size"], "max_position_embeddings": cfg["max_seq_len"],
        "rms_norm_eps": cfg["norm_eps"],
        # transformers 5 reads rope_parameters; transformers 4 reads rope_theta and rope_scaling
        "rope_parameters": _hf_rope_parameters(cfg),
        "rope_theta": float(cfg["rope_theta"]), "rope_scaling": _hf_rope_scaling(cfg),
        "hidden_act": "silu", "tie_word_embeddings": bool(cfg["tie_embeddings"]),
        "attention_bias": has_attn_bias, "mlp_bias": False,
        "bos_token_id": cfg.get("bos_id"), "eos_token_id": cfg.get("eos_id"),
        "torch_dtype": "float32" if np.dtype(np.float32) in dtypes else "float16",
        "quantization_config": {
            "quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False,
            "_load_in_8bit": True, "_load_in_4bit": False,
            "llm_int8_threshold": float(model.threshold if model.threshold is not None else 0.0),
            "llm_int8_skip_modules": ["lm_head"], "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
        },
    }
    _save_tokenizer(model.tokenizer, folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hc, f, indent=1, default=_json_default)


# --------------------------------------------------------------------------- reading


def _read_json(path):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def detect_quantized_format(folder: str) -> str | None:
    """"llmint8" or "bitsandbytes" when ``folder`` holds a quantized model of that format, else None."""
    p = os.path.join(folder, "config.json")
    if not os.path.isdir(folder) or not os.path.exists(p):
        return None
    hc = _read_json(p)
    if not isinstance(hc, dict):
        return None
    if isinstance(hc.get("llmint8"), dict):
        return "llmint8"
    qc = hc.get("quantization_config")
    if isinstance(qc, dict) and (qc.get("load_in_8bit") or qc.get("_load_in_8bit")
                                 or qc.get("load_in_4bit") or qc.get("quant_method") not in (None,)):
        return "bitsandbytes"
    return None


def _mapped(path, data_start, info):
    """A read-only memory map of one tensor (an empty array for zero-size tensors)."""
    dt = info["dtype"]
    shape = tuple(info["shape"])
    a, b = info["data_offsets"]
    if dt == "BF16":
        u16 = _mapped(path, data_start, dict(info, dtype="U16"))
        return (u16.astype(np.uint32) << np.uint32(16)).view(np.float32)
    np_dt = np.dtype(np.uint16 if dt == "U16" else _NP_OF[dt]).newbyteorder("<")
    if b == a:
        return np.zeros(shape, dtype=np_dt)
    return np.memmap(path, dtype=np_dt, mode="r", offset=data_start + a, shape=shape).view(np.ndarray)


def _expect(path, header, name, dtype, shape):
    info = header.get(name)
    if info is None:
        raise ValueError(f"{path}: tensor {name!r} is missing (expected {dtype} {tuple(shape)})")
    if info["dtype"] != dtype:
        raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, expected {dtype}")
    if tuple(info["shape"]) != tuple(shape):
        raise ValueError(f"{path}: tensor {name!r} has shape {tuple(info['shape'])}, expected {tuple(shape)}")


def _check_scale(path, name, s):
    bad = ~np.isfinite(s) | (s < 0)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise ValueError(f"{path}: tensor {name!r} holds {float(s[i])!r} at [{i}]; expected finite row absmax values >= 0")


def _linear_names(cfg):
    names = []
    for i in range(cfg["n_layers"]):
        for n in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up") + (("mlp.gate",) if cfg["gated"] else ()) + ("mlp.down",):
            names.append(f"layers.{i}.{n}")
    return names


def load_quantized(folder: str, dtype: str = "float32", device: str | None = "cpu"):
    """Load a model saved by :func:`save_quantized` (format "llmint8") without re-quantizing.

    Every tensor's dtype and shape is checked against the config, and every offset against the
    file size, before anything large is read; scales must be finite and >= 0 and outlier
    columns strictly increasing in range (ValueError naming the tensor otherwise). Returns a
    :class:`~llmint8.models.Model` whose logits are bit-identical to the saved model's."""
    import llmint8

    from .transformer import Int8LinearLayer, Model

    cpath = os.path.join(folder, "config.json")
    root = _read_json(cpath)
    meta = root.get("llmint8") if isinstance(root, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"{cpath}: no 'llmint8' section; not a model saved by llmint8.models.save_quantized")
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{cpath}: llmint8.format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cpath}: llmint8.format_version is {meta.get('format_version')!r}; this llmint8 "
                         f"reads version {FORMAT_VERSION}")
    method = meta.get("method")
    if method not in _QUANT_METHODS:
        raise ValueError(f"{cpath}: llmint8.method is {method!r}, expected one of {_QUANT_METHODS}")
    thr = meta.get("threshold")
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr) or thr < 0:
        raise ValueError(f"{cpath}: llmint8.threshold is {thr!r}, expected a finite number >= 0")
    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{cpath}: llmint8.config is missing or not an object")
    from .loaders import _base_config

    unknown = sorted(set(cfg) - set(_base_config()))
    if unknown:
        raise ValueError(f"{cpath}: llmint8.config has unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"expected only {', '.join(sorted(_base_config()))}")
    cfg = _base_config(**cfg)
    validate_config(cpath, cfg)
    widen = set(meta.get("widen") or ())

    wpath = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.exists(wpath):
        raise ValueError(f"{folder}: {WEIGHTS_FILE} is missing")
    header, data_start = read_safetensors_header(wpath)
    header.pop("__metadata__", None)
    shapes = expected_shapes(cfg)
    lnames = _linear_names(cfg)
    # ---- plan and check every tensor from the header alone
    seen = set()
    for n in lnames:
        out, inn = shapes[n + ".weight"]
        _expect(wpath, header, n + ".weight_int8", "I8", (out, inn))
        _expect(wpath, header, n + ".weight_scale", "F32", (out,))
        ci = header.get(n + ".outlier_columns")
        if ci is None:
            raise ValueError(f"{wpath}: tensor {n + '.outlier_columns'!r} is missing (expected I32 (k,))")
        if ci["dtype"] != "I32" or len(ci["shape"]) != 1 or ci["shape"][0] > inn:
            raise ValueError(f"{wpath}: tensor {n + '.outlier_columns'!r} is {ci['dtype']} {tuple(ci['shape'])}; "
                             f"expected I32 (k,) with k <= in_features = {inn}")
        k = ci["shape"][0]
        _expect(wpath, header, n + ".outlier_weight", "F16", (out, k))
        seen.update(n + s for s in (".weight_int8", ".weight_scale", ".outlier_columns", ".outlier_weight"))
        if n + ".bias" in header:
            _expect(wpath, header, n + ".bias", "F32", (out,))
            seen.add(n + ".bias")
    for name, shape in shapes.items():
        if name.rsplit(".", 1)[0] in set(lnames):
            continue
        if name == "lm_head.weight" and cfg["tie_embeddings"]:
            continue
        info = header.get(name)
        if info is None:
            raise ValueError(f"{wpath}: tensor {name!r} is missing (expected shape {tuple(shape)})")
        if info["dtype"] not in ("F32", "F16", "BF16"):
            raise ValueError(f"{wpath}: tensor {name!r} has dtype {info['dtype']}, expected F32, F16 or BF16")
        if tuple(info["shape"]) != tuple(shape):
            raise ValueError(f"{wpath}: tensor {name!r} has shape {tuple(info['shape'])}, expected {tuple(shape)}")
        seen.add(name)
    d = cfg["dim"]
    for name, info in header.items():
        if name in seen:
            continue
        # optional float extras: norm biases, learned positions, head bias
        base = name.rsplit(".", 1)[0]
        ok_extra = (name == "pos_embed" or name == "lm_head.bias" or
                    (name.endswith(".bias") and base + ".weight" in shapes and base + ".weight" in seen))
        if not ok_extra:
            raise ValueError(f"{wpath}: unexpected tensor {name!r} for this config")
        if info["dtype"] not in ("F32", "F16", "BF16"):
            raise ValueError(f"{wpath}: tensor {name!r} has dtype {info['dtype']}, expected F32, F16 or BF16")
        want = ((info["shape"][0], d) if name == "pos_embed" else
                (cfg["vocab_size"],) if name == "lm_head.bias" else tuple(shapes[base + ".weight"][:1]))
        if tuple(info["shape"]) != tuple(want) and not (name == "pos_embed" and len(info["shape"]) == 2
                                                        and info["shape"][1] == d):
            raise ValueError(f"{wpath}: tensor {name!r} has shape {tuple(info['shape'])}, expected {tuple(want)}")
        seen.add(name)
    # ---- small arrays: scales and outlier columns
    for n in lnames:
        out, inn = shapes[n + ".weight"]
        _check_scale(wpath, n + ".weight_scale", _mapped(wpath, data_start, header[n + ".weight_scale"]))
        cols = _mapped(wpath, data_start, header[n + ".outlier_columns"])
        if cols.size and (cols.min() < 0 or cols.max() >= inn or np.any(np.diff(cols.astype(np.int64)) <= 0)):
            raise ValueError(f"{wpath}: tensor {n + '.outlier_columns'!r} must be strictly increasing column "
                             f"indices in [0, {inn}); got {cols[:8].tolist()}{' ...' if cols.size > 8 else ''}")
    # ---- build: one layer at a time straight from the memory map
    linears = {}
    for n in lnames:
        d8 = {key: _mapped(wpath, data_start, header[f"{n}.{key}"])
              for key in ("weight_int8", "weight_scale", "outlier_columns", "outlier_weight", "bias")
              if f"{n}.{key}" in header}
        try:
            layer = llmint8.Int8Linear.from_dict(dict(d8, threshold=thr), device=device)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{wpath}: layer {n}: {e}") from None
        del d8  # unmaps this layer's tensors: their pages leave the resident set
        linears[n] = Int8LinearLayer.wrap(layer, method=method)
    weights = {}
    for name in seen:
        if name.rsplit(".", 1)[0] in set(lnames):
            continue
        a = _mapped(wpath, data_start, header[name])
        if name in widen and a.dtype != np.float32:
            a = a.astype(np.float32)
        weights[name] = a
    if cfg["tie_embeddings"]:
        weights["lm_head.weight"] = weights["embed"]
    validate_finite(wpath, weights)
    tok = _load_tokenizer(folder, meta.get("bos_id"), meta.get("eos_id"))
    m = Model(cfg, weights, tok, name=meta.get("name") or os.path.basename(os.path.abspath(folder)), dtype=dtype,
              baseline_note=meta.get("baseline_note") or "", linears=linears, method=method)
    m.threshold = float(thr)
    m.source = meta.get("source") or ""
    m.calibration_tokens = int(meta.get("calibration_tokens") or 0)
    return _on_device(m, device)


def _on_device(m, device):
    """The loaded model with its other (memory-mapped) weights on ``device`` too, when that is a
    GPU; its int8 layers are already there."""
    from .device import is_cuda, parse_device

    if device is not None and is_cuda(parse_device(device)):
        return m.to(device)
    return m


# ---- bitsandbytes reader

_BNB_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma3_text", "gemma3", "opt")


def load_bitsandbytes(folder: str, dtype: str = "float32", device: str | None = "cpu"):
    """Load a Hugging Face checkpoint saved with bitsandbytes 8-bit quantization
    (``quantization_config.load_in_8bit``) as a :class:`~llmint8.models.Model` with
    :class:`llmint8.Int8Linear` layers (``weight_scale = SCB``, no known outlier columns,
    ``threshold = llm_int8_threshold``); modules left float (``llm_int8_skip_modules``) stay
    float. Supported ``model_type``: llama, mistral, qwen2, gemma3, opt. Tensors are resolved
    across shards through ``model.safetensors.index.json``. The tokenizer is ``tokenizer.json``
    or, for one saved by llmint8 without that form, ``llmint8_tokenizer.json``. Raises
    ValueError naming the tensor or key for a malformed checkpoint, before reading any weight
    data."""
    import llmint8

    from ..backends import resolve_device as _resolve_device
    from .loaders import hf_checkpoint, hf_tensor_index, read_hf_config
    from .transformer import FloatLinear, Int8LinearLayer, Model

    hc, cpath = read_hf_config(folder)
    qc = hc.get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{cpath}: quantization_config is missing or not an object")
    if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
        raise ValueError(f"{cpath}: quantization_config.load_in_4bit: 4-bit bitsandbytes checkpoints are not supported "
                         f"(llmint8 reads load_in_8bit checkpoints)")
    if qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        raise ValueError(f"{cpath}: quantization_config.quant_method is {qc.get('quant_method')!r}; "
                         f"only 'bitsandbytes' 8-bit checkpoints are supported")
    if not (qc.get("load_in_8bit") or qc.get("_load_in_8bit")):
        raise ValueError(f"{cpath}: quantization_config.load_in_8bit is not true; expected a bitsandbytes 8-bit checkpoint")
    thr = qc.get("llm_int8_threshold", 6.0)
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr) or thr < 0:
        raise ValueError(f"{cpath}: quantization_config.llm_int8_threshold is {thr!r}; expected a finite number >= 0")
    mt = hc.get("model_type")
    if mt not in _BNB_MODEL_TYPES:
        raise ValueError(f"{cpath}: bitsandbytes 8-bit checkpoints of model_type {mt!r} are not supported; "
                         f"expected one of {', '.join(_BNB_MODEL_TYPES)}")
    # tensors are resolved across shards: a module's int8 weight and its SCB may be in different files
    index = hf_tensor_index(folder)
    tensors, quant, markers = {}, {}, {}
    for name, (path, data_start, info) in index.items():
        if name.endswith(".SCB") or name.endswith(".weight_format"):
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if info["dtype"] == "I8":
            if base is None or base + ".SCB" not in index:
                raise ValueError(f"{path}: int8 tensor {name!r} has no {(base or name) + '.SCB'!r} row scales "
                                 f"in any shard (bitsandbytes stores SCB beside each int8 weight)")
            if len(info["shape"]) != 2 or min(info["shape"]) < 1:
                raise ValueError(f"{path}: int8 weight {name!r} has shape {tuple(info['shape'])}; "
                                 f"expected (out_features, in_features)")
            out = info["shape"][0]
            spath, sstart, sinfo = index[base + ".SCB"]
            _expect(spath, {base + ".SCB": sinfo}, base + ".SCB", "F32", (out,))
            wf = index.get(base + ".weight_format")
            if wf is not None:
                wpath, wstart, wf = wf
                if wf["dtype"] not in ("U8", "I64", "I32") or int(np.prod(wf["shape"], dtype=np.int64)) != 1:
                    raise ValueError(f"{wpath}: tensor {base + '.weight_format'!r} is {wf['dtype']} "
                                     f"{tuple(wf['shape'])}; expected a U8 scalar")
                code = int(_mapped(wpath, wstart, wf).reshape(-1)[0])
                if code != 0:
                    raise ValueError(f"{wpath}: {base}.weight_format is {code} "
                                     f"({_BNB_FORMATS.get(code, 'unknown')}); only 0 (row-major) is supported")
            scb = _mapped(spath, sstart, sinfo)
            _check_scale(spath, base + ".SCB", scb)
            marker = np.broadcast_to(np.zeros((), np.float16), tuple(info["shape"]))
            markers[id(marker)] = base
            quant[base] = (path, data_start, info, (spath, sstart, sinfo))
            tensors[name] = marker
        elif info["dtype"] in ("F32", "F16", "BF16"):
            tensors[name] = (path, data_start, info)
        else:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; expected I8 (with SCB) or a float")
    for name, (path, _, _) in index.items():
        if name.endswith(".SCB") and name[:-4] + ".weight" not in index:
            raise ValueError(f"{path}: {name!r} has no int8 weight {name[:-4] + '.weight'!r} in any shard")
    lazy = {k: v for k, v in tensors.items() if isinstance(v, tuple)}
    for k, (p, ds, info) in lazy.items():
        tensors[k] = _mapped(p, ds, info)
    ck = hf_checkpoint(folder, hc, tensors)
    cfg, w = ck.config, ck.weights
    linears, used = {}, set()
    lnames = _linear_names(cfg)
    for n in lnames:
        a = w.pop(n + ".weight")
        b = w.pop(n + ".bias", None)
        base = markers.get(id(a))
        if base is None:
            linears[n] = FloatLinear(a, b)
            continue
        used.add(base)
        p, ds, info, scb_at = quant[base]
        q = _mapped(p, ds, info)
        layer = llmint8.Int8Linear(q, _mapped(*scb_at), None, None,
                                   None if b is None else np.asarray(b, dtype=np.float32), float(thr),
                                   _resolve_device(device))
        del q
        linears[n] = Int8LinearLayer.wrap(layer)
    for k in ("lm_head.weight",):
        base = markers.get(id(w.get(k)))
        if base is not None:  # a quantized head: dequantize (the head is computed in float)
            used.add(base)
            p, ds, info, scb_at = quant[base]
            w[k] = _mapped(p, ds, info).astype(np.float32) * (_mapped(*scb_at) / np.float32(127.0))[:, None]
            if w.get("embed") is not None and cfg["tie_embeddings"]:
                cfg["tie_embeddings"] = False
    unused = sorted(set(quant) - used)
    if unused or any(id(v) in markers for v in w.values()):
        raise ValueError(f"{folder}: int8 tensors {unused[:4]} do not map onto this model's linear layers")
    validate_finite(folder, w)
    tok = ck.tokenizer
    if tok is None:
        # a tokenizer without a tokenizer.json form (llama2.c's sentencepiece pieces) is saved
        # beside the checkpoint as llmint8_tokenizer.json, in either format
        tok = _load_tokenizer(folder, cfg.get("bos_id"), cfg.get("eos_id"))
    m = Model(cfg, w, tok, name=ck.name, dtype=dtype, linears=linears, method="llm.int8")
    m.threshold = float(thr)
    m.source = os.path.abspath(folder)
    return _on_device(m, device)


def load_quantized_checkpoint(folder: str, kind: str, dtype="float32", device="cpu", row_scale: str = "llmint8"):
    """Dispatch on :func:`detect_quantized_format`'s answer; ``row_scale="bitsandbytes"``
    returns :func:`with_bitsandbytes_forward` of the loaded model."""
    if row_scale not in ROW_SCALES:
        raise ValueError(f"row_scale must be one of {', '.join(map(repr, ROW_SCALES))}, got {row_scale!r}")
    if kind == "llmint8":
        m = load_quantized(folder, dtype=dtype, device=device)
    else:
        m = load_bitsandbytes(folder, dtype=dtype, device=device)
    return with_bitsandbytes_forward(m) if row_scale == "bitsandbytes" else m


# ---- bitsandbytes' forward on the same int8 weights

ROW_SCALES = ("llmint8", "bitsandbytes")


def _bnb_layer_class():
    from .transformer import Int8LinearLayer

    class BitsandbytesForwardLayer(Int8LinearLayer):
        """An :class:`llmint8.Int8Linear` computed as bitsandbytes' ``Linear8bitLt`` computes it
        (:func:`llmint8.compat.bitsandbytes_forward`); keeps a NumPy copy of the int8 weight."""

        method = "llm.int8"

        def __call__(self, x):
            from ..compat import bitsandbytes_forward

            if getattr(self, "_weights", None) is None:
                self._weights = self.layer._export()
            if x.dtype not in (np.float16, np.float32):
                x = x.astype(np.float32)
            return np.asarray(bitsandbytes_forward(self.layer, x, self._weights), dtype=np.float32)

    return BitsandbytesForwardLayer


def with_bitsandbytes_forward(model):
    """A model sharing ``model``'s weights, tokenizer and int8 layers whose int8 layers compute
    bitsandbytes' forward (:func:`llmint8.compat.bitsandbytes_forward`: x cast to fp16 for its
    row scales, which skip only the elements with ``|x| >= threshold`` instead of whole outlier
    columns), for comparing llmint8 with bitsandbytes like with like. Needs a model whose method
    is "llm.int8" (a loaded 8-bit folder or ``model.quantize("llm.int8")``); the copy holds a
    second, unpacked copy of every int8 weight (made at its first call)."""
    from .transformer import Int8LinearLayer, Model, _FusedPart

    if model.method != "llm.int8":
        raise ValueError(f"bitsandbytes' forward needs an LLM.int8() model (method 'llm.int8'), got {model.method!r}")
    cls = _bnb_layer_class()
    linears = {}
    for n in model.linear_names:
        layer = model.linears[n]
        if isinstance(layer, (Int8LinearLayer, _FusedPart)):
            layer = cls.wrap(layer.layer, method=model.method)
        linears[n] = layer
    m = Model(model.config, model.weights, model.tokenizer, name=model.name, dtype=model.dtype,
              baseline_note=model.baseline_note, linears=linears, method=model.method)
    m.threshold, m.source, m.calibration_tokens = model.threshold, model.source, model.calibration_tokens
    return m

