"""The command line: the demo runs and prints its tables; every error is one line on stderr with
exit code 2 (bad argument, found before any work) or 1 (failure while running), no traceback."""
import os
import subprocess
import sys

import pytest

import llmint8
import llmint8.__main__ as cli
from conftest import one_line_error
from data_paths import STORIES_BIN, require


def test_demo_small(capsys):
    assert cli.main(["demo", "--size", "256", "--tokens", "1,4", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "llmint8 backends: cpu" in out
    for word in ("Relative error", "Weight memory", "numpy fp32", "llm.int8", "zeropoint"):
        assert word in out


def test_help_version_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"llmint8 {llmint8.__version__}"
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_module_entry_point_bad_argument():
    r = subprocess.run([sys.executable, "-m", "llmint8", "demo", "--tokens", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--tokens" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_module_entry_point_version():
    r = subprocess.run([sys.executable, "-m", "llmint8", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"llmint8 {llmint8.__version__}"





@pytest.mark.parametrize("argv, words", [
    (["perplexity", "--model", "stories260K", "--text", "/dev/null"], ("/dev/null", "not a regular file")),
    (["perplexity", "--model", "stories260K", "--text", "/no/such.txt"], ("does not exist",)),
    (["perplexity", "--model", "stories260K", "--text", __file__, "--json", "/no/such/dir/x.json"],
     ("--json", "does not exist")),
    (["perplexity", "--model", "stories260K", "--text", __file__, "--json", os.path.dirname(__file__)],
     ("--json", "folder")),
    (["perplexity", "--model", "stories260K", "--text", __file__, "--max-tokens", "0"], ("--max-tokens", "'all'")),
    (["perplexity", "--model", "stories260K", "--text", __file__, "--max-tokens", "-3"], ("--max-tokens",)),
    (["perplexity", "--model", "stories260K", "--text", __file__, "--max-tokens", "lots"], ("--max-tokens",)),
    (["perplexity", "--model", "nonexistent-model", "--text", __file__], ("neither an existing path",)),
    (["perplexity", "--model", "stories260K", "--text", __file__, "--threshold", "-1"], ("--threshold",)),
    (["perplexity", "--model", "stories260K", "--text", __file__, "--threshold", "nan"], ("--threshold",)),
    (["perplexity", "--text", __file__], ("--model",)),
    (["analyze", "--ppl-context", "1"], ("--ppl-context",)),
    (["analyze", "--out", __file__], ("--out", "not a folder")),
    (["analyze", "--text", "/dev/null"], ("/dev/null", "not a regular file")),
    (["analyze", "--bogus"], ("--bogus",)),
])
def test_usage_errors_come_before_any_work(argv, words, capsys, no_work):
    one_line_error(capsys, cli.main(argv), 2, *words)


def test_cuda_device_without_cuda_is_a_usage_error(capsys, no_work):
    if llmint8.cuda_available():
        pytest.skip("CUDA is available here")
    rc = cli.main(["perplexity", "--model", "stories260K", "--text", __file__, "--device", "cuda"])
    one_line_error(capsys, rc, 2, "--device cuda")


def test_empty_text_is_a_usage_error(tmp_path, capsys, no_work):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    one_line_error(capsys, cli.main(["perplexity", "--model", "stories260K", "--text", str(empty)]), 2, "no text")
    one_line_error(capsys, cli.main(["analyze", "--text", str(empty), "--out", str(tmp_path / "o")]), 2, "no text")


@pytest.mark.parametrize("module, extra, argv", [
    ("matplotlib", "analysis", ["analyze", "--no-progress"]),
    ("tqdm", "analysis", ["analyze"]),
    ("tqdm", "models", ["perplexity", "--model", "stories260K"]),
])
def test_missing_optional_dependency_is_named_up_front(module, extra, argv, monkeypatch, capsys, no_work, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # import blocked, as if not installed
    text = tmp_path / "t.txt"
    text.write_text("some text to read")
    rc = cli.main(argv + ["--text", str(text)] + (["--out", str(tmp_path / "out")] if argv[0] == "analyze" else []))
    one_line_error(capsys, rc, 1, module, f"pip install 'llmint8[{extra}]'")


def test_unexpected_failure_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import llmint8.models as models

    def fails(*a, **k):
        raise RuntimeError("something broke\nover two lines")

    monkeypatch.setattr(models, "load_model", fails)
    require(*STORIES_BIN)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time")
    rc = cli.main(["perplexity", "--model", "stories260K", "--text", str(text), "--no-progress"])
    one_line_error(capsys, rc, 1, "RuntimeError", "something broke over two lines")


def test_perplexity_prints_token_budget_and_estimate(tmp_path, capsys):
    require(*STORIES_BIN)
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time, there was a little girl named Lily. She liked to play outside. " * 8)
    assert cli.main(["perplexity", "--model", "stories260K", "--text", str(text), "--methods", "fp16",
                     "--no-progress"]) == 0
    out = capsys.readouterr().out
    from llmint8.models.cli import DEFAULT_MAX_TOKENS

    assert f"--max-tokens {DEFAULT_MAX_TOKENS}" in out and "estimated" in out
    assert cli.main(["perplexity", "--model", "stories260K", "--text", str(text), "--methods", "fp16",
                     "--no-progress", "--max-tokens", "all"]) == 0
    assert "(all)" in capsys.readouterr().out


def test_analyze_resolves_data_through_llmint8_data(tmp_path, monkeypatch, capsys, no_work):
    from llmint8.analysis import cli as acli
    from llmint8.models import zoo

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "wikitext2_test.txt").write_text("hello")
    monkeypatch.setenv("LLMINT8_DATA", str(tmp_path))
    assert acli.default_text() == tmp_path / "text" / "wikitext2_test.txt"
    assert zoo.data_dir() == str(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LLMINT8_DATA", str(empty))
    assert acli.default_text() is None
    one_line_error(capsys, cli.main(["analyze", "--out", str(tmp_path / "o")]), 2, f"$LLMINT8_DATA={empty}")
    with pytest.raises(zoo.ZooError, match="LLMINT8_DATA"):
        zoo.fetch("stories260K")


def test_data_dir_found_from_the_working_directory(tmp_path, monkeypatch):
    """A non-editable install cannot see the checkout: ./shared/data or ../shared/data count too."""
    from llmint8.models import zoo

    monkeypatch.delenv("LLMINT8_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert os.path.join(str(tmp_path), "shared", "data") in zoo.data_dir_candidates()
    monkeypatch.setattr(zoo, "__file__", str(tmp_path / "site-packages" / "llmint8" / "models" / "zoo.py"))
    assert zoo.data_dir() == os.path.join(str(tmp_path), "shared", "data")
