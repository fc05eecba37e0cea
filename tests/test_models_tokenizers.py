"""GGUF tokenizers against llama.cpp's own tokenizer test vocabularies.

``tokenizers/llama.cpp-vocab/`` in the shared data holds llama.cpp's test vocabularies
(``ggml-vocab-*.gguf``) with their inputs (``.inp``, cases separated by ``__ggml_vocab_test__``
lines) and the ids the reference tokenizers give (``.out``, one line per case, no BOS).
Every vocabulary whose ``tokenizer.ggml.model`` and ``tokenizer.ggml.pre`` we accept must give
exactly those ids; the others must be refused with an error naming the field.
"""
from __future__ import annotations

import functools
import glob
import os

import pytest

from data_paths import data_path

pytest.importorskip("tokenizers")
pytest.importorskip("gguf")

from llmint8.models.tokenizers import gguf_pre_tokenizers, read_gguf_metadata, tokenizer_from_gguf_fields  # noqa: E402

VOCAB_DIR = data_path("tokenizers", "llama.cpp-vocab")
VOCABS = sorted(glob.glob(os.path.join(VOCAB_DIR, "ggml-vocab-*.gguf"))) if VOCAB_DIR else []
SEPARATOR = "\n__ggml_vocab_test__\n"


@functools.lru_cache(maxsize=None)
def _fields(path):
    return read_gguf_metadata(path)


def _cases(path):
    with open(path + ".inp", encoding="utf-8", newline="") as f:
        inputs = f.read().split(SEPARATOR)
    assert inputs[-1] == "", f"{path}.inp does not end with the separator line"
    inputs = inputs[:-1]
    with open(path + ".out", encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert len(lines) >= len(inputs), f"{path}.out has {len(lines)} lines for {len(inputs)} cases"
    return [(text, [int(t) for t in line.split()]) for text, line in zip(inputs, lines)]


def _accepted(fields):
    model = fields.get("tokenizer.ggml.model")
    return model == "llama" or (model == "gpt2" and fields.get("tokenizer.ggml.pre") in gguf_pre_tokenizers())


@pytest.mark.skipif(not VOCABS, reason="llama.cpp test vocabularies not found in the shared data "
                                       "(tokenizers/llama.cpp-vocab; set LLMINT8_DATA)")
@pytest.mark.parametrize("path", VOCABS, ids=[os.path.basename(p)[len("ggml-vocab-"):-len(".gguf")] for p in VOCABS])
def test_llama_cpp_vocab(path):
    fields = _fields(path)
    if not _accepted(fields):
        with pytest.raises(ValueError, match=r"tokenizer\.ggml\.(model|pre)"):
            tokenizer_from_gguf_fields(fields)
        return
    tok = tokenizer_from_gguf_fields(fields)
    cases = _cases(path)
    assert len(cases) > 10
    got = [tok.encode(text, bos=False) for text, _ in cases]
    bad = [(text, g, ids) for (text, ids), g in zip(cases, got) if g != ids]
    assert not bad, (f"{len(bad)} of {len(cases)} cases differ from llama.cpp; first: text {bad[0][0]!r} "
                     f"gave {bad[0][1]} expected {bad[0][2]}")
    # decoding gives the text back where the vocabulary covers it (byte-level BPE always does)
    if fields["tokenizer.ggml.model"] == "gpt2":
        for text, ids in cases:
            assert tok.decode(ids) == text


def test_every_shipped_bpe_vocab_is_accepted():
    """The shipped byte-level BPE vocabularies all name a pre-tokenizer we implement."""
    if not VOCABS:
        pytest.skip("llama.cpp test vocabularies not found in the shared data")
    pres = {_fields(p).get("tokenizer.ggml.pre") for p in VOCABS if _fields(p).get("tokenizer.ggml.model") == "gpt2"}
    assert pres and pres <= set(gguf_pre_tokenizers())


def _tiny_bpe_fields(pre):
    tokens = ["a", "b", "ab", "Ġ", "Ġa", "1", "2", "3", "12", "123", "<eos>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 10 + [3], "tokenizer.ggml.merges": ["a b", "Ġ a", "1 2", "12 3"],
            "tokenizer.ggml.eos_token_id": 10}


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ValueError, match=r"'frobnicate'.*tokenizer\.ggml\.pre.*llama-bpe"):
        tokenizer_from_gguf_fields(_tiny_bpe_fields("frobnicate"))


def test_digit_grouping_follows_the_pre_tokenizer():
    """Llama 3 keeps up to three digits together, Qwen2 and SmolLM split each digit, GPT-2 keeps runs."""
    ids = {pre: tokenizer_from_gguf_fields(_tiny_bpe_fields(pre)).encode("123", bos=False)
           for pre in ("llama-bpe", "qwen2", "smollm", "gpt-2")}
    assert ids == {"llama-bpe": [9], "qwen2": [5, 6, 7], "smollm": [5, 6, 7], "gpt-2": [9]}
