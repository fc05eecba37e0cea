"""Perplexity: the float32 log-softmax against a float64 reference, and the window bookkeeping."""
from __future__ import annotations

import math

import numpy as np
import pytest

from llmint8.models.perplexity import _nll_rows, perplexity

NLL_TOL = 1e-6  # absolute, nats: float32 logits with float64 sums vs a float64 log-softmax


class _LogitModel:
    """Stand-in model whose "hidden states" are the logits themselves (identity classifier)."""

    config = {"max_seq_len": 64}

    def __init__(self, table):
        self.table = table  # (vocab, vocab): row t = logits after token t

    def logits_from_hidden(self, h):
        return h.astype(np.float32)

    def forward(self, tokens, logits=False):
        return self.table[np.asarray(tokens)]


def _reference_nll(logits, targets):
    lg = logits.astype(np.float64)
    m = lg.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(lg - m).sum(axis=-1))
    return lse - lg[np.arange(len(targets)), targets]


@pytest.mark.parametrize("vocab, scale", [(50, 1.0), (32000, 4.0), (262144, 12.0)])
def test_nll_rows_matches_float64(vocab, scale):
    rng = np.random.default_rng(vocab)
    n = 70  # more than one block of rows
    logits = (rng.standard_normal((n, vocab)) * scale).astype(np.float32)
    logits[3, 7] = 80.0  # one dominant logit: probability ~1 for that row
    targets = rng.integers(0, vocab, n)
    targets[3] = 7
    got = _nll_rows(_LogitModel(None), logits, targets)
    ref = _reference_nll(logits, targets)
    assert got.dtype == np.float64
    assert np.max(np.abs(got - ref)) <= NLL_TOL
    assert abs(got[3]) <= NLL_TOL


def test_nll_rows_leaves_callers_logits_alone():
    logits = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
    keep = logits.copy()

    class Viewing(_LogitModel):
        def logits_from_hidden(self, h):
            return logits[: len(h)]  # a view the caller still owns

    _nll_rows(Viewing(None), np.zeros((5, 1), np.float32), np.zeros(5, np.int64))
    assert np.array_equal(logits, keep)


def test_perplexity_scores_every_token_once():
    rng = np.random.default_rng(1)
    vocab = 20
    table = rng.standard_normal((vocab, vocab)).astype(np.float32)
    tokens = rng.integers(0, vocab, 100)
    r = perplexity(_LogitModel(table), tokens, context=16, stride=5, progress=False)
    # the stand-in has no context: every token's NLL depends only on the previous token
    ref = _reference_nll(table[tokens[:-1]], tokens[1:])
    assert r["n_tokens"] == len(tokens) - 1
    assert abs(r["nll"] - ref.mean()) <= NLL_TOL and math.isclose(r["ppl"], math.exp(r["nll"]))
