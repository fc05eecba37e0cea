"""A NumPy causal transformer whose linear layers can be swapped for llmint8 quantized layers.

Embeddings, norms and attention stay in float; every linear layer (attention q, k, v, o and
FFN up, gate, down) is one of:

- ``float``: the reference, weights as loaded, float32 accumulation;
- ``fp16``: weights and inputs rounded to float16, float32 accumulation;
- ``llm.int8``: :class:`llmint8.Int8Linear` (vector-wise int8 + fp16 outlier columns);
- ``vectorwise``, ``rowwise``, ``absmax``, ``zeropoint``: :func:`llmint8.matmul` baselines.

Activations are float32, or rounded to float16 after every operation when the model's dtype is
``float16`` (internal arithmetic stays float32 so NumPy can use BLAS).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable

import numpy as np

__all__ = ["Model", "METHODS", "FloatLinear", "Fp16Linear", "Int8LinearLayer", "MatmulLinear", "FusedLinear"]

METHODS = ("float", "fp16", "llm.int8", "vectorwise", "rowwise", "absmax", "zeropoint")


# --------------------------------------------------------------------------- linear layers


class FloatLinear:
    """Reference linear layer: ``y = x @ W.T + b`` with float32 accumulation.

    weight: (out, in) float16/float32; bias: (out,) or None."""

    method = "float"

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None):
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight and bias."""
        return int(self.weight.nbytes + (0 if self.bias is None else self.bias.nbytes))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x: (n, in) float16/float32 -> (n, out) float32."""
        w = self.weight if self.weight.dtype == np.float32 else self.weight.astype(np.float32)
        y = x.astype(np.float32, copy=False) @ w.T
        if self.bias is not None:
            y += self.bias
        return y


class Fp16Linear(FloatLinear):
    """Weights stored in float16, inputs rounded to float16, float32 accumulation (2 B/param)."""

    method = "fp16"

    def __init__(self, weight, bias=None):
        # keep the fp16-rounded values widened to float32 so each call is one BLAS matmul;
        # nbytes reports the 2 bytes per parameter the method stores
        super().__init__(weight.astype(np.float16).astype(np.float32), bias)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight in float16 plus the bias."""
        return int(2 * self.weight.size + (0 if self.bias is None else self.bias.nbytes))

    def __call__(self, x):
        return super().__call__(x.astype(np.float16).astype(np.float32))


class Int8LinearLayer:
    """:class:`llmint8.Int8Linear` behind the common interface (x (n, in) -> (n, out) float32)."""

    method = "llm.int8"

    def __init__(self, weight, bias=None, threshold=6.0, outlier_columns=None, device=None):
        import llmint8

        self.out_features, self.in_features = weight.shape
        self.layer = llmint8.Int8Linear.from_float(
            weight, bias=None if bias is None else np.asarray(bias, dtype=np.float32),
            threshold=threshold, outlier_columns=outlier_columns, device=device)

    @classmethod
    def wrap(cls, layer, method: str = "llm.int8") -> "Int8LinearLayer":
        """Use an existing :class:`llmint8.Int8Linear` (e.g. one loaded from a saved model)."""
        self = cls.__new__(cls)
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.layer = layer
        self.method = method
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the Int8Linear (int8 weight, scales, fp16 outlier columns, bias)."""
        return int(self.layer.nbytes)

    @property
    def outlier_columns(self):
        """The layer's known outlier columns (int32, sorted)."""
        return self.layer.outlier_columns

    def __call__(self, x):
        if x.dtype not in (np.float16, np.float32):
            x = x.astype(np.float32)
        return np.asarray(self.layer(x), dtype=np.float32)


class MatmulLinear:
    """Baseline int8 methods through :func:`llmint8.matmul` (weights re-quantized per call).

    ``nbytes`` counts what the method stores: int8 weight plus its scales (absmax: one float32
    scale; zeropoint: scale + zero point; rowwise: one scale, as its weight is quantized per tensor)."""

    def __init__(self, weight, bias=None, method="vectorwise", threshold=6.0):
        self.method = method
        self.weight = weight if weight.dtype in (np.float16, np.float32) else weight.astype(np.float32)
        self.bias = bias
        self.threshold = threshold
        self.out_features, self.in_features = weight.shape

    @property
    def nbytes(self) -> int:
        """Bytes the method stores: int8 weight, its scale(s), float32 bias."""
        n = self.out_features * self.in_features
        extra = {"absmax": 4, "zeropoint": 8, "rowwise": 4}.get(self.method, 4 * self.out_features)
        return int(n + extra + (0 if self.bias is None else 4 * self.out_features))

    def __call__(self, x):
        import llmint8

        if x.dtype not in (np.float16, np.float32):
            x = x.astype(np.float32)
        y = np.asarray(llmint8.matmul(np.ascontiguousarray(x), self.weight, method=self.method,
                                      threshold=self.threshold), dtype=np.float32)
        if self.bias is not None:
            y = y + self.bias
        return y


class FusedLinear:
    """Several linear layers that read the same input (q/k/v, gate/up) computed as one: their
    weights stacked by rows into one layer of the same kind, so the input is quantized once and
    one GEMM runs instead of several. Row-wise weight scales and per-row activation scales make
    every output element identical to the separate layers' (same int8 products, same scales).

    ``parts``: the names, in output order; ``sizes``: their output features; ``has_bias``: which
    parts had a bias of their own (the stacked bias holds zeros for the others)."""

    def __init__(self, layer, names, sizes, has_bias=None):
        self.layer = layer
        self.names = list(names)
        self.bounds = np.cumsum([0] + list(sizes)).tolist()
        self.has_bias = [True] * len(self.names) if has_bias is None else list(has_bias)

    def __call__(self, x):
        """x: (n, in) -> list of (n, out_i) float32, one per part (views into one array)."""
        y = self.layer(x)
        return [y[:, a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])]


class _FusedPart:
    """One part of a :class:`FusedLinear` behind the single-layer interface (used when a hook
    changes one part's input); ``nbytes`` is that part's share of the fused layer's bytes, the
    parts' shares adding up to the fused total."""

    def __init__(self, fused: FusedLinear, index: int, method: str):
        self.fused, self.index, self.method = fused, index, method
        a, b = fused.bounds[index], fused.bounds[index + 1]
        self.out_features = b - a
        self.in_features = fused.layer.in_features

    @property
    def nbytes(self) -> int:
        """This part's rows' share of the fused layer's bytes (the last part takes the rounding)."""
        total, n = int(self.fused.layer.nbytes), self.fused.bounds[-1]
        a, b = self.fused.bounds[self.index], self.fused.bounds[self.index + 1]
        return total - total * a // n if b == n else total * b // n - total * a // n

    def __call__(self, x):
        return self.fused(x)[self.index]

    @property
    def outlier_columns(self):
        """The known outlier columns, shared by every part (they read the same input)."""
        return self.fused.layer.layer.outlier_columns

    def part_dict(self) -> dict:
        """This part's rows of the fused layer as :meth:`llmint8.Int8Linear.to_dict` arrays
        (copies). Row scales are per output row, so a layer built from them computes this part
        bit for bit. A part that had no bias gets none (not the zeros stacked for it)."""
        d = self.fused.layer.layer.to_dict()
        a, b = self.fused.bounds[self.index], self.fused.bounds[self.index + 1]
        for key in ("weight_int8", "weight_scale", "outlier_weight", "bias"):
            if key in d:
                d[key] = d[key][a:b]
        if not self.fused.has_bias[self.index]:
            d.pop("bias", None)
        return d

    @property
    def layer(self):
        """This part as its own :class:`llmint8.Int8Linear` (a copy, made at each access)."""
        import llmint8

        return llmint8.Int8Linear.from_dict(self.part_dict(), device=self.fused.layer.layer.device)


def _fusable_groups(config) -> list[tuple[str, ...]]:
    groups = []
    for i in range(config["n_layers"]):
        p = f"layers.{i}."
        groups.append((p + "attn.q", p + "attn.k", p + "attn.v"))
        if config["gated"]:
            groups.append((p + "mlp.gate", p + "mlp.up"))
    return groups


def _stack_bias(biases, sizes):
    if all(b is None for b in biases):
        return None
    return np.concatenate([np.zeros(n, np.float32) if b is None else np.asarray(b, np.float32)
                           for b, n in zip(biases, sizes)])


# --------------------------------------------------------------------------- math helpers


def _erf(x):
    # Abramowitz & Stegun 7.1.26, |error| < 1.5e-7: enough for float32 GELU, and NumPy has no erf.
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
               + 0.254829592) * t * np.exp(-a * a)
    return s * y


def _activation(name, x):
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x * x * x)))
    if name == "relu":
        return np.maximum(x, 0)
    raise ValueError(f"unknown activation {name!r}")


def _rope_freqs(cfg, layer):
    rd = cfg["rotary_dim"]
    theta = cfg["rope_theta"]
    # Gemma 3 local (sliding-window) layers use their own base and no scaling
    local = bool(cfg.get("rope_local_theta") and cfg.get("sliding_layers") and cfg["sliding_layers"][layer])
    if local:
        theta = cfg["rope_local_theta"]
    inv = 1.0 / (theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    rs = cfg.get("rope_scaling")
    if rs and not local:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "linear":
            inv = inv / float(rs["factor"])
        elif kind == "llama3":
            # Llama 3.x frequency-dependent scaling
            f, lo, hi = float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
            old = float(rs.get("original_max_position_embeddings", 8192))
            wavelen = 2 * np.pi / inv
            smooth = (old / wavelen - lo) / (hi - lo)
            scaled = np.where(wavelen > old / lo, inv / f, inv)
            mid = (wavelen <= old / lo) & (wavelen >= old / hi)
            inv = np.where(mid, (1 - smooth) * inv / f + smooth * inv, scaled)
        elif kind not in (None, "default"):
            raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv


def _apply_rope(x, pos, inv, style, rd):
    """x: (B, T, heads, hd) float32; pos: (T,) ints. style 'interleaved' rotates pairs (2i, 2i+1)
    (llama2.c); 'half' rotates (i, i + rd/2) (Hugging Face rotate_half / GPT-NeoX)."""
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(ang).astype(np.float32)[None, :, None, :]
    sin = np.sin(ang).astype(np.float32)[None, :, None, :]
    out = x.copy()
    if style == "interleaved":
        x0, x1 = x[..., 0:rd:2], x[..., 1:rd:2]
        out[..., 0:rd:2] = x0 * cos - x1 * sin
        out[..., 1:rd:2] = x0 * sin + x1 * cos
    else:
        h = rd // 2
        x0, x1 = x[..., :h], x[..., h:rd]
        out[..., :h] = x0 * cos - x1 * sin
        out[..., h:rd] = x1 * cos + x0 * sin
    return out


# --------------------------------------------------------------------------- hooks


class HookHandle:
    """Returned by :meth:`Model.add_hook`; ``remove()`` detaches the hook."""

    def __init__(self, registry: list, entry):
        self._registry = registry
        self._entry = entry

    def remove(self) -> None:
        if self._entry in self._registry:
            self._registry.remove(self._entry)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class Recorder:
    """Mapping name -> (N, in_features) float32 array of recorded linear-layer inputs."""

    def __init__(self):
        self._chunks: dict[str, list] = {}

    def _add(self, name, x):
        self._chunks.setdefault(name, []).append(np.array(x, dtype=np.float32, copy=True))

    def __getitem__(self, name) -> np.ndarray:
        parts = self._chunks[name]
        if len(parts) > 1:
            self._chunks[name] = parts = [np.concatenate(parts, axis=0)]
        return parts[0]

    def __contains__(self, name):
        return name in self._chunks

    def keys(self):
        """Names of the layers recorded so far."""
        return list(self._chunks)

    def items(self):
        """(name, (N, in_features) float32 array) pairs."""
        return [(k, self[k]) for k in self._chunks]

    def __len__(self):
        return len(self._chunks)


# --------------------------------------------------------------------------- model


class Model:
    """A causal transformer over canonical weights (see :mod:`llmint8.models.loaders`).

    Attributes: ``name``, ``arch``, ``config`` (dict), ``tokenizer``, ``baseline_note``,
    ``method`` (how the linear layers compute), ``linear_names``, ``n_params``, ``dtype``.
    """

    def __init__(self, config: dict, weights: dict, tokenizer=None, name: str = "", dtype="float32",
                 baseline_note: str = "", linears: dict | None = None, method: str = "float",
                 fused: dict | None = None):
        if np.dtype(dtype) not in (np.float32, np.float16):
            raise ValueError(f"activation dtype {dtype!r} is not supported; expected 'float32' or 'float16'")
        self.config = config
        self.weights = weights
        self.tokenizer = tokenizer
        self.name = name
        self.arch = config["arch"]
        self.dtype = np.dtype(dtype)
        self.baseline_note = baseline_note
        self.method = method
        self.linear_names = []
        for i in range(config["n_layers"]):
            for n in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up") + (("mlp.gate",) if config["gated"] else ()) + ("mlp.down",):
                self.linear_names.append(f"layers.{i}.{n}")
        if linears is None:
            linears = {n: FloatLinear(weights[n + ".weight"], weights.get(n + ".bias")) for n in self.linear_names}
        self.linears = linears
        self._fused = fused or {}  # first name of a group -> FusedLinear computing the whole group
        self._linear_hooks: list = []
        self._attn_hooks: list = []
        self.threshold = None
        # provenance, recorded by load_model / quantize and written by save_quantized
        self.source = ""
        self.calibration_tokens = 0

    # -------------------------------------------------------------- info

    @property
    def n_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        seen, n = set(), 0
        for w in self.weights.values():
            if id(w) not in seen:
                seen.add(id(w))
                n += int(w.size)
        for name, layer in self.linears.items():
            if name + ".weight" not in self.weights:  # loaded already quantized: no float copy
                n += int(layer.out_features * layer.in_features)
                n += int(layer.out_features) if getattr(getattr(layer, "layer", None), "has_bias", False) else 0
        return n

    @property
    def linear_weight_nbytes(self) -> int:
        """Bytes of all linear layers as this model's method stores them: weights (float32/float16
        as loaded for "float", float16 for "fp16", int8 for the int8 methods) plus their scales,
        fp16 outlier columns (llm.int8) and biases (as :attr:`llmint8.Int8Linear.nbytes` counts)."""
        return int(sum(layer.nbytes for layer in self.linears.values()))

    def __repr__(self):
        return (f"Model(name={self.name!r}, arch={self.arch!r}, n_params={self.n_params}, "
                f"method={self.method!r}, dtype={self.dtype.name})")

    # -------------------------------------------------------------- hooks

    def add_hook(self, fn: Callable, kind: str = "linear_input", names: Iterable[str] | None = None) -> HookHandle:
        """Attach a hook.

        kind "linear_input": ``fn(name, x)`` is called before linear layer ``name`` (all, or those in
        ``names``) with x (tokens, in_features) float32, batch and sequence flattened; it may return
        a replacement array of the same shape, or None. kind "attention_probs":
        ``fn(layer_index, probs)`` with probs (batch, heads, q, k) float32 after softmax.
        """
        if kind == "linear_input":
            if names is not None:
                names = set(names)
                unknown = names - set(self.linear_names)
                if unknown:
                    raise ValueError(f"unknown linear layer names {sorted(unknown)[:5]}; see model.linear_names")
            entry = (fn, names)
            self._linear_hooks.append(entry)
            return HookHandle(self._linear_hooks, entry)
        if kind == "attention_probs":
            entry = (fn, None)
            self._attn_hooks.append(entry)
            return HookHandle(self._attn_hooks, entry)
        raise ValueError(f"hook kind {kind!r} is not supported; expected 'linear_input' or 'attention_probs'")

    @contextlib.contextmanager
    def record_inputs(self, names: Iterable[str] | None = None):
        """Context manager recording linear-layer inputs: ``rec[name]`` -> (N, in_features) float32,
        concatenated over the forward calls made inside the block."""
        rec = Recorder()
        h = self.add_hook(lambda name, x: rec._add(name, x), kind="linear_input", names=names)
        try:
            yield rec
        finally:
            h.remove()

    # -------------------------------------------------------------- quantization

    def quantize(self, method: str = "llm.int8", threshold: float = 6.0, device: str | None = "cpu",
                 calibration_tokens=None, progress: bool = False, fuse: bool = True) -> "Model":
        """Return a new model whose linear layers use ``method`` (one of :data:`METHODS`); the
        embeddings, norms and the tokenizer are shared with this model, which is left unchanged.

        For "llm.int8", ``calibration_tokens`` (int array (batch, seq) or (seq,)) first runs this
        model and fixes each layer's outlier columns to those where any |input| >= threshold
        (:func:`llmint8.find_outlier_columns`); without it Int8Linear finds them per call.
        ``device`` ("cpu", "cuda", or None for the best available) applies to llm.int8 and vectorwise
        layers; absmax, rowwise and zeropoint run on the CPU through :func:`llmint8.matmul`.
        ``progress`` shows a progress bar over the layers (tqdm).

        With ``fuse`` (default), llm.int8 and vectorwise layers that read the same input (attention
        q/k/v; gate/up of a gated MLP) are built as one :class:`FusedLinear` (one quantization of
        the input, one GEMM, identical results); ``model.linears[name]`` is then a view of its part
        and ``model._fused`` maps the group's first name to the fused layer. Layers calibrated with
        ``calibration_tokens`` keep their own outlier columns and are never fused."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        if any(n + ".weight" not in self.weights for n in self.linear_names):
            raise ValueError(f"{self.name or 'this model'} was loaded already quantized ({self.method}) and holds "
                             f"no float linear weights to quantize; load the float checkpoint instead")
        outliers = None
        if calibration_tokens is not None and method == "llm.int8":
            outliers = self.calibrate(calibration_tokens, threshold)
        linears = {}
        fused = {}
        if fuse and method in ("llm.int8", "vectorwise") and outliers is None:
            # layers reading the same input become one layer (one quantization of x, one GEMM);
            # with calibrated outlier columns each layer keeps its own, so they stay separate
            thr = threshold if method == "llm.int8" else 0.0
            for group in _fusable_groups(self.config):
                ws = [self.weights[n + ".weight"] for n in group]
                if len({w.shape[1] for w in ws}) != 1 or len({w.dtype for w in ws}) != 1:
                    continue
                sizes = [w.shape[0] for w in ws]
                layer = Int8LinearLayer(np.concatenate(ws, axis=0),
                                        _stack_bias([self.weights.get(n + ".bias") for n in group], sizes),
                                        threshold=thr, device=device)
                fl = FusedLinear(layer, group, sizes, [self.weights.get(n + ".bias") is not None for n in group])
                fused[group[0]] = fl
                for j, n in enumerate(group):
                    linears[n] = _FusedPart(fl, j, method)
        names = [n for n in self.linear_names if n not in linears]
        if progress:
            from tqdm.auto import tqdm

            names = tqdm(names, desc=f"quantizing ({method})", unit="layer", leave=False)
        for n in names:
            w, b = self.weights[n + ".weight"], self.weights.get(n + ".bias")
            if method == "float":
                linears[n] = FloatLinear(w, b)
            elif method == "fp16":
                linears[n] = Fp16Linear(w, b)
            elif method == "llm.int8":
                cols = None if outliers is None else outliers[n]
                linears[n] = Int8LinearLayer(w, b, threshold=threshold, outlier_columns=cols, device=device)
            elif method == "vectorwise":
                # llmint8.matmul's vectorwise is an Int8Linear without decomposition; build it once
                linears[n] = Int8LinearLayer(w, b, threshold=0.0, device=device)
                linears[n].method = "vectorwise"
            else:
                linears[n] = MatmulLinear(w, b, method=method, threshold=threshold)
        m = Model(self.config, self.weights, self.tokenizer, name=self.name, dtype=self.dtype.name,
                  baseline_note=self.baseline_note, linears=linears, method=method, fused=fused)
        m.threshold = threshold if method == "llm.int8" else None
        m.source = self.source
        if outliers is not None:
            m.calibration_tokens = int(np.asarray(calibration_tokens).size)
        return m

    def calibrate(self, tokens, threshold: float = 6.0) -> dict:
        """Run the model over ``tokens`` and return name -> sorted int32 outlier columns."""
        import llmint8

        found = {n: set() for n in self.linear_names}

        def hook(name, x):
            found[name].update(int(c) for c in llmint8.find_outlier_columns(x, threshold=threshold))

        h = self.add_hook(hook)
        try:
            tokens = np.asarray(tokens)
            if tokens.ndim == 1:
                tokens = tokens[None]
            ctx = self.config["max_seq_len"]
            for s in range(0, tokens.shape[1], ctx):
                self.forward(tokens[:, s:s + ctx], logits=False)
        finally:
            h.remove()
        return {n: np.array(sorted(c), dtype=np.int32) for n, c in found.items()}

    # -------------------------------------------------------------- forward

    def _round(self, x):
        if self.dtype == np.float16:
            # overflow to inf is what a float16 model does; reported once per forward below
            with np.errstate(over="ignore", invalid="ignore"):
                return x.astype(np.float16).astype(np.float32)
        return x

    def _hooked(self, names) -> bool:
        return any(ns is None or not ns.isdisjoint(names) for _, ns in self._linear_hooks)

    def _linears(self, names, x):
        """Outputs of the linear layers ``names`` that all read ``x``: one fused call when the
        model has them fused and no hook watches them, else one call each."""
        fl = self._fused.get(names[0])
        if fl is None or fl.names != list(names) or (self._linear_hooks and self._hooked(names)):
            return [self._linear(n, x) for n in names]
        shp = x.shape
        ys = fl(x.reshape(-1, shp[-1]).astype(self.dtype, copy=False))
        return [self._round(np.asarray(y, dtype=np.float32)).reshape(shp[:-1] + (y.shape[-1],)) for y in ys]

    def _linear(self, name, x):
        shp = x.shape
        x2 = x.reshape(-1, shp[-1])
        if self._linear_hooks:
            xf = x2.astype(np.float32, copy=False)
            for fn, names in list(self._linear_hooks):
                if names is None or name in names:
                    r = fn(name, xf)
                    if r is not None:
                        r = np.asarray(r, dtype=np.float32)
                        if r.shape != xf.shape:
                            raise ValueError(f"hook on {name} returned shape {r.shape}, expected {xf.shape}")
                        xf = r
            x2 = xf
        y = self.linears[name](x2.astype(self.dtype, copy=False))
        return self._round(np.asarray(y, dtype=np.float32)).reshape(shp[:-1] + (y.shape[-1],))

    def _norm(self, x, prefix):
        cfg = self.config
        w = self.weights[prefix + ".weight"]
        if cfg["norm"] == "rms":
            ms = np.mean(x * x, axis=-1, keepdims=True)
            y = x / np.sqrt(ms + cfg["norm_eps"]) * w
        else:
            mu = np.mean(x, axis=-1, keepdims=True)
            xc = x - mu
            var = np.mean(xc * xc, axis=-1, keepdims=True)
            y = xc / np.sqrt(var + cfg["norm_eps"]) * w
            b = self.weights.get(prefix + ".bias")
            if b is not None:
                y = y + b
        return self._round(y.astype(np.float32, copy=False))

    def _attention(self, i, h, pos, cache):
        cfg = self.config
        B, T, _ = h.shape
        H, KV, hd = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
        p = f"layers.{i}."
        q, k, v = self._linears((p + "attn.q", p + "attn.k", p + "attn.v"), h)
        q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, KV, hd), v.reshape(B, T, KV, hd)
        if cfg["qk_norm"]:
            q = self._norm(q, p + "attn.q_norm")
            k = self._norm(k, p + "attn.k_norm")
        if cfg["rope"]:
            inv = _rope_freqs(cfg, i)
            q = self._round(_apply_rope(q, pos, inv, cfg["rope"], cfg["rotary_dim"]))
            k = self._round(_apply_rope(k, pos, inv, cfg["rope"], cfg["rotary_dim"]))
        if cache is not None:
            if i in cache:
                k = np.concatenate([cache[i][0], k], axis=1)
                v = np.concatenate([cache[i][1], v], axis=1)
            cache[i] = (k, v)
        S = k.shape[1]
        rep = H // KV
        qh = q.transpose(0, 2, 1, 3).reshape(B, KV, rep * T, hd)          # group query heads by kv head
        kh = k.transpose(0, 2, 3, 1)                                      # (B, KV, hd, S)
        scale = cfg["attn_scale"] if cfg["attn_scale"] is not None else hd ** -0.5
        s = (qh @ kh).reshape(B, H, T, S)
        s *= np.float32(scale)
        sliding = cfg["sliding_window"] if cfg["sliding_window"] and cfg["sliding_layers"] and \
            cfg["sliding_layers"][i] else 0
        mask = self._mask(int(pos[0]), T, S, sliding)
        if mask is not None:
            s += mask
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        for fn, _ in list(self._attn_hooks):
            fn(i, s)
        vh = v.transpose(0, 2, 1, 3)                                      # (B, KV, S, hd)
        o = (s.reshape(B, KV, rep * T, S) @ vh).reshape(B, H, T, hd)
        o = self._round(o.transpose(0, 2, 1, 3).reshape(B, T, H * hd))
        return self._linear(p + "attn.o", o)

    def _mask(self, start: int, T: int, S: int, sliding: int):
        """Additive attention mask (T, S) float32, 0 where query t (position start + t) may see key
        s (position start + T - S + s), -inf elsewhere; None when nothing is masked. Cached: every
        layer of a forward pass uses the same one or two."""
        key = (start, T, S, sliding)
        cache = self.__dict__.setdefault("_mask_cache", {})
        m = cache.get(key, False)
        if m is False:
            pos = np.arange(start, start + T)
            kpos = np.arange(S) + (start + T - S)
            hide = kpos[None, :] > pos[:, None]
            if sliding:
                hide |= (pos[:, None] - kpos[None, :]) >= sliding
            m = np.where(hide, np.float32(-np.inf), np.float32(0)) if hide.any() else None
            if len(cache) > 64:
                cache.clear()
            cache[key] = m
        return m

    def _mlp(self, i, h):
        cfg = self.config
        p = f"layers.{i}."
        if cfg["gated"]:
            g, up = self._linears((p + "mlp.gate", p + "mlp.up"), h)
            a = self._round(_activation(cfg["act"], g) * up)
        else:
            a = self._round(_activation(cfg["act"], self._linear(p + "mlp.up", h)))
        return self._linear(p + "mlp.down", a)

    def hidden_states(self, tokens, start_pos: int = 0, cache: dict | None = None) -> np.ndarray:
        """Final-normed hidden states (batch, seq, dim) float32 for int tokens (batch, seq)."""
        x = self.embed(tokens, start_pos=start_pos)
        x = self.run_blocks(x, 0, self.config["n_layers"], start_pos=start_pos, cache=cache)
        with np.errstate(invalid="ignore", over="ignore"):
            h = self._norm(x, "final_norm")
        if self.dtype == np.float16 and not np.all(np.isfinite(h)):
            warnings.warn(f"{self.name or 'model'}: activations overflowed float16 (|x| > 65504) and produced "
                          f"inf/NaN; run this model with dtype='float32'", RuntimeWarning, stacklevel=3)
        return h

    def embed(self, tokens, start_pos: int = 0) -> np.ndarray:
        """The input of the first transformer block (batch, seq, dim) float32 for int tokens
        (batch, seq) (a 1-D sequence is treated as batch 1): token (and position) embeddings.
        ``hidden_states`` is ``embed``, then :meth:`run_blocks` over every block, then the final norm."""
        cfg = self.config
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be an int array (batch, seq), got shape {tokens.shape} dtype {tokens.dtype}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens must hold at least one position")
        if tokens.min() < 0 or tokens.max() >= cfg["vocab_size"]:
            raise ValueError(f"token ids must lie in [0, {cfg['vocab_size']}), got range "
                             f"[{tokens.min()}, {tokens.max()}]")
        pos = np.arange(start_pos, start_pos + T)
        if "pos_embed" in self.weights and pos[-1] + cfg["pos_offset"] >= self.weights["pos_embed"].shape[0]:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds the model's {cfg['max_seq_len']}")
        x = self.weights["embed"][tokens].astype(np.float32)
        if cfg["embed_scale"] != 1.0:
            x = x * np.float32(cfg["embed_scale"])
        if "pos_embed" in self.weights:
            x = x + self.weights["pos_embed"][pos + cfg["pos_offset"]].astype(np.float32)[None]
        return self._round(x)

    def run_blocks(self, x: np.ndarray, start: int, stop: int, start_pos: int = 0,
                   cache: dict | None = None) -> np.ndarray:
        """Run transformer blocks ``start`` .. ``stop - 1`` on the residual stream ``x`` (batch,
        seq, dim) float32 (the output of :meth:`embed`, or of an earlier ``run_blocks``) and
        return theirs. Running blocks 0..i-1 once and then block i several times computes,
        bit for bit, what full forward passes would: the outlier analysis reuses that prefix."""
        n = self.config["n_layers"]
        if not 0 <= start <= stop <= n:
            raise ValueError(f"expected 0 <= start <= stop <= n_layers={n}, got start={start} stop={stop}")
        pos = np.arange(start_pos, start_pos + x.shape[1])
        quiet = np.errstate(over="ignore", invalid="ignore") if self.dtype == np.float16 else contextlib.nullcontext()
        with quiet:
            return self._layers(x, pos, cache, start, stop)

    def _layers(self, x, pos, cache, start=0, stop=None):
        cfg = self.config
        for i in range(start, cfg["n_layers"] if stop is None else stop):
            p = f"layers.{i}."
            if cfg["parallel_residual"]:
                a = self._attention(i, self._norm(x, p + "attn_norm"), pos, cache)
                m = self._mlp(i, self._norm(x, p + "ffn_norm"))
                x = self._round(x + a + m)
                continue
            a = self._attention(i, self._norm(x, p + "attn_norm"), pos, cache)
            if cfg["sandwich_norm"]:
                a = self._norm(a, p + "post_attn_norm")
            x = self._round(x + a)
            m = self._mlp(i, self._norm(x, p + "ffn_norm"))
            if cfg["sandwich_norm"]:
                m = self._norm(m, p + "post_ffn_norm")
            x = self._round(x + m)
        return x

    def logits_from_hidden(self, h: np.ndarray) -> np.ndarray:
        """Classifier: h (..., dim) float32 -> logits (..., vocab) float32."""
        w = self.weights["lm_head.weight"]
        if w.dtype != np.float32:
            w = w.astype(np.float32)
        y = h @ w.T
        b = self.weights.get("lm_head.bias")
        if b is not None:
            y += b
        return y.astype(np.float32, copy=False)

    def forward(self, tokens, logits: bool = True, start_pos: int = 0, cache: dict | None = None):
        """Run the model. tokens: int array (batch, seq) (a 1-D sequence is treated as batch 1).

        Returns logits (batch, seq, vocab) float32, or the final hidden states (batch, seq, dim)
        when ``logits=False``. ``start_pos``/``cache`` continue a sequence incrementally (a dict
        the model fills with per-layer keys and values)."""
        h = self.hidden_states(tokens, start_pos=start_pos, cache=cache)
        return self.logits_from_hidden(h) if logits else h

    __call__ = forward

    def generate(self, prompt_ids, n: int, stop_at_eos: bool = False) -> list[int]:
        """Greedy decoding: returns the ``n`` new token ids (list of int) following ``prompt_ids``
        (stopping early at EOS when ``stop_at_eos``). Uses a key/value cache; the window is the
        model's ``max_seq_len``."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("prompt_ids must hold at least one token (e.g. the BOS id)")
        out: list[int] = []
        cache: dict = {}
        h = self.hidden_states(np.array([ids]), start_pos=0, cache=cache)
        pos = len(ids)
        for _ in range(n):
            nxt = int(np.argmax(self.logits_from_hidden(h[0, -1])))
            out.append(nxt)
            if stop_at_eos and nxt == self.config.get("eos_id"):
                break
            if pos >= self.config["max_seq_len"]:
                break
            h = self.hidden_states(np.array([[nxt]]), start_pos=pos, cache=cache)
            pos += 1
        return out
