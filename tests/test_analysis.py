"""Outlier-feature criteria on constructed activations (answers worked out by hand), a brute
force cross-check, and the analysis on the real stories260K checkpoint."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest

from llmint8.analysis import (
    OutlierAccumulator,
    analyze_activations,
    input_key,
    layer_key,
)

from data_paths import data_dir  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(data_dir() or ROOT.parent / "shared" / "data")  # $LLMINT8_DATA first
STORIES = SHARED / "models" / "stories260K" / "stories260K.bin"
WIKI = SHARED / "text" / "wikitext2_test.txt"


def blocks(layers, names=("attn.q", "attn.k", "attn.v", "mlp.up")):
    """{'layers.i.<proj>': array} with q/k/v sharing one array, as a model records them."""
    out = {}
    for i, x in enumerate(layers):
        for n in names:
            out[f"layers.{i}.{n}"] = x
    return out


def zeros(n_layers, n_pos, d):
    return [np.zeros((n_pos, d), np.float32) for _ in range(n_layers)]


# ---------------------------------------------------------------- magnitude threshold


def test_exactly_threshold_counts_and_just_below_does_not():
    ls = zeros(4, 10, 4)
    ls[0][0, 1] = 6.0                                        # exactly 6.0: counts
    ls[0][0, 2] = np.nextafter(np.float32(6.0), np.float32(0))  # 5.9999995: does not
    ls[0][0, 3] = -6.0                                       # sign does not matter
    s = analyze_activations(blocks(ls), min_position_share=0.1).summary
    # 1 of 4 layers = 25% (>= 25%), 1 of 10 positions = 10% (>= 10%)
    assert s.features == (1, 3)
    assert s.layer_share == 0.25
    assert s.position_share == 0.1
    assert s.median_magnitude == 6.0 and s.max_magnitude == 6.0


def test_threshold_is_a_parameter():
    ls = zeros(1, 4, 3)
    ls[0][:, 0] = 3.0
    assert analyze_activations(blocks(ls)).summary.features == ()
    assert analyze_activations(blocks(ls), threshold=3.0).summary.features == (0,)


# ---------------------------------------------------------------- layer share boundaries


@pytest.mark.parametrize("n_layers,hit_layers,expect", [
    (4, 1, True),     # 1/4 = 25% exactly
    (8, 2, True),     # 2/8 = 25% exactly
    (8, 1, False),    # 12.5%
    (12, 3, True),    # 3/12 = 25%
    (12, 2, False),   # 16.7%
    (5, 1, False),    # 20%
    (5, 2, True),     # 40%
])
def test_layer_share_boundary(n_layers, hit_layers, expect):
    ls = zeros(n_layers, 10, 2)
    for i in range(hit_layers):
        ls[i][:, 1] = 9.0           # all positions: position criterion holds
    s = analyze_activations(blocks(ls)).summary
    assert s.features == ((1,) if expect else ())
    assert s.n_layers == n_layers


# ---------------------------------------------------------------- position share boundaries


@pytest.mark.parametrize("n_pos,hits,expect", [
    (50, 3, True),     # 3/50 = 6% exactly (0.06 * 50 == 3.0000000000000004 in floats)
    (50, 2, False),    # 4%
    (100, 6, True),    # 6%
    (100, 5, False),   # 5%
    (17, 1, False),    # 5.9%
    (17, 2, True),     # 11.8%
])
def test_position_share_boundary(n_pos, hits, expect):
    ls = zeros(4, n_pos, 3)
    ls[0][:hits, 2] = 7.0
    s = analyze_activations(blocks(ls)).summary
    assert s.features == ((2,) if expect else ())
    if expect:
        assert s.n_positions_affected == hits


def test_layer_share_boundary_with_fractional_float_share():
    # 0.3 of 10 layers is 3 layers; 0.3 * 10 == 3.0000000000000004 in floats.
    ls = zeros(10, 4, 2)
    for i in range(3):
        ls[i][:, 0] = 8.0
    s = analyze_activations(blocks(ls), min_layer_share=0.3).summary
    assert s.features == (0,)


# ---------------------------------------------------------------- aggregation across layers


def test_position_aggregation_any_max_mean():
    # 4 layers, 50 positions. Feature 0 reaches 6 at positions {0, 1} in layer 0 and {1, 2}
    # in layer 1.
    #   any : union {0, 1, 2}            -> 3/50 = 6%   -> outlier
    #   max : largest per layer = 2      -> 2/50 = 4%   -> not
    #   mean: (2 + 2 + 0 + 0) / (4 * 50) -> 2%          -> not
    ls = zeros(4, 50, 2)
    ls[0][[0, 1], 0] = 6.5
    ls[1][[1, 2], 0] = -6.5
    acts = blocks(ls)
    r_any = analyze_activations(acts, position_aggregation="any")
    r_max = analyze_activations(acts, position_aggregation="max")
    r_mean = analyze_activations(acts, position_aggregation="mean")
    assert r_any.summary.features == (0,)
    assert r_any.position_count[0] == 3
    assert r_max.summary.features == () and r_max.position_count[0] == 2
    assert r_mean.summary.features == () and r_mean.position_count[0] == 4
    # mean passes at 2%: 4 / 200 = 0.02 exactly
    assert analyze_activations(acts, position_aggregation="mean", min_position_share=0.02).summary.features == (0,)
    # the outlier has both signs -> not one-sided; quartiles of (-6.5, -6.5, 6.5, 6.5)
    f = r_any.summary.outlier_features[0]
    assert not f.one_sided
    assert f.quartiles == (-6.5, 0.0, 6.5)
    # 4 values, each seen in two distinct inputs of its block (attention input, FFN input)
    assert f.n_occurrences == 8


# ---------------------------------------------------------------- grouping and shared inputs


def test_shared_qkv_and_up_gate_counted_once():
    ls = zeros(2, 10, 3)
    ls[0][0, 1] = 10.0
    acts = blocks(ls, names=("attn.q", "attn.k", "attn.v", "mlp.up", "mlp.gate"))
    r = analyze_activations(acts, min_position_share=0.1)
    f = r.summary.outlier_features[0]
    # one array read by q, k, v, up and gate: q/k/v are one input, up/gate another; both inputs
    # of block 0 are the same array, so the value occurs twice (once per distinct input).
    assert f.n_occurrences == 2
    assert f.layers == ("layers.0",)
    r_in = analyze_activations(acts, group_by="input", min_position_share=0.1)
    assert r_in.layers == ["layers.0.attn_in", "layers.0.ffn_in", "layers.1.attn_in", "layers.1.ffn_in"]
    assert r_in.summary.outlier_features[0].n_layers == 2    # attn_in and ffn_in of block 0


def test_block_grouping_vs_input_grouping():
    # Feature 0 is large only in the attention-output input of block 0 and the FFN input of
    # block 1, in 4 blocks. By block: 2/4 layers. By input (12 inputs): 2/12 < 25%.
    d, n = 4, 20
    acts = {}
    for i in range(4):
        for p in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up"):
            acts[f"layers.{i}.{p}"] = np.zeros((n, d), np.float32)
    acts["layers.0.attn.o"] = acts["layers.0.attn.o"].copy()
    acts["layers.0.attn.o"][:, 0] = 6.0
    acts["layers.1.mlp.up"] = acts["layers.1.mlp.up"].copy()
    acts["layers.1.mlp.up"][:, 0] = 6.0
    s_block = analyze_activations(acts).summary
    assert s_block.features == (0,) and s_block.layer_share == 0.5
    assert s_block.layers_affected == ("layers.0", "layers.1")
    s_in = analyze_activations(acts, group_by="input").summary
    assert s_in.n_layers == 12 and s_in.features == ()
    s_custom = analyze_activations(acts, group_by=lambda name: name.split(".")[2]).summary
    assert s_custom.n_layers == 2 and s_custom.features == (0,)  # groups "attn" and "mlp"


def test_ffn_contraction_input_ignored_by_default_and_width_mismatch_skipped():
    ls = zeros(4, 10, 4)
    acts = blocks(ls)
    for i in range(4):
        big = np.full((10, 16), 50.0, np.float32)
        acts[f"layers.{i}.mlp.down"] = big               # ignored (FFN contraction)
    acts["layers.0.attn.o"] = np.full((10, 8), 50.0)     # other width: skipped from criteria
    r = analyze_activations(acts)
    assert r.summary.features == ()
    assert r.skipped_inputs == ["layers.0.attn.o"]
    assert r.input_max_abs["layers.0.attn.o"].max() == 50.0
    assert "layers.0.mlp.down" not in r.input_max_abs
    # explicitly asking for the contraction input analyses it
    r2 = analyze_activations({f"layers.{i}.mlp.down": acts[f"layers.{i}.mlp.down"] for i in range(4)},
                             names=lambda n: True)
    assert r2.summary.n_outlier_features == 16


def test_key_helpers():
    assert input_key("layers.3.attn.k") == "layers.3.attn_in"
    assert input_key("layers.3.mlp.gate") == "layers.3.ffn_in"
    assert input_key("layers.3.attn.o") == "layers.3.attn.o"
    assert layer_key("layers.12.mlp.up") == "layers.12"
    assert layer_key("encoder.fc") == "encoder.fc"


# ---------------------------------------------------------------- summary, ties, magnitudes


def test_summary_union_and_tie_break():
    # 4 layers, 20 positions.
    #   feature 1: layers 0,1 at positions 0..1 (value 8)         -> 2 layers, 2 positions (10%)
    #   feature 2: layers 2,3 at positions 5..6 (value -10)       -> 2 layers, 2 positions
    #   feature 0: layer 0 at position 9 (value 7)                -> 1 layer, 1 position (5%) no
    # union: layers {0,1,2,3} = 100%; positions {0,1,5,6} = 20%
    # magnitudes of occurrences: four 8s and four 10s -> median 9, max 10
    # features 1 and 2 tie on layers, positions and occurrences -> lower index (1) is top
    ls = zeros(4, 20, 3)
    for i in (0, 1):
        ls[i][0:2, 1] = 8.0
    for i in (2, 3):
        ls[i][5:7, 2] = -10.0
    ls[0][9, 0] = 7.0
    s = analyze_activations(blocks(ls)).summary
    assert s.features == (1, 2)
    assert s.layer_share == 1.0 and s.n_positions_affected == 4 and s.position_share == 0.2
    assert s.median_magnitude == 9.0 and s.max_magnitude == 10.0
    assert s.top_feature.index == 1
    assert s.n_one_sided == 2
    assert s.outlier_features[1].quartiles == (-10.0, -10.0, -10.0)
    json.dumps(s.to_dict())
    assert "outlier features" in s.table()


def test_no_outliers_summary():
    s = analyze_activations(blocks(zeros(3, 5, 2))).summary
    assert s.n_outlier_features == 0 and s.top_feature is None
    assert s.layer_share == 0.0 and s.position_share == 0.0
    assert math.isnan(s.median_magnitude)
    assert json.loads(json.dumps(s.to_dict()))["median_magnitude"] is None


def test_per_layer_statistics():
    ls = zeros(2, 4, 2)
    ls[1][[0, 3], 0] = [-6.0, 2.0]
    r = analyze_activations(blocks(ls))
    assert r.max_abs.shape == (2, 2)
    assert r.max_abs[1, 0] == 6.0 and r.max_abs[0, 0] == 0.0
    assert r.share_above[1, 0] == 0.25
    assert r.layer_hits.tolist() == [[False, False], [True, False]]
    # RMS over all 8 values of layer 1's input: sqrt((36 + 4) / 8)
    assert r.input_rms["layers.1.attn_in"] == pytest.approx(math.sqrt(40 / 8))
    assert r.input_rms["layers.0.attn_in"] == 0.0
    # one value >= 6 among 2 layers x 2 distinct inputs (attention, FFN) x 4 positions x 2 features,
    # counted in both inputs of layer 1: 2 / 32
    assert r.share_values_above == 2 / 32


# ---------------------------------------------------------------- input handling


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad):
    ls = zeros(2, 4, 2)
    ls[1][2, 1] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        analyze_activations(blocks(ls))


def test_bad_parameters_raise():
    acts = blocks(zeros(2, 4, 2))
    with pytest.raises(ValueError):
        analyze_activations(acts, min_layer_share=1.5)
    with pytest.raises(ValueError):
        analyze_activations(acts, min_position_share=-0.1)
    with pytest.raises(ValueError):
        analyze_activations(acts, position_aggregation="median")
    with pytest.raises(ValueError):
        analyze_activations(acts, threshold=float("nan"))
    with pytest.raises(ValueError):
        analyze_activations(acts, group_by="head")
    with pytest.raises(ValueError, match="no activations"):
        analyze_activations({})
    with pytest.raises(ValueError, match="positions"):
        analyze_activations({"layers.0.attn.q": np.zeros((4, 2)), "layers.1.attn.q": np.zeros((5, 2))})


def test_chunks_and_streaming_match_whole_arrays():
    rng = np.random.default_rng(1)
    ls = [rng.normal(scale=3.0, size=(40, 8)).astype(np.float32) for _ in range(4)]
    acts = blocks(ls)
    whole = analyze_activations(acts)
    chunked = analyze_activations({k: [v[:13], v[13:30], v[30:]] for k, v in acts.items()})
    acc = OutlierAccumulator()
    for lo, hi in ((0, 25), (25, 40)):                 # as a hook sees two forward passes
        for k, v in acts.items():
            acc.update(k, v[lo:hi])
    streamed = acc.result()
    for r in (chunked, streamed):
        assert r.summary == whole.summary
        np.testing.assert_array_equal(r.max_abs, whole.max_abs)
    # a 3-D (batch, seq, features) array is flattened into positions
    r3 = analyze_activations({k: v.reshape(4, 10, 8) for k, v in acts.items()})
    assert r3.summary == whole.summary


# ---------------------------------------------------------------- brute-force cross-check


def brute_force(layers, thr, lshare, pshare):
    """The definition, literally: loops and exact fractions."""
    from fractions import Fraction

    L, (N, D) = len(layers), layers[0].shape
    out = []
    for f in range(D):
        hit_layers = sum(1 for x in layers if any(abs(float(x[p, f])) >= thr for p in range(N)))
        hit_pos = sum(1 for p in range(N) if any(abs(float(x[p, f])) >= thr for x in layers))
        if hit_layers > 0 and Fraction(hit_layers, L) >= Fraction(str(lshare)) \
                and Fraction(hit_pos, N) >= Fraction(str(pshare)):
            out.append(f)
    return tuple(out)


def test_matches_brute_force_on_random_cases():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(
        L=st.integers(1, 6), N=st.integers(1, 30), D=st.integers(1, 5),
        seed=st.integers(0, 10_000),
        lshare=st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5, 1.0]),
        pshare=st.sampled_from([0.0, 0.06, 0.1, 0.2, 0.5]),
    )
    def check(L, N, D, seed, lshare, pshare):
        rng = np.random.default_rng(seed)
        # values on a 0.5 grid around the threshold so exact-6.0 hits are common
        layers = [(rng.integers(-14, 15, size=(N, D)) * 0.5).astype(np.float32) for _ in range(L)]
        got = analyze_activations(blocks(layers), min_layer_share=lshare, min_position_share=pshare)
        assert got.summary.features == brute_force(layers, 6.0, lshare, pshare)

    check()
    assert hypothesis is not None


# ---------------------------------------------------------------- real checkpoint


def _stories_model():
    if not STORIES.exists():
        pytest.skip(f"stories260K checkpoint not found at {STORIES}")
    try:
        from llmint8.models import load_model
    except ImportError as e:
        pytest.skip(f"llmint8.models not available: {e}")
    return load_model(str(STORIES), dtype="float32")


@pytest.fixture(scope="module")
def stories():
    return _stories_model()


def test_stories260k_analysis_is_stable_and_sensible(stories):
    from llmint8.analysis import analyze_model, tokenize_text

    if not WIKI.exists():
        pytest.skip(f"text not found at {WIKI}")
    tokens = tokenize_text(stories, WIKI.read_text(encoding="utf-8"), 512)
    a = analyze_model(stories, tokens, seq_len=256)
    b = analyze_model(stories, tokens, seq_len=256)
    assert a.summary == b.summary
    np.testing.assert_array_equal(a.max_abs, b.max_abs)
    s = a.summary
    cfg = stories.config
    assert s.n_layers == cfg["n_layers"] and s.n_features == cfg["dim"] and s.n_positions == 512
    assert 0.0 <= s.layer_share <= 1.0 and 0.0 <= s.position_share <= 1.0
    assert s.n_outlier_features <= cfg["dim"]
    # post-norm projection inputs of a trained model: finite, not all tiny, not absurd
    assert 0.5 < a.max_abs.max() < 1e3
    if s.n_outlier_features:
        assert s.median_magnitude >= 6.0 and s.max_magnitude >= s.median_magnitude


def test_stories260k_zeroing_experiment(stories):
    from llmint8.analysis import tokenize_text, zeroing_experiment

    if not WIKI.exists():
        pytest.skip(f"text not found at {WIKI}")
    tokens = tokenize_text(stories, WIKI.read_text(encoding="utf-8"), 256)
    # zero the 2 largest-magnitude dimensions (the model may have no outliers by the criteria)
    from llmint8.analysis import analyze_model

    a = analyze_model(stories, tokens, seq_len=128)
    top = tuple(int(i) for i in np.argsort(-a.max_abs.max(axis=0), kind="stable")[:2])
    z = zeroing_experiment(stories, tokens, top, seeds=(0, 1), seq_len=128, ppl_context=128, ppl_stride=64)
    assert 0 < z.baseline.top1 <= 1 and 0 < z.outliers.top1 <= 1
    assert z.baseline.ppl > 1 and np.isfinite(z.outliers.ppl)
    assert len(z.random) == 2 and all(len(r.features) == 2 for r in z.random)
    assert all(set(r.features).isdisjoint(top) for r in z.random)
    json.dumps(z.to_dict())
