"""A NumPy causal transformer whose linear layers can be swapped for llmint8 quantized layers.

Embeddings, norms and attention stay in float; every linear layer (attention q, k, v, o and
FFN up, gate, down) is one of:

- ``float``: the reference, weights as loaded, float32 accumulation;
- ``fp16``: weights and inputs rounded to float16, float32 accumulation;
- ``llm.int8``: :class:`llmint8.Int8Linear` (vector-wise int8 + fp16 outlier columns);
- ``vectorwise``, ``rowwise``, ``absmax``, ``zeropoint``: :func:`llmint8.matmul` baselines.

Activations are float32, or rounded to float16 after every operation when the model's dtype is
``float16`` (internal arithmetic stays float32 so NumPy can use BLAS).

The forward is written once against an array namespace ``xp``: NumPy on the CPU, CuPy on a
CUDA GPU (``Model.to("cuda")``, ``load_model(..., device="cuda")``). On the GPU the weights, the
key/value cache and every activation stay on the device; token ids go in and logits (CuPy
arrays) come out. Incremental decoding uses a preallocated :class:`KVCache`
(``model.new_cache()``, ``model.step(ids, cache)``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable

import numpy as np

from .. import _C
from . import device as _dev

__all__ = ["Model", "METHODS", "KVCache", "Decoder", "FloatLinear", "Fp16Linear", "Int8LinearLayer", "MatmulLinear",
           "FusedLinear"]

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
        """x: (n, in) float16/float32 -> (n, out) float32 (NumPy or CuPy, as the weight)."""
        w = self.weight if self.weight.dtype == np.float32 else self.weight.astype(np.float32)
        y = x.astype(np.float32, copy=False) @ w.T
        if self.bias is not None:
            y += self.bias
        return y

    def to(self, device: str, move=None) -> "FloatLinear":
        """This layer with its arrays on ``device`` (``move``: array -> moved array, shared with
        the model so that tied weights are moved once)."""
        move = move or _mover(device)
        return FloatLinear(move(self.weight), None if self.bias is None else move(self.bias))


class Fp16Linear(FloatLinear):
    """Weights stored in float16, inputs rounded to float16, float32 accumulation (2 B/param)."""

    method = "fp16"

    def __init__(self, weight, bias=None):
        if _dev.xp_of(weight) is np:
            # keep the fp16-rounded values widened to float32 so each call is one BLAS matmul;
            # nbytes reports the 2 bytes per parameter the method stores
            super().__init__(weight.astype(np.float16).astype(np.float32), bias)
            self.half = False
        else:
            # on the GPU: the weight held in fp16 and one fp16 cuBLAS GEMM per call (fp32
            # accumulation, output rounded to fp16): the baseline GPU users compare against
            super().__init__(weight.astype(np.float16), bias)
            self.half = True

    @property
    def nbytes(self) -> int:
        """Bytes of the weight in float16 plus the bias."""
        return int(2 * self.weight.size + (0 if self.bias is None else self.bias.nbytes))

    def __call__(self, x):
        if self.half:
            y = (x.astype(np.float16) @ self.weight.T).astype(np.float32)
            if self.bias is not None:
                y += self.bias
            return y
        return super().__call__(x.astype(np.float16).astype(np.float32))

    def to(self, device: str, move=None) -> "Fp16Linear":
        """This layer on ``device`` (the fp16 values are kept exactly)."""
        move = move or _mover(device)
        return Fp16Linear(move(self.weight), None if self.bias is None else move(self.bias))


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
        xp = _dev.xp_of(x)
        if xp is np:
            return np.asarray(self.layer(x), dtype=np.float32)
        # a CuPy input goes to the CUDA layer by DLPack, and its DeviceArray output comes back the
        # same way: no copy, no host synchronization, all on the current stream
        y = xp.from_dlpack(self.layer.forward(xp.ascontiguousarray(x), out_dtype=np.float32))
        return y

    def to(self, device: str, move=None) -> "Int8LinearLayer":
        """This layer on ``device`` (its int8 weights copied as they are: no re-quantizing)."""
        if _same_device(self.layer.device, device):
            return self
        out = Int8LinearLayer.wrap(self.layer.to(_layer_device(device)), self.method)
        return out


def _layer_device(device: str) -> str:
    # llmint8.Int8Linear names devices "cpu" / "cuda:N"
    return device if device == "cpu" or ":" in device else "cuda:0"


def _same_device(a: str, b: str) -> bool:
    return _layer_device(_dev.parse_device(a)) == _layer_device(_dev.parse_device(b))


def _mover(device: str):
    """array -> the same array on ``device``, each distinct array moved once (tied weights stay tied)."""
    xp = _dev.namespace(device)
    done: dict = {}

    def move(a):
        if a is None:
            return None
        r = done.get(id(a))
        if r is None:
            r = done[id(a)] = (a, _dev.to_xp(a, xp))
        return r[1]
    return move


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
        xp = _dev.xp_of(x)
        if xp is not np:
            # absmax / rowwise / zeropoint have no GPU form: x goes to the host and back
            y = xp.asarray(self(_dev.to_host(x)))
            return y
        y = np.asarray(llmint8.matmul(np.ascontiguousarray(x), self.weight, method=self.method,
                                      threshold=self.threshold), dtype=np.float32)
        if self.bias is not None:
            y = y + self.bias
        return y

    def to(self, device: str, move=None) -> "MatmulLinear":
        """The same layer: its weight stays on the host, where these baselines compute."""
        return self


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

    def to(self, device: str, move=None) -> "FusedLinear":
        """This fused layer on ``device``."""
        sizes = [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        return FusedLinear(self.layer.to(device, move), self.names, sizes, self.has_bias)


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


def _base_layer(layer):
    """The layer that computes: a fused part's whole fused layer, else the layer itself."""
    return layer.fused.layer if isinstance(layer, _FusedPart) else layer


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
    """Inverse RoPE frequencies (rotary_dim // 2,) float64 of layer ``layer``: ``theta ** (-2i / d)``
    with the config's scaling (``rope_scaling``; on Gemma 3's sliding-window layers
    ``rope_local_theta`` and ``rope_local_scaling``), as transformers computes them."""
    rd = cfg["rotary_dim"]
    # Gemma 3 local (sliding-window) layers have their own base and scaling
    local = bool(cfg.get("rope_local_theta") and cfg.get("sliding_layers") and cfg["sliding_layers"][layer])
    theta = cfg["rope_local_theta"] if local else cfg["rope_theta"]
    rs = cfg.get("rope_local_scaling") if local else cfg.get("rope_scaling")
    inv = 1.0 / (theta ** (np.arange(0, rd, 2, dtype=np.float64) / rd))
    kind = rs.get("rope_type", rs.get("type")) if rs else None
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "llama3":
        # Llama 3.x: long wavelengths divided by factor, short ones kept, a smooth blend between
        f, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        old = float(rs["original_max_position_embeddings"])
        wavelen = 2 * np.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv / f, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return np.where(mid, (1 - smooth) * inv / f + smooth * inv, scaled)
    raise ValueError(f"RoPE type {kind!r} is not supported; llmint8 implements 'default', 'linear', 'llama3'")


def _rope_table(inv, n: int):
    """cos and sin (n, len(inv)) float32 of positions 0..n-1 times ``inv``: the angle in float64,
    rounded to float32 after cos/sin, so row p equals what position p alone would give."""
    ang = np.arange(n)[:, None].astype(np.float64) * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _apply_rope(x, cos, sin, style, rd):
    """x: (B, T, heads, hd) float32; cos, sin: (T, rd/2) float32 for the T positions (rows of
    :func:`_rope_table`). style 'interleaved' rotates pairs (2i, 2i+1) (llama2.c); 'half' rotates
    (i, i + rd/2) (Hugging Face rotate_half / GPT-NeoX)."""
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
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


# --------------------------------------------------------------------------- key/value cache


class KVCache:
    """Preallocated keys and values for incremental decoding, on the model's device.

    Per layer, keys and values of shape (batch, capacity, n_kv_heads, head_dim) in the
    activation dtype's float32 arithmetic; positions ``0 .. length-1`` are filled. A forward with
    ``start_pos=p`` writes its T positions at ``p .. p+T-1`` (``p <= length``: continuing, or
    rewinding to reuse a prefix) and attends to positions ``0 .. p+T-1`` as views, without the
    copy of the whole cache that concatenating costs at every step. When a forward would pass the
    capacity, the arrays grow (doubling, up to the model's ``max_seq_len``; one copy each time).

    Make one with :meth:`Model.new_cache`; ``reset()`` empties it for a new sequence."""

    def __init__(self, model: "Model", batch: int = 1, capacity: int | None = None):
        cfg = model.config
        if int(batch) < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        limit = int(cfg["max_seq_len"])
        cap = min(256, limit) if capacity is None else int(capacity)
        if not 1 <= cap <= limit:
            raise ValueError(f"capacity must be in [1, max_seq_len={limit}], got {capacity}")
        self.xp = model.xp
        self.batch = int(batch)
        self.max_len = limit
        self.shape = (int(cfg["n_kv_heads"]), int(cfg["head_dim"]))
        self.length = 0
        self._k = [None] * cfg["n_layers"]
        self._v = [None] * cfg["n_layers"]
        self._alloc(cap)

    @property
    def capacity(self) -> int:
        """Positions the arrays hold now."""
        return self._cap

    def _alloc(self, cap: int) -> None:
        xp = self.xp
        for i in range(len(self._k)):
            k = xp.zeros((self.batch, cap) + self.shape, np.float32)
            v = xp.zeros((self.batch, cap) + self.shape, np.float32)
            if self._k[i] is not None:
                n = self.length
                k[:, :n] = self._k[i][:, :n]
                v[:, :n] = self._v[i][:, :n]
            self._k[i], self._v[i] = k, v
        self._cap = cap

    def reset(self) -> None:
        """Forget every position (the arrays are kept for the next sequence)."""
        self.length = 0

    def _reserve(self, start: int, T: int, B: int) -> None:
        """Check a forward of T positions from ``start`` and grow the arrays to hold it."""
        if B != self.batch:
            raise ValueError(f"this cache holds a batch of {self.batch}; got tokens of batch {B}")
        if start > self.length:
            raise ValueError(f"start_pos={start} would leave a gap: the cache holds {self.length} positions "
                             f"(expected start_pos <= {self.length})")
        end = start + T
        if end > self.max_len:
            raise ValueError(f"sequence of {end} positions exceeds the model's {self.max_len}")
        if end > self._cap:
            cap = self._cap
            while cap < end:
                cap *= 2
            self._alloc(min(cap, self.max_len))

    def _write(self, layer: int, start: int, k, v):
        """Store k, v (B, T, KV, hd) at positions start.. and return the views of 0 .. start+T-1."""
        end = start + k.shape[1]
        K, V = self._k[layer], self._v[layer]
        K[:, start:end] = k
        V[:, start:end] = v
        return K[:, :end], V[:, :end]


class Decoder:
    """Token-at-a-time decoding with fixed shapes, for the GPU's launch-bound small batches.

    ``prefill(ids)`` runs the prompt (an ordinary forward into a :class:`KVCache` of
    ``capacity`` positions) and returns the last position's logits; each ``next(id)`` then runs
    one position with every shape fixed: attention spans the whole capacity with a mask built
    on the device from the position, RoPE rows and the cache slot are picked on the device. So
    nothing waits for the host, and on a GPU (``graph=True``, the default there) the step is
    captured once into a CUDA graph (its scratch memory in a pool of its own) and every later
    token is one graph launch. Logits come back as (1, vocab) float32 arrays of the model's
    device; with a graph the array is the graph's output buffer, overwritten by the next step.

    The fixed-shape step sums attention over more (masked, zero) terms than an ordinary
    forward, so its logits agree with :meth:`Model.step`'s to float32 rounding, not bit for bit.
    Linear-layer and attention hooks are not run by the fixed-shape step (ValueError)."""

    def __init__(self, model: "Model", capacity: int | None = None, graph: bool | None = None):
        self.model = model
        self.xp = model.xp
        cap = model.config["max_seq_len"] if capacity is None else int(capacity)
        self.cache = model.new_cache(capacity=cap)
        self.graph = (self.xp is not np) if graph is None else bool(graph)
        if self.graph and self.xp is np:
            raise ValueError("graph=True needs a model on a GPU (CUDA graphs)")
        self._tok = self.xp.zeros((1, 1), np.int64)
        self._pos = self.xp.zeros((1,), np.int64)
        self._graph = None
        self._out = None
        self._pool = None
        self.kernels = None  # kernel nodes of the captured step, once captured
        self.capture_error = None  # why a capture failed (decoding then runs without a graph)

    @property
    def length(self) -> int:
        """Positions decoded so far (prompt included)."""
        return self.cache.length

    def reset(self) -> None:
        """Start a new sequence (the cache and a captured graph are kept)."""
        self.cache.reset()

    def prefill(self, ids):
        """Run the prompt ``ids`` (int sequence, >= 1 token) after what the cache holds; returns
        the last position's logits (1, vocab). The cache never grows past its capacity: that
        would move its arrays away from a step graph captured on them."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        c = self.cache
        if c.length + ids.shape[1] > c.capacity:
            raise ValueError(f"the decoder's capacity of {c.capacity} positions cannot take {ids.shape[1]} more "
                             f"after {c.length}; make one with a larger capacity")
        return self.model.step(ids, c)

    def next(self, token: int):
        """Run one token at the next position; returns its logits (1, vocab)."""
        m, c = self.model, self.cache
        if m._linear_hooks or m._attn_hooks:
            raise ValueError("the fixed-shape decoding step does not run hooks; remove them or use model.step")
        if c.length >= c.capacity:
            raise ValueError(f"the decoder's capacity of {c.capacity} positions is full")
        token = int(token)
        if not 0 <= token < m.config["vocab_size"]:
            raise ValueError(f"token id {token} is not in [0, {m.config['vocab_size']})")
        # the new id and position go to the device asynchronously, ahead of the step
        self._tok.fill(token)
        self._pos.fill(c.length)
        if self.graph and self._graph is None:
            try:
                self._capture()
            except Exception as e:  # noqa: BLE001 - a library that cannot be captured: run eagerly
                self.graph, self.capture_error = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self._graph = self._out = None
                warnings.warn(f"CUDA graph capture of the decoding step failed ({self.capture_error}); "
                              f"decoding without a graph", RuntimeWarning, stacklevel=2)
        if not self.graph:
            if m._cuda_layers():
                _dev.use_current_stream(self.xp)
            out = m._static_step(self._tok, self._pos, c)
        else:
            self._graph.launch()
            out = self._out
        c.length += 1
        return out

    def _capture(self):
        xp = self.xp
        m, c = self.model, self.cache
        cuda_layers = m._cuda_layers()
        # capture needs a stream of its own; it must see the work queued so far (the prompt's
        # cache entries, the new id and position) on the current stream
        xp.cuda.get_current_stream().synchronize()
        # the graph's scratch memory comes from a pool nobody else allocates from, so the
        # blocks it reuses at every replay are never handed to other arrays in between
        self._pool = xp.cuda.MemoryPool()
        stream = xp.cuda.Stream(non_blocking=True)
        try:
            with xp.cuda.using_allocator(self._pool.malloc), stream:
                if cuda_layers:
                    _dev.use_current_stream(xp)
                m._static_step(self._tok, self._pos, c)  # warm-up: kernels compiled, pool filled
                stream.begin_capture()
                try:
                    out = m._static_step(self._tok, self._pos, c)
                finally:
                    graph = stream.end_capture()
                stream.synchronize()
        finally:
            if cuda_layers:
                _dev.use_current_stream(xp)  # llmint8 back on the stream outside the capture
        self._graph, self._out = graph, out
        self.kernels = graph_kernel_nodes(graph)


def graph_kernel_nodes(graph):
    """Kernel nodes of a captured CuPy CUDA graph (how many kernels one replay launches), or None
    when the driver cannot be asked."""
    import ctypes

    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    n = ctypes.c_size_t(0)
    if cu.cuGraphGetNodes(ctypes.c_void_p(graph.graph), None, ctypes.byref(n)) != 0:
        return None
    nodes = (ctypes.c_void_p * n.value)()
    cu.cuGraphGetNodes(ctypes.c_void_p(graph.graph), nodes, ctypes.byref(n))
    kernels = 0
    for node in nodes:
        t = ctypes.c_int(-1)
        cu.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t))
        kernels += t.value == 0  # CU_GRAPH_NODE_TYPE_KERNEL
    return kernels


# --------------------------------------------------------------------------- model


class Model:
    """A causal transformer over canonical weights (see :mod:`llmint8.models.loaders`).

    Attributes: ``name``, ``arch``, ``config`` (dict), ``tokenizer``, ``baseline_note``,
    ``method`` (how the linear layers compute), ``linear_names``, ``n_params``, ``dtype``,
    ``device`` ("cpu" or "cuda[:N]") and ``xp`` (numpy or cupy: the arrays' module).

    ``weights`` and the layers must already live on ``device``: use :meth:`to` to move a model.
    """

    def __init__(self, config: dict, weights: dict, tokenizer=None, name: str = "", dtype="float32",
                 baseline_note: str = "", linears: dict | None = None, method: str = "float",
                 fused: dict | None = None, device: str = "cpu"):
        if np.dtype(dtype) not in (np.float32, np.float16):
            raise ValueError(f"activation dtype {dtype!r} is not supported; expected 'float32' or 'float16'")
        self.device = _dev.parse_device(device)
        self.xp = _dev.namespace(self.device)
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
        dev = "" if self.device == "cpu" else f", device={self.device!r}"
        return (f"Model(name={self.name!r}, arch={self.arch!r}, n_params={self.n_params}, "
                f"method={self.method!r}, dtype={self.dtype.name}{dev})")

    # -------------------------------------------------------------- device

    def to(self, device: str) -> "Model":
        """This model with every array on ``device`` ("cpu", "cuda", "cuda:N"): weights, norms,
        embeddings and layers are copied one array at a time (int8 layers keep their quantized
        weights: nothing is re-quantized); tied weights stay one array. Returns ``self`` when it is
        there already. Raises DeviceError (a RuntimeError) when CuPy or the GPU is missing, and
        for int8 layers when llmint8's CUDA backend is."""
        device = _dev.parse_device(device)
        if device == self.device or (_dev.is_cuda(device) and _dev.is_cuda(self.device) and
                                     _layer_device(device) == _layer_device(self.device)):
            return self
        move = _mover(device)
        if _dev.is_cuda(device) and any(isinstance(_base_layer(x), Int8LinearLayer) for x in self.linears.values()):
            _dev.require_llmint8_cuda()
        weights = {k: move(v) for k, v in self.weights.items()}
        fused = {k: fl.to(device, move) for k, fl in self._fused.items()}
        by_group = {fl.names[0]: new for fl, new in zip(self._fused.values(), fused.values())}
        linears = {}
        for n, layer in self.linears.items():
            if isinstance(layer, _FusedPart):
                linears[n] = _FusedPart(by_group[layer.fused.names[0]], layer.index, layer.method)
            else:
                linears[n] = layer.to(device, move)
        m = Model(self.config, weights, self.tokenizer, name=self.name, dtype=self.dtype.name,
                  baseline_note=self.baseline_note, linears=linears, method=self.method, fused=fused,
                  device=device)
        m.threshold, m.source, m.calibration_tokens = self.threshold, self.source, self.calibration_tokens
        return m

    def new_cache(self, batch: int = 1, capacity: int | None = None) -> KVCache:
        """A preallocated :class:`KVCache` on this model's device for ``batch`` sequences;
        ``capacity`` positions (default 256, growing as needed up to ``max_seq_len``)."""
        return KVCache(self, batch=batch, capacity=capacity)

    def decoder(self, capacity: int | None = None, graph: bool | None = None) -> "Decoder":
        """A :class:`Decoder` for one sequence of up to ``capacity`` positions (default
        ``max_seq_len``); ``graph`` (default: on a GPU) replays each step as one CUDA graph."""
        return Decoder(self, capacity=capacity, graph=graph)

    def step(self, tokens, cache: KVCache):
        """Decode step: run ``tokens`` (int (batch, T), or (T,) for batch 1; T >= 1: a prompt,
        then one id at a time) after the ``cache.length`` positions the cache holds, and return
        the logits of the last position, (batch, vocab) float32 (CuPy on a GPU model)."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache from model.new_cache(), got {type(cache).__name__}")
        h = self.hidden_states(tokens, start_pos=cache.length, cache=cache)
        return self.logits_from_hidden(h[:, -1])

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

    def quantize(self, method: str = "llm.int8", threshold: float = 6.0, device: str | None = None,
                 calibration_tokens=None, progress: bool = False, fuse: bool = True) -> "Model":
        """Return a new model whose linear layers use ``method`` (one of :data:`METHODS`); the
        embeddings, norms and the tokenizer are shared with this model, which is left unchanged.

        For "llm.int8", ``calibration_tokens`` (int array (batch, seq) or (seq,)) first runs this
        model and fixes each layer's outlier columns to those where any |input| >= threshold
        (:func:`llmint8.find_outlier_columns`); without it Int8Linear finds them per call.
        ``device`` ("cpu", "cuda", "cuda:N"; None: this model's device) is where the new model lives,
        all of it (see :meth:`to`). On a GPU, float runs fp32 cuBLAS GEMMs, fp16 holds the weight in
        fp16 and runs fp16 cuBLAS GEMMs, llm.int8 and vectorwise run llmint8's CUDA layers; their
        weights are quantized by the same C code as on the CPU (one layer at a time through the
        host, so a saved model is identical whichever device quantized it). absmax, rowwise and
        zeropoint have no GPU form: they compute on the host through :func:`llmint8.matmul`.
        ``progress`` shows a progress bar over the layers (tqdm).

        With ``fuse`` (default), llm.int8 and vectorwise layers that read the same input (attention
        q/k/v; gate/up of a gated MLP) are built as one :class:`FusedLinear` (one quantization of
        the input, one GEMM, identical results); ``model.linears[name]`` is then a view of its part
        and ``model._fused`` maps the group's first name to the fused layer. Layers calibrated with
        ``calibration_tokens`` keep their own outlier columns and are never fused."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        device = self.device if device is None else _dev.parse_device(device)
        if _dev.is_cuda(device):
            _dev.namespace(device)
            if method in ("llm.int8", "vectorwise"):
                _dev.require_llmint8_cuda()
        ldev = _layer_device(device)
        host = _dev.to_host
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
                bs = [self.weights.get(n + ".bias") for n in group]
                layer = Int8LinearLayer(np.concatenate([host(w) for w in ws], axis=0),
                                        _stack_bias([None if b is None else host(b) for b in bs], sizes),
                                        threshold=thr, device=ldev)
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
                linears[n] = Int8LinearLayer(host(w), None if b is None else host(b), threshold=threshold,
                                             outlier_columns=cols, device=ldev)
            elif method == "vectorwise":
                # llmint8.matmul's vectorwise is an Int8Linear without decomposition; build it once
                linears[n] = Int8LinearLayer(host(w), None if b is None else host(b), threshold=0.0, device=ldev)
                linears[n].method = "vectorwise"
            else:
                linears[n] = MatmulLinear(host(w), None if b is None else host(b), method=method,
                                          threshold=threshold)
        m = Model(self.config, self.weights, self.tokenizer, name=self.name, dtype=self.dtype.name,
                  baseline_note=self.baseline_note, linears=linears, method=method, fused=fused,
                  device=self.device)
        m.threshold = threshold if method == "llm.int8" else None
        m.source = self.source
        if outliers is not None:
            m.calibration_tokens = int(np.asarray(calibration_tokens).size)
        return m.to(device)

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
        return [self._round(y.astype(np.float32, copy=False)).reshape(shp[:-1] + (y.shape[-1],)) for y in ys]

    def _linear(self, name, x):
        shp = x.shape
        x2 = x.reshape(-1, shp[-1])
        if self._linear_hooks:
            x2 = self._run_linear_hooks(name, x2)
        y = self.linears[name](x2.astype(self.dtype, copy=False))
        return self._round(y.astype(np.float32, copy=False)).reshape(shp[:-1] + (y.shape[-1],))

    def _run_linear_hooks(self, name, x2):
        # hooks see NumPy arrays on every device: on a GPU model only the inputs of the layers a
        # hook watches are copied to the host (and a replacement copied back)
        gpu = self.xp is not np
        xf = None
        for fn, names in list(self._linear_hooks):
            if names is None or name in names:
                if xf is None:
                    xf = _dev.to_host(x2).astype(np.float32, copy=False)
                r = fn(name, xf)
                if r is not None:
                    r = np.asarray(r, dtype=np.float32)
                    if r.shape != xf.shape:
                        raise ValueError(f"hook on {name} returned shape {r.shape}, expected {xf.shape}")
                    xf = r
        if xf is None:
            return x2
        return self.xp.asarray(xf) if gpu else xf

    def _norm(self, x, prefix):
        cfg = self.config
        xp = self.xp
        w = self.weights[prefix + ".weight"]
        if cfg["norm"] == "rms":
            ms = xp.mean(x * x, axis=-1, keepdims=True)
            y = x / xp.sqrt(ms + cfg["norm_eps"]) * w
        else:
            mu = xp.mean(x, axis=-1, keepdims=True)
            xc = x - mu
            var = xp.mean(xc * xc, axis=-1, keepdims=True)
            y = xc / xp.sqrt(var + cfg["norm_eps"]) * w
            b = self.weights.get(prefix + ".bias")
            if b is not None:
                y = y + b
        return self._round(y.astype(np.float32, copy=False))

    def _rope(self, i, start: int, T: int):
        """cos, sin (T, rotary_dim/2) float32 of positions start .. start+T-1 for layer i, from a
        table per distinct frequency set (grown by doubling, kept on the model's device)."""
        invs = self.__dict__.setdefault("_rope_inv", {})
        inv = invs.get(i)
        if inv is None:
            inv = invs[i] = _rope_freqs(self.config, i)
        tabs = self.__dict__.setdefault("_rope_tabs", {})
        key = inv.tobytes()
        tab = tabs.get(key)
        end = start + T
        if tab is None or tab[0].shape[0] < end:
            n = 256
            while n < end:
                n *= 2
            cos, sin = _rope_table(inv, n)
            tab = tabs[key] = (self.xp.asarray(cos), self.xp.asarray(sin))
        return tab[0][start:end], tab[1][start:end]

    def _attention(self, i, h, start, cache):
        cfg = self.config
        xp = self.xp
        B, T, _ = h.shape
        H, KV, hd = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
        p = f"layers.{i}."
        q, k, v = self._linears((p + "attn.q", p + "attn.k", p + "attn.v"), h)
        q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, KV, hd), v.reshape(B, T, KV, hd)
        if cfg["qk_norm"]:
            q = self._norm(q, p + "attn.q_norm")
            k = self._norm(k, p + "attn.k_norm")
        if cfg["rope"]:
            cos, sin = self._rope(i, start, T)
            q = self._round(_apply_rope(q, cos, sin, cfg["rope"], cfg["rotary_dim"]))
            k = self._round(_apply_rope(k, cos, sin, cfg["rope"], cfg["rotary_dim"]))
        if isinstance(cache, KVCache):
            k, v = cache._write(i, start, k, v)
        elif cache is not None:
            if i in cache:
                k = xp.concatenate([cache[i][0], k], axis=1)
                v = xp.concatenate([cache[i][1], v], axis=1)
            cache[i] = (k, v)
        S = k.shape[1]
        rep = H // KV
        scale = cfg["attn_scale"] if cfg["attn_scale"] is not None else hd ** -0.5
        sliding = cfg["sliding_window"] if cfg["sliding_window"] and cfg["sliding_layers"] and \
            cfg["sliding_layers"][i] else 0
        if T == 1 and xp is np and not self._attn_hooks:
            # one new position (decoding): one pass over the cache in C instead of two thin
            # BLAS products, which pack the whole cache on every call (most of a token's
            # attention time at hundreds of positions); the window is the mask's for T = 1.
            # Every cache kind takes this path, so they keep giving the same bits.
            kc, vc = (cache._k[i], cache._v[i]) if isinstance(cache, KVCache) else (k, v)
            o = _C.attention_decode(q.reshape(B, H, hd), kc, vc, S, scale, max(0, S - sliding) if sliding else 0)
            return self._linear(p + "attn.o", self._round(o.reshape(B, 1, H * hd)))
        qh = q.transpose(0, 2, 1, 3).reshape(B, KV, rep * T, hd)          # group query heads by kv head
        kh = k.transpose(0, 2, 3, 1)                                      # (B, KV, hd, S)
        s = (qh @ kh).reshape(B, H, T, S)
        s *= np.float32(scale)
        mask = self._mask(start, T, S, sliding)
        if mask is not None:
            s += mask
        s -= s.max(axis=-1, keepdims=True)
        xp.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        for fn, _ in list(self._attn_hooks):
            fn(i, s if xp is np else _dev.to_host(s))
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
            if m is not None and self.xp is not np:
                m = self.xp.asarray(m)
            if len(cache) > 64:
                cache.clear()
            cache[key] = m
        return m

    def _attention_static(self, i, h, pos, mask, cache):
        """One decoding position at the device-held position ``pos`` ((1,) int), attending over
        the cache's whole capacity with ``mask`` hiding the positions not yet written: every
        step has the same shapes (see :class:`Decoder`)."""
        cfg = self.config
        B = h.shape[0]
        H, KV, hd = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
        p = f"layers.{i}."
        q, k, v = self._linears((p + "attn.q", p + "attn.k", p + "attn.v"), h)
        q, k, v = q.reshape(B, 1, H, hd), k.reshape(B, 1, KV, hd), v.reshape(B, 1, KV, hd)
        if cfg["qk_norm"]:
            q = self._norm(q, p + "attn.q_norm")
            k = self._norm(k, p + "attn.k_norm")
        if cfg["rope"]:
            cos, sin = self._rope(i, 0, cache.capacity)
            cos, sin = cos[pos], sin[pos]
            q = self._round(_apply_rope(q, cos, sin, cfg["rope"], cfg["rotary_dim"]))
            k = self._round(_apply_rope(k, cos, sin, cfg["rope"], cfg["rotary_dim"]))
        K, V = cache._k[i], cache._v[i]
        K[:, pos] = k
        V[:, pos] = v
        S = K.shape[1]
        rep = H // KV
        qh = q.transpose(0, 2, 1, 3).reshape(B, KV, rep, hd)
        scale = cfg["attn_scale"] if cfg["attn_scale"] is not None else hd ** -0.5
        s = (qh @ K.transpose(0, 2, 3, 1)).reshape(B, H, 1, S)
        s *= np.float32(scale)
        sliding = cfg["sliding_window"] if cfg["sliding_window"] and cfg["sliding_layers"] and \
            cfg["sliding_layers"][i] else 0
        s += mask[1] if sliding else mask[0]
        s -= s.max(axis=-1, keepdims=True)
        self.xp.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        o = (s.reshape(B, KV, rep, S) @ V.transpose(0, 2, 1, 3)).reshape(B, H, 1, hd)
        o = self._round(o.transpose(0, 2, 1, 3).reshape(B, 1, H * hd))
        return self._linear(p + "attn.o", o)

    def _static_step(self, tok, pos, cache):
        """Logits (1, vocab) of token ``tok`` ((1, 1) int, on the device) at position ``pos``
        ((1,) int, on the device) with fixed shapes: no host transfer, no synchronization."""
        cfg = self.config
        xp = self.xp
        kpos = xp.arange(cache.capacity)
        hide = kpos[None, :] > pos[:, None]
        neg = np.float32(-np.inf)
        mask = [xp.where(hide, neg, np.float32(0))]
        if cfg["sliding_window"]:
            mask.append(xp.where(hide | ((pos[:, None] - kpos[None, :]) >= cfg["sliding_window"]), neg,
                                 np.float32(0)))
        x = self.weights["embed"][tok].astype(np.float32)
        if cfg["embed_scale"] != 1.0:
            x = x * np.float32(cfg["embed_scale"])
        if "pos_embed" in self.weights:
            x = x + self.weights["pos_embed"][pos + cfg["pos_offset"]].astype(np.float32)[None]
        x = self._round(x)
        for i in range(cfg["n_layers"]):
            pf = f"layers.{i}."
            if cfg["parallel_residual"]:
                a = self._attention_static(i, self._norm(x, pf + "attn_norm"), pos, mask, cache)
                m = self._mlp(i, self._norm(x, pf + "ffn_norm"))
                x = self._round(x + a + m)
                continue
            a = self._attention_static(i, self._norm(x, pf + "attn_norm"), pos, mask, cache)
            if cfg["sandwich_norm"]:
                a = self._norm(a, pf + "post_attn_norm")
            x = self._round(x + a)
            m = self._mlp(i, self._norm(x, pf + "ffn_norm"))
            if cfg["sandwich_norm"]:
                m = self._norm(m, pf + "post_ffn_norm")
            x = self._round(x + m)
        return self.logits_from_hidden(self._norm(x, "final_norm")[:, -1])

    def _mlp(self, i, h):
        cfg = self.config
        p = f"layers.{i}."
        if cfg["gated"]:
            g, up = self._linears((p + "mlp.gate", p + "mlp.up"), h)
            a = self._round(_activation(cfg["act"], g) * up)
        else:
            a = self._round(_activation(cfg["act"], self._linear(p + "mlp.up", h)))
        return self._linear(p + "mlp.down", a)

    def hidden_states(self, tokens, start_pos: int = 0, cache: "dict | KVCache | None" = None):
        """Final-normed hidden states (batch, seq, dim) float32 for int tokens (batch, seq), on the
        model's device (NumPy or CuPy). ``cache``: a :class:`KVCache` (or a dict, the older form).
        It is :meth:`embed`, then :meth:`run_blocks` over every block, then the final norm."""
        xp = self.xp
        x = self.embed(tokens, start_pos=start_pos, cache=cache)
        x = self.run_blocks(x, 0, self.config["n_layers"], start_pos=start_pos, cache=cache)
        if isinstance(cache, KVCache):
            cache.length = int(start_pos) + x.shape[1]
        with np.errstate(invalid="ignore", over="ignore"):
            h = self._norm(x, "final_norm")
        if self.dtype == np.float16 and not bool(xp.all(xp.isfinite(h))):
            warnings.warn(f"{self.name or 'model'}: activations overflowed float16 (|x| > 65504) and produced "
                          f"inf/NaN; run this model with dtype='float32'", RuntimeWarning, stacklevel=3)
        return h

    def embed(self, tokens, start_pos: int = 0, cache: "dict | KVCache | None" = None):
        """The input of the first transformer block (batch, seq, dim) float32 for int tokens
        (batch, seq) (a 1-D sequence is treated as batch 1), on the model's device: token (and
        position) embeddings. Checks the ids and positions, and reserves room in ``cache`` (a
        :class:`KVCache`) for them."""
        cfg = self.config
        xp = self.xp
        on_device = xp is not np and _dev.xp_of(tokens) is xp
        if not on_device:
            tokens = np.asarray(tokens) if isinstance(tokens, (list, tuple)) else _dev.to_host(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be an int array (batch, seq), got shape {tokens.shape} dtype {tokens.dtype}")
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens must hold at least one position")
        # ids already on the GPU are not range-checked: that would wait for the device (and a
        # forward that waits cannot be captured into a CUDA graph)
        if not on_device and (tokens.min() < 0 or tokens.max() >= cfg["vocab_size"]):
            raise ValueError(f"token ids must lie in [0, {cfg['vocab_size']}), got range "
                             f"[{tokens.min()}, {tokens.max()}]")
        start_pos = int(start_pos)
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        if "pos_embed" in self.weights and start_pos + T - 1 + cfg["pos_offset"] >= self.weights["pos_embed"].shape[0]:
            raise ValueError(f"sequence of {start_pos + T} positions exceeds the model's {cfg['max_seq_len']}")
        if isinstance(cache, KVCache):
            if cache.xp is not xp:
                raise ValueError("this KVCache belongs to a model on another device; make one with model.new_cache()")
            cache._reserve(start_pos, T, B)
        if xp is not np:
            if not on_device:
                tokens = xp.asarray(tokens)  # the one host-to-device transfer of a forward
            if self._cuda_layers():
                _dev.use_current_stream(xp)
        x = self.weights["embed"][tokens].astype(np.float32)
        if cfg["embed_scale"] != 1.0:
            x = x * np.float32(cfg["embed_scale"])
        if "pos_embed" in self.weights:
            off = start_pos + cfg["pos_offset"]
            x = x + self.weights["pos_embed"][off:off + T].astype(np.float32)[None]
        return self._round(x)

    def run_blocks(self, x, start: int, stop: int, start_pos: int = 0, cache: "dict | KVCache | None" = None):
        """Run transformer blocks ``start`` .. ``stop - 1`` on the residual stream ``x`` (batch,
        seq, dim) float32 (the output of :meth:`embed`, or of an earlier ``run_blocks``) and
        return theirs. Running blocks 0..i-1 once and then block i several times computes,
        bit for bit, what full forward passes would: the outlier analysis reuses that prefix."""
        n = self.config["n_layers"]
        if not 0 <= start <= stop <= n:
            raise ValueError(f"expected 0 <= start <= stop <= n_layers={n}, got start={start} stop={stop}")
        quiet = np.errstate(over="ignore", invalid="ignore") if self.dtype == np.float16 else contextlib.nullcontext()
        with quiet:
            return self._layers(x, int(start_pos), cache, start, stop)

    def _cuda_layers(self) -> bool:
        """Whether any layer is an llmint8 CUDA layer (whose stream must follow CuPy's)."""
        v = self.__dict__.get("_has_cuda_layers")
        if v is None:
            v = self._has_cuda_layers = any(
                isinstance(_base_layer(x), Int8LinearLayer) and str(_base_layer(x).layer.device).startswith("cuda")
                for x in self.linears.values())
        return v

    def _layers(self, x, start, cache, first_block=0, stop_block=None):
        """Blocks first_block .. stop_block - 1 (default: all) for positions from ``start``."""
        cfg = self.config
        for i in range(first_block, cfg["n_layers"] if stop_block is None else stop_block):
            p = f"layers.{i}."
            if cfg["parallel_residual"]:
                a = self._attention(i, self._norm(x, p + "attn_norm"), start, cache)
                m = self._mlp(i, self._norm(x, p + "ffn_norm"))
                x = self._round(x + a + m)
                continue
            a = self._attention(i, self._norm(x, p + "attn_norm"), start, cache)
            if cfg["sandwich_norm"]:
                a = self._norm(a, p + "post_attn_norm")
            x = self._round(x + a)
            m = self._mlp(i, self._norm(x, p + "ffn_norm"))
            if cfg["sandwich_norm"]:
                m = self._norm(m, p + "post_ffn_norm")
            x = self._round(x + m)
        return x

    def logits_from_hidden(self, h):
        """Classifier: h (..., dim) float32 -> logits (..., vocab) float32 (on the model's device)."""
        w = self.weights["lm_head.weight"]
        if w.dtype != np.float32:
            w = w.astype(np.float32)
        y = h @ w.T
        b = self.weights.get("lm_head.bias")
        if b is not None:
            y += b
        return y.astype(np.float32, copy=False)

    def forward(self, tokens, logits: bool = True, start_pos: int = 0, cache: "dict | KVCache | None" = None):
        """Run the model. tokens: int array (batch, seq) (a 1-D sequence is treated as batch 1).

        Returns logits (batch, seq, vocab) float32, or the final hidden states (batch, seq, dim)
        when ``logits=False``, as arrays of the model's device (NumPy, or CuPy on a GPU).
        ``start_pos``/``cache`` continue a sequence incrementally: a :class:`KVCache` from
        :meth:`new_cache` (or a dict the model fills with per-layer keys and values)."""
        h = self.hidden_states(tokens, start_pos=start_pos, cache=cache)
        return self.logits_from_hidden(h) if logits else h

    __call__ = forward

    def generate(self, prompt_ids, n: int, stop_at_eos: bool = False) -> list[int]:
        """Greedy decoding: returns the ``n`` new token ids (list of int) following ``prompt_ids``
        (stopping early at EOS when ``stop_at_eos``). Uses a preallocated :class:`KVCache`; the
        window is the model's ``max_seq_len``."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("prompt_ids must hold at least one token (e.g. the BOS id)")
        xp = self.xp
        out: list[int] = []
        cache = self.new_cache(capacity=min(self.config["max_seq_len"], len(ids) + max(int(n), 1)))
        h = self.hidden_states(np.array([ids]), start_pos=0, cache=cache)
        pos = len(ids)
        for _ in range(n):
            nxt = int(xp.argmax(self.logits_from_hidden(h[0, -1])))
            out.append(nxt)
            if stop_at_eos and nxt == self.config.get("eos_id"):
                break
            if pos >= self.config["max_seq_len"]:
                break
            h = self.hidden_states(np.array([[nxt]]), start_pos=pos, cache=cache)
            pos += 1
        return out
