"""Synthetic models with the layer shapes of real ones: random weights, outlier features injected.

For checks and benchmarks where a real checkpoint is too large to carry (a GPU machine without
network, a test that must stay fast): the same :class:`~llmint8.models.Model` as a loaded
checkpoint, with Llama-style blocks of a real model's dimensions (all of them, or the first few).

Weights are normal with std 1/sqrt(fan-in) (an untied embedding std 1). As in the paper's large models,
a few hidden feature dimensions -- the same in every layer -- carry outliers: the norm gains of
those dimensions are drawn from ``magnitude`` (20-30 by default) instead of 1, so every
attention and FFN input holds columns with |x| well above the LLM.int8() threshold of 6.

    from llmint8.models.synthetic import synthetic_model
    m = synthetic_model("smollm2-135m")               # SmolLM2-135M's shapes, 30 blocks
    m = synthetic_model("llama3-8b", n_layers=2)      # two Llama-3-8B blocks
"""

from __future__ import annotations

import numpy as np

from .loaders import _base_config
from .transformer import Model

__all__ = ["SHAPES", "synthetic_model"]

SHAPES = {
    # a few-kB model for tests: grouped-query attention, every code path of a Llama block
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=512, max_seq_len=512),
    # SmolLM2-135M (config.json of HuggingFaceTB/SmolLM2-135M)
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                         max_seq_len=8192, rope_theta=100000.0),
    # Llama-3-8B (config.json of meta-llama/Meta-Llama-3-8B)
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256,
                      max_seq_len=8192, rope_theta=500000.0, tie_embeddings=False),
}


def synthetic_model(shape: str = "tiny", n_layers: int | None = None, seed: int = 0,
                    outlier_fraction: float = 0.001, magnitude=(20.0, 30.0), dtype: str = "float32",
                    **config) -> Model:
    """A float :class:`Model` with ``shape``'s dimensions (a key of :data:`SHAPES`) and random
    weights; ``n_layers`` keeps the first few blocks; ``config`` overrides any canonical config
    key (e.g. ``vocab_size``, ``sliding_window``). ``max(1, round(outlier_fraction * dim))``
    hidden dimensions get norm gains drawn from ``magnitude``. No tokenizer (token ids in)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    kw = dict(SHAPES[shape])
    if n_layers is not None:
        if int(n_layers) < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        kw["n_layers"] = int(n_layers)
    kw.update(config)
    cfg = _base_config(**kw)
    cfg["arch"] = f"synthetic-{shape}"
    rng = np.random.default_rng(seed)
    d, hd, H, KV, F, V = (cfg["dim"], cfg["head_dim"], cfg["n_heads"], cfg["n_kv_heads"], cfg["hidden_dim"],
                          cfg["vocab_size"])
    n_out = max(1, int(round(outlier_fraction * d))) if outlier_fraction > 0 else 0
    cols = np.sort(rng.choice(d, size=n_out, replace=False))

    def linear(out, inn):
        w = rng.standard_normal((out, inn), dtype=np.float32)
        w *= np.float32(1.0 / np.sqrt(inn))
        return w

    def gain(width=d, outliers=True):
        g = np.ones(width, np.float32)
        if outliers and n_out:
            g[cols] = rng.uniform(magnitude[0], magnitude[1], size=n_out).astype(np.float32)
        return g

    # a tied embedding is also the classifier: std 1/sqrt(dim) keeps the logits O(1)
    emb = rng.standard_normal((V, d), dtype=np.float32)
    if cfg["tie_embeddings"]:
        emb *= np.float32(1.0 / np.sqrt(d))
    w = {"embed": emb, "final_norm.weight": gain(outliers=False)}
    w["lm_head.weight"] = w["embed"] if cfg["tie_embeddings"] else linear(V, d)
    for i in range(cfg["n_layers"]):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = gain()
        w[p + "ffn_norm.weight"] = gain()
        w[p + "attn.q.weight"] = linear(H * hd, d)
        w[p + "attn.k.weight"] = linear(KV * hd, d)
        w[p + "attn.v.weight"] = linear(KV * hd, d)
        w[p + "attn.o.weight"] = linear(d, H * hd)
        w[p + "mlp.up.weight"] = linear(F, d)
        if cfg["gated"]:
            w[p + "mlp.gate.weight"] = linear(F, d)
        w[p + "mlp.down.weight"] = linear(d, F)
        if cfg["qk_norm"]:
            w[p + "attn.q_norm.weight"] = gain(hd, outliers=False)
            w[p + "attn.k_norm.weight"] = gain(hd, outliers=False)
        if cfg["sandwich_norm"]:
            w[p + "post_attn_norm.weight"] = gain(outliers=False)
            w[p + "post_ffn_norm.weight"] = gain(outliers=False)
    name = shape if n_layers is None else f"{shape}[{cfg['n_layers']} blocks]"
    m = Model(cfg, w, None, name=f"synthetic {name}", dtype=dtype,
              baseline_note="random weights with injected outlier features (synthetic)")
    m.outlier_dims = cols.astype(np.int32)
    return m
