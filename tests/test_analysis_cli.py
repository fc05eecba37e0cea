"""The analysis on a real checkpoint through its fast paths and its command lines: the zeroing
experiment's prefix reuse gives the numbers of whole forward passes, bit for bit; output paths
are opened before any work; a model without a tokenizer is a clear error; ``outliers`` lists
each linear input's outlier columns as a NumPy reference counts them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import llmint8.__main__ as cli
from conftest import one_line_error
from data_paths import STORIES_BIN, WIKITEXT_TEST, require
from llmint8.analysis import experiments as E
from llmint8.analysis import input_key


@pytest.fixture(scope="module")
def stories():
    from llmint8.models import load_model

    return load_model(require(*STORIES_BIN), dtype="float32")


class _NoBlocks:
    """The model without ``embed`` / ``run_blocks``: forces whole forward passes."""

    def __init__(self, model):
        self._m = model

    def __getattr__(self, k):
        if k in ("embed", "run_blocks"):
            raise AttributeError(k)
        return getattr(self._m, k)


def _tokens(n, seed=0):
    return np.random.default_rng(seed).integers(0, 512, size=n)


def test_run_blocks_reproduces_hidden_states(stories):
    t = _tokens(40)[None]
    L = stories.config["n_layers"]
    x = stories.embed(t)
    for i in range(L):
        x = stories.run_blocks(x, i, i + 1)
    h = stories._norm(x, "final_norm")
    np.testing.assert_array_equal(h, stories.hidden_states(t))
    with pytest.raises(ValueError, match="start"):
        stories.run_blocks(x, 2, L + 1)


@pytest.mark.parametrize("features", [[], [18, 20], list(range(0, 64, 7))])
def test_independent_top1_by_block_equals_whole_forward_passes(stories, features):
    toks = _tokens(150, seed=len(features))
    fast = E.mean_top1_attention(stories, toks, seq_len=50, zero_features=features)
    slow = E.mean_top1_attention(_NoBlocks(stories), toks, seq_len=50, zero_features=features)
    np.testing.assert_array_equal(fast, slow)  # same operations on the same arrays: no tolerance


def test_zeroing_experiment_fast_path_and_baseline_reuse_change_nothing(stories):
    from llmint8.models import perplexity

    toks = _tokens(96, seed=3)
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return perplexity(*a, **k)

    base = perplexity(stories, toks, context=48, stride=48, progress=False)
    fast = E.zeroing_experiment(stories, toks, [18, 20], seeds=(0, 1), seq_len=48, ppl_context=48, ppl_stride=48,
                                perplexity_fn=counting, baseline_perplexity=base)
    assert len(calls) == 3  # outliers + 2 random controls; the baseline was given
    slow = E.zeroing_experiment(_NoBlocks(stories), toks, [18, 20], seeds=(0, 1), seq_len=48, ppl_context=48,
                                ppl_stride=48)
    assert fast.to_dict() == slow.to_dict()
    # "all" mode is unchanged by the fast path and differs from independent beyond layer 0
    allm = E.zeroing_experiment(stories, toks, [18, 20], seeds=(0,), seq_len=48, mode="all", measure_ppl=False)
    assert allm.outliers.top1_per_layer[0] == fast.outliers.top1_per_layer[0]


# ---------------------------------------------------------------- output paths (defect 10)




def _refusing_dir():
    """A folder that refuses new files whoever we are (os.access says yes to root there)."""
    for d in ("/proc", "/sys"):
        if os.path.isdir(d):
            try:
                fd = os.open(os.path.join(d, "llmint8-probe"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except OSError:
                return d
            os.close(fd)
            os.unlink(os.path.join(d, "llmint8-probe"))
    pytest.skip("no pseudo file system that refuses new files here")


def test_unwritable_outputs_are_found_before_any_work(tmp_path, capsys, no_work):
    bad = _refusing_dir()
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time")
    t = ["--text", str(text)]
    cases = [
        (["analyze", "--out", f"{bad}/llmint8-out"] + t, "--out"),
        (["analyze", "--out", f"{bad}/llmint8-out/deeper"] + t, "--out"),
        (["perplexity", "--model", "stories260K", "--json", f"{bad}/x.json"] + t, "--json"),
        (["outliers", "--json", f"{bad}/x.json"] + t, "--json"),
        (["quantize", "--model", "stories260K", "--out", f"{bad}/llmint8-q"], "--out"),
    ]
    for argv, word in cases:
        one_line_error(capsys, cli.main(argv), 2, word, bad)


def test_analyze_refuses_an_output_file_name_taken_by_a_folder(tmp_path, capsys, no_work):
    out = tmp_path / "out"
    (out / "heatmap.png").mkdir(parents=True)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time")
    one_line_error(capsys, cli.main(["analyze", "--out", str(out), "--text", str(text)]), 2, "heatmap.png", "folder")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused(tmp_path, capsys, no_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time")
    try:
        one_line_error(capsys, cli.main(["analyze", "--out", str(ro / "o"), "--text", str(text)]), 2, "--out")
        one_line_error(capsys, cli.main(["outliers", "--json", str(ro / "x.json"), "--text", str(text)]), 2, "--json")
    finally:
        ro.chmod(0o755)


def test_output_checks_leave_no_trace(tmp_path):
    from llmint8._cli import check_output_dir, check_output_file

    nested = tmp_path / "a" / "b" / "c"
    check_output_dir(str(nested), files=("report.json",))
    assert not (tmp_path / "a").exists()
    keep = tmp_path / "keep.json"
    keep.write_text("precious")
    check_output_file(str(keep))
    check_output_dir(str(tmp_path), files=("keep.json",))
    assert keep.read_text() == "precious"
    new = tmp_path / "new.json"
    check_output_file(str(new))
    assert not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]


# ---------------------------------------------------------------- no tokenizer (defect 9)

@pytest.fixture
def bare_model(tmp_path):
    """stories260K's weights alone in a folder: no tokenizer beside them."""
    d = tmp_path / "bare"
    d.mkdir()
    shutil.copy(require(*STORIES_BIN), d / "model.bin")
    return d / "model.bin"


def test_model_without_tokenizer(bare_model, tmp_path, capsys, stories):
    from llmint8.models import load_model

    m = load_model(str(bare_model))
    assert m.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        E.tokenize_text(m, "Once upon a time", 16)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time")
    for cmd in (["analyze", "--out", str(tmp_path / "o")], ["outliers"]):
        rc = cli.main(cmd + ["--model", str(bare_model), "--text", str(text), "--no-progress"])
        one_line_error(capsys, rc, 2, "no tokenizer", "--token-ids")
    # token ids encoded elsewhere run the analysis: the same ids give what the text gives
    ids = E.tokenize_text(stories, open(require(*WIKITEXT_TEST), encoding="utf-8").read(4000), 100)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(", ".join(map(str, ids)))
    rc = cli.main(["outliers", "--model", str(bare_model), "--token-ids", str(ids_file), "--json",
                   str(tmp_path / "ids.json"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rc = cli.main(["outliers", "--model", "stories260K", "--text", require(*WIKITEXT_TEST), "--max-tokens", "100",
                   "--json", str(tmp_path / "text.json"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    by_ids, by_text = (json.loads((tmp_path / f).read_text()) for f in ("ids.json", "text.json"))
    assert by_ids["n_tokens"] == 100 and by_ids["inputs"] == by_text["inputs"]
    np.save(tmp_path / "ids.npy", ids)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 three")
    for argv, words in ((["--token-ids", str(bad)], ("three",)),
                        (["--token-ids", str(ids_file), "--text", str(text)], ("not both",))):
        one_line_error(capsys, cli.main(["outliers", "--model", str(bare_model)] + argv), 2, *words)
    big = tmp_path / "big.txt"
    big.write_text("1 2 99999")
    one_line_error(capsys, cli.main(["outliers", "--model", str(bare_model), "--token-ids", str(big), "--no-progress"]),
              2, "[0, 512)")
    assert cli.main(["outliers", "--model", str(bare_model), "--token-ids", str(tmp_path / "ids.npy"),
                     "--no-progress"]) == 0


# ---------------------------------------------------------------- analyze and outliers on stories260K

def test_analyze_prints_estimate_and_phase_times(tmp_path, capsys):
    require(*STORIES_BIN)
    text = require(*WIKITEXT_TEST)
    out = tmp_path / "o"
    rc = cli.main(["analyze", "--model", "stories260K", "--text", text, "--tokens", "128", "--out", str(out),
                   "--no-progress", "--zero-top", "2", "--seeds", "0", "--ppl-context", "64", "--ppl-stride", "64"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "estimated" in printed.splitlines()[0]
    rep = json.loads((out / "report.json").read_text())
    assert {"load", "recording", "perplexity", "top-1 attention", "zeroed perplexity", "plots"} <= set(rep["timings"])
    assert all(v["wall_s"] >= 0 and v["cpu_s"] >= 0 for v in rep["timings"].values())


def test_outliers_command_matches_a_numpy_count(stories, tmp_path, capsys):
    text = require(*WIKITEXT_TEST)
    js = tmp_path / "o.json"
    assert cli.main(["outliers", "--model", "stories260K", "--text", text, "--max-tokens", "300", "--seq-len", "150",
                     "--json", str(js), "--no-progress", "--top", "0"]) == 0
    printed = capsys.readouterr().out
    rep = json.loads(js.read_text())
    ids = E.tokenize_text(stories, open(text, encoding="utf-8").read(), 300)
    with stories.record_inputs() as rec:
        for s in E.split_sequences(ids, 150):
            stories.forward(s)
    got = {r["input"]: r for r in rep["inputs"]}
    assert rep["n_tokens"] == 300 and rep["threshold"] == 6.0
    for name in stories.linear_names:
        x = rec[name].astype(np.float64)
        count = (np.abs(x) >= 6.0).sum(axis=0)
        r = got[input_key(name)]
        assert name in r["names"] and r["positions"] == 300 and r["width"] == x.shape[1]
        assert dict(zip(r["columns"], r["counts"])) == {int(c): int(count[c]) for c in np.flatnonzero(count)}
        assert r["counts"] == sorted(r["counts"], reverse=True)
        for c, m in zip(r["columns"], r["max_abs"]):
            assert m == np.abs(x[:, c]).max()
    n_cols = sum(len(r["columns"]) for r in rep["inputs"])
    assert n_cols > 0  # stories260K has outlier columns: the comparison above is not vacuous
    assert f"{n_cols} outlier columns over {len(got)} inputs" in printed
