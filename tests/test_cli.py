"""The command line: the demo runs and prints its tables; bad arguments fail cleanly."""
import subprocess
import sys

import llmint8.__main__ as cli


def test_demo_small(capsys):
    assert cli.main(["demo", "--size", "256", "--tokens", "1,4", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "llmint8 backends: cpu" in out
    for word in ("Relative error", "Weight memory", "numpy fp32", "llm.int8", "zeropoint"):
        assert word in out


def test_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_module_entry_point_bad_argument():
    r = subprocess.run([sys.executable, "-m", "llmint8", "demo", "--tokens", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--tokens" in r.stderr
