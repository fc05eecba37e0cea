"""Fused linear layers (q/k/v and gate/up computed as one Int8Linear): the same numbers, bytes
and hooks as separate layers."""
from __future__ import annotations

import numpy as np
import pytest

from data_paths import STORIES_BIN, require
from llmint8.models.transformer import Int8LinearLayer, Model


@pytest.fixture(scope="module")
def stories():
    from llmint8.models import load_model

    require(*STORIES_BIN)
    return load_model("stories260K")


def _separate(m, method):
    thr = 6.0 if method == "llm.int8" else 0.0
    layers = {n: Int8LinearLayer(m.weights[n + ".weight"], m.weights.get(n + ".bias"), threshold=thr)
              for n in m.linear_names}
    return Model(m.config, m.weights, m.tokenizer, name=m.name, linears=layers, method=method)


@pytest.mark.parametrize("method", ["llm.int8", "vectorwise"])
def test_fused_equals_separate(stories, method):
    q = stories.quantize(method)
    assert len(q._fused) == 2 * stories.config["n_layers"]  # q/k/v and gate/up in every block
    sep = _separate(stories, method)
    tokens = np.random.default_rng(0).integers(3, stories.config["vocab_size"], (2, 40))
    tokens[:, 5] = 1
    # identical int8 products and scales per output element: equal, not merely close
    assert np.array_equal(q.forward(tokens), sep.forward(tokens))
    assert q.linear_weight_nbytes == sep.linear_weight_nbytes
    for n in ("layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v", "layers.1.mlp.up"):
        assert q.linears[n].out_features == sep.linears[n].out_features


def test_fused_model_hooks_see_and_change_each_input(stories):
    q = stories.quantize("llm.int8")
    sep = _separate(stories, "llm.int8")
    tokens = np.arange(3, 40)[None]
    names = ["layers.1.attn.q", "layers.1.attn.v", "layers.2.mlp.gate"]
    with q.record_inputs(names) as rq, sep.record_inputs(names) as rs:
        q.forward(tokens)
        sep.forward(tokens)
    for n in names:
        assert np.array_equal(rq[n], rs[n])

    def zero_first(name, x):
        x = x.copy()
        x[:, 0] = 0
        return x

    for m in (q, sep):
        m.add_hook(zero_first, names=["layers.1.attn.k"])
    a, b = q.forward(tokens), sep.forward(tokens)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, stories.quantize("llm.int8").forward(tokens))  # the hook had an effect


def test_fuse_false_builds_separate_layers(stories):
    q = stories.quantize("llm.int8", fuse=False)
    assert q._fused == {} and all(isinstance(x, Int8LinearLayer) for x in q.linears.values())
    tokens = np.arange(3, 40)[None]
    assert np.array_equal(q.forward(tokens), stories.quantize("llm.int8").forward(tokens))


def test_calibrated_layers_stay_separate(stories):
    tokens = np.arange(3, 60)
    q = stories.quantize("llm.int8", calibration_tokens=tokens)
    assert q._fused == {} and all(isinstance(x, Int8LinearLayer) for x in q.linears.values())
