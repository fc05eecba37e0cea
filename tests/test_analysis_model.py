"""Model-level analysis (recording through hooks, the zeroing experiment, plots, command line)
against a small NumPy transformer written here, with a planted outlier feature whose answers
are known by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llmint8.analysis import (
    analyze_activations,
    analyze_model,
    mean_top1_attention,
    split_sequences,
    zeroing_experiment,
)


class _Handle:
    def __init__(self, hooks, entry):
        self._hooks, self._entry = hooks, entry

    def remove(self):
        if self._entry in self._hooks:
            self._hooks.remove(self._entry)


class _Tok:
    def encode(self, text, bos=True):
        return ([1] if bos else []) + [2 + (ord(c) % 30) for c in text]


class TinyModel:
    """Llama-shaped toy: RMSNorm, q/k/v/o, causal softmax attention, gated FFN.

    The norm weights of feature ``OUT`` are 30 in every layer, so the attention and FFN inputs
    carry values around +-30 in that dimension at most positions: a planted outlier feature.
    """

    OUT = 3

    def __init__(self, dim=16, n_layers=4, n_heads=2, hidden=24, vocab=32, seed=0):
        r = np.random.default_rng(seed)
        self.config = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "hidden_dim": hidden,
                       "vocab_size": vocab, "seq_len": 64}
        self.name, self.arch, self.n_params = "tiny", "llama", 0
        self.tokenizer = _Tok()
        self.emb = r.normal(size=(vocab, dim)).astype(np.float32)
        self.emb[:, self.OUT] = np.abs(self.emb[:, self.OUT]) + 1.0   # one-sided, never 0
        self.W = {}
        for i in range(n_layers):
            for n, shape in (("attn.q", (dim, dim)), ("attn.k", (dim, dim)), ("attn.v", (dim, dim)),
                             ("attn.o", (dim, dim)), ("mlp.up", (hidden, dim)),
                             ("mlp.gate", (hidden, dim)), ("mlp.down", (dim, hidden))):
                self.W[f"layers.{i}.{n}"] = (r.normal(size=shape) / np.sqrt(shape[1]) * 0.5).astype(np.float32)
            # make the planted dimension drive attention scores
            self.W[f"layers.{i}.attn.q"][:, self.OUT] *= 0.5
            self.W[f"layers.{i}.attn.k"][:, self.OUT] *= 0.5
            # keep the planted dimension from spreading into every other feature
            for n in ("attn.v", "mlp.up", "mlp.gate"):
                self.W[f"layers.{i}.{n}"][:, self.OUT] /= 30.0
        self.norm = np.ones(dim, np.float32)
        self.norm[self.OUT] = 30.0
        self.out = r.normal(size=(vocab, dim)).astype(np.float32) * 0.3
        self.linear_names = list(self.W)
        self.hooks = []
        self.n_params = sum(w.size for w in self.W.values()) + self.emb.size + self.out.size

    def add_hook(self, fn, kind="linear_input", names=None):
        entry = (kind, fn, None if names is None else set(names))
        self.hooks.append(entry)
        return _Handle(self.hooks, entry)

    def _lin(self, name, x):
        for kind, fn, names in list(self.hooks):
            if kind == "linear_input" and (names is None or name in names):
                y = fn(name, x)
                if y is not None:
                    x = np.asarray(y, np.float32)
        return x @ self.W[name].T

    def _rms(self, x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * self.norm

    def forward(self, tokens):
        t = np.asarray(tokens)
        B, S = t.shape
        d, H = self.config["dim"], self.config["n_heads"]
        hd = d // H
        h = self.emb[t].reshape(B * S, d)
        mask = np.triu(np.full((S, S), -np.inf, np.float32), 1)
        for i in range(self.config["n_layers"]):
            x = self._rms(h)
            q, k, v = (self._lin(f"layers.{i}.attn.{p}", x).reshape(B, S, H, hd).transpose(0, 2, 1, 3)
                       for p in "qkv")
            s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + mask
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            for kind, fn, _ in list(self.hooks):
                if kind == "attention_probs":
                    fn(i, p)
            a = (p @ v).transpose(0, 2, 1, 3).reshape(B * S, d)
            h = h + self._lin(f"layers.{i}.attn.o", a)
            x = self._rms(h)
            g = self._lin(f"layers.{i}.mlp.gate", x)
            u = self._lin(f"layers.{i}.mlp.up", x)
            h = h + self._lin(f"layers.{i}.mlp.down", g / (1 + np.exp(-g)) * u)
        return (self._rms(h) / self.norm @ self.out.T).reshape(B, S, -1).astype(np.float32)


def tiny_perplexity(model, tokens, context=256, stride=128, progress=False):
    t = np.asarray(tokens).reshape(-1)
    logits = model.forward(t[None, :])[0, :-1].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = float(-lp[np.arange(t.size - 1), t[1:]].mean())
    return {"nll": nll, "ppl": math.exp(nll), "n_tokens": t.size - 1}


@pytest.fixture
def model():
    return TinyModel()


@pytest.fixture
def tokens():
    return np.random.default_rng(5).integers(0, 32, size=96)


def test_split_sequences():
    parts = split_sequences(np.arange(10), 4)
    assert [p.shape for p in parts] == [(1, 4), (1, 4), (1, 2)]
    assert np.concatenate([p[0] for p in parts]).tolist() == list(range(10))


def test_analyze_model_finds_planted_feature_and_cleans_up(model, tokens):
    r = analyze_model(model, tokens, seq_len=32)
    s = r.summary
    assert s.features == (TinyModel.OUT,)
    assert s.n_layers == 4 and s.layer_share == 1.0 and s.n_positions == 96
    assert s.position_share > 0.5 and s.median_magnitude > 6
    assert s.top_feature.one_sided
    assert model.hooks == []  # hook removed
    # same answer as recording whole arrays and analysing them
    rec = {}

    def grab(name, x):
        rec.setdefault(name, []).append(np.array(x))

    h = model.add_hook(grab, kind="linear_input")
    for sq in split_sequences(tokens, 32):
        model.forward(sq)
    h.remove()
    r2 = analyze_activations({k: np.concatenate(v) for k, v in rec.items()})
    assert r2.summary == s


def test_zeroing_experiment_on_planted_feature(model, tokens):
    z = zeroing_experiment(model, tokens, [TinyModel.OUT], seeds=(0, 1, 2), seq_len=32,
                           perplexity_fn=tiny_perplexity)
    assert model.hooks == []
    assert z.outliers.features == (TinyModel.OUT,)
    assert len(z.random) == 3
    assert all(len(r.features) == 1 and TinyModel.OUT not in r.features for r in z.random)
    assert len(z.baseline.top1_per_layer) == 4
    # zeroing the planted feature moves attention far more than zeroing a random one
    assert abs(z.top1_change_outliers) > max(abs(c) for c in z.top1_change_random)
    # (an untrained toy has no meaningful perplexity ordering; only check it was measured)
    assert np.isfinite(z.outliers.ppl) and z.outliers.ppl != z.baseline.ppl
    d = json.loads(json.dumps(z.to_dict()))
    assert d["baseline"]["label"] == "baseline"
    assert "outliers zeroed" in z.table()
    # reproducible seeds
    z2 = zeroing_experiment(model, tokens, [TinyModel.OUT], seeds=(0, 1, 2), seq_len=32,
                            perplexity_fn=tiny_perplexity)
    assert z2 == z


def test_independent_mode_only_edits_one_layer_at_a_time(model, tokens):
    base = mean_top1_attention(model, tokens, seq_len=32)
    ind = mean_top1_attention(model, tokens, seq_len=32, zero_features=[TinyModel.OUT])
    allm = mean_top1_attention(model, tokens, seq_len=32, zero_features=[TinyModel.OUT], mode="all")
    # layer 0 sees the same edit in both modes (nothing upstream differs)
    assert ind[0] == pytest.approx(allm[0])
    assert not np.allclose(ind, base)
    # independent mode of layer i equals: zero only layer i's inputs, read layer i
    names = [f"layers.2.attn.{p}" for p in "qkv"]
    seen = []

    def zero(name, x):
        y = np.array(x, copy=True)
        y[:, TinyModel.OUT] = 0
        return y

    h1 = model.add_hook(zero, kind="linear_input", names=names)
    h2 = model.add_hook(lambda i, p: seen.append(p.max(-1).mean()) if i == 2 else None, kind="attention_probs")
    for sq in split_sequences(tokens, 32):
        model.forward(sq)
    h1.remove(), h2.remove()
    # equal-size sequences: mean of per-sequence means equals the pooled mean
    assert ind[2] == pytest.approx(float(np.mean(seen)))
    with pytest.raises(ValueError):
        mean_top1_attention(model, tokens, mode="cascade")


def test_zeroing_rejects_bad_features(model, tokens):
    with pytest.raises(ValueError):
        zeroing_experiment(model, tokens, [99], perplexity_fn=tiny_perplexity)


def test_plots_write_pngs(model, tokens, tmp_path):
    pytest.importorskip("matplotlib")
    from llmint8.analysis import plots

    r = analyze_model(model, tokens, seq_len=32)
    rec = plots.model_record("tiny", model.n_params, r.summary, ppl=30.0)
    plots.plot_emergence([rec], path=tmp_path / "fig3.png")
    plots.plot_magnitude([rec, {**rec, "name": "none", "n_params": 10.0, "median_magnitude": float("nan")}],
                         path=tmp_path / "fig4a.png")
    plots.plot_heatmap(r, path=tmp_path / "heat.png", max_features=8)
    z = zeroing_experiment(model, tokens, r.features, seeds=(0, 1), seq_len=32, perplexity_fn=tiny_perplexity)
    plots.plot_zeroing(z, path=tmp_path / "zero.png")
    for n in ("fig3", "fig4a", "heat", "zero"):
        assert (tmp_path / f"{n}.png").stat().st_size > 1000


def test_cli_with_injected_model(model, tmp_path, capsys, monkeypatch):
    from llmint8.analysis import cli

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    monkeypatch.setattr(cli, "_load", lambda spec: model)
    monkeypatch.setattr(cli, "_perplexity_fn", lambda: tiny_perplexity)
    out = tmp_path / "out"
    rc = cli.analyze_main(["--model", "tiny", "--text", str(text), "--tokens", "64", "--out", str(out),
                           "--seq-len", "32", "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["summary"]["features"] == [TinyModel.OUT]
    assert rep["zeroing"]["outliers"]["features"] == [TinyModel.OUT]
    assert {p.name for p in out.glob("*.png")} >= {"heatmap.png", "emergence.png", "magnitude.png", "zeroing.png"}
    assert "outlier features" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    from llmint8.analysis import cli

    rc = cli.analyze_main(["--model", str(tmp_path / "missing.bin"), "--text", str(tmp_path / "none.txt")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err
    rc = cli.analyze_main(["--tokens", "1", "--text", str(tmp_path / "none.txt")])
    assert rc == 2
    rc = cli.analyze_main(["--min-layer-share", "2"])
    assert rc == 2


def test_plot_emergence_perplexity_axis_has_several_ticks(model, tokens):
    """(b) by perplexity: the reversed log axis shows several labelled ticks, not one power of ten."""
    from llmint8.analysis import plots

    r = analyze_model(model, tokens, seq_len=32, progress=False)
    rec = plots.model_record("tiny", 1000, r.summary, ppl=17.0)
    fig = plots.plot_emergence([rec])
    ax = fig.axes[1]
    fig.canvas.draw()
    lo, hi = sorted(ax.get_xlim())
    shown = [t for t in ax.get_xticks() if lo <= t <= hi]
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert ax.get_xlim()[0] > ax.get_xlim()[1]  # reversed
    assert len(shown) >= 3 and len(labels) >= 3, (shown, labels)


def test_plot_zeroing_labels_sit_above_error_bars(model, tokens):
    from llmint8.analysis import plots

    z = zeroing_experiment(model, tokens, [TinyModel.OUT], seeds=(0, 1, 2), seq_len=32,
                           perplexity_fn=tiny_perplexity)
    fig = plots.plot_zeroing(z)
    for ax, key in zip(fig.axes[:2], ("top1", "ppl")):
        rnd = [getattr(r, key) for r in z.random]
        notes = [a for a in ax.texts if a.get_text() == f"{np.mean(rnd):.3g}"]
        assert notes, [a.get_text() for a in ax.texts]
        assert notes[-1].xy[1] >= max(rnd) - 1e-12  # anchored at the top of the min-max bar
