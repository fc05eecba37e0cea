"""Tokenizers for the model loaders: llama2.c ``.bin`` vocabularies, vocabularies embedded in GGUF
files (sentencepiece-style "llama" and byte-level BPE "gpt2"), and Hugging Face ``tokenizer.json``.

Every tokenizer has ``encode(text, bos=True) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``bos_id`` and ``eos_id`` (``None`` when the vocabulary has no such token).
"""

from __future__ import annotations

import heapq
import os
import re
import struct
from typing import Iterable, Sequence

__all__ = [
    "SentencePieceBPETokenizer",
    "HFTokenizer",
    "load_llama2c_tokenizer",
    "load_hf_tokenizer",
    "tokenizer_from_gguf_fields",
    "gguf_pre_tokenizers",
    "read_gguf_metadata",
    "load_tokenizer",
]

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class SentencePieceBPETokenizer:
    """Score-driven BPE over sentencepiece pieces, as in llama2.c's ``run.c`` ``encode``.

    Text is split into unicode characters (each must be a piece, else it falls back to its
    UTF-8 bytes as ``<0xXX>`` pieces), then the adjacent pair whose concatenation is a piece with
    the highest score is merged, leftmost first on ties, until no pair merges.

    Args:
        pieces: piece strings, index = token id.
        scores: one float per piece (higher merges first).
        bos_id, eos_id: ids of the begin/end tokens, or None.
        space: the character pieces use for a space: " " in llama2.c files, "\u2581" in GGUF/sentencepiece.
        add_dummy_prefix: prepend one space to the text, as sentencepiece does by default.
        special_ids: ids never produced by merging and dropped by ``decode`` (control tokens).
        user_defined: pieces matched verbatim in the text before merging (sentencepiece user symbols).
    """

    def __init__(self, pieces: Sequence[str], scores: Sequence[float], bos_id=None, eos_id=None,
                 space: str = " ", add_dummy_prefix: bool = True, special_ids: Iterable[int] = (),
                 user_defined: Iterable[str] = ()):
        self.pieces = list(pieces)
        self.scores = [float(s) for s in scores]
        if len(self.scores) != len(self.pieces):
            raise ValueError(f"tokenizer has {len(self.pieces)} pieces but {len(self.scores)} scores")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.space = space
        self.add_dummy_prefix = add_dummy_prefix
        self.special_ids = set(int(i) for i in special_ids)
        # later duplicates must not shadow the first id, as in run.c's sorted lookup of unique pieces
        self._lookup: dict[str, int] = {}
        for i, p in enumerate(self.pieces):
            if i not in self.special_ids:
                self._lookup.setdefault(p, i)
        self._byte_ids: dict[int, int] = {}
        for i, p in enumerate(self.pieces):
            m = _BYTE_PIECE.match(p)
            if m:
                self._byte_ids.setdefault(int(m.group(1), 16), i)
        self._byte_of_id = {i: b for b, i in self._byte_ids.items()}
        ud = sorted({u for u in user_defined if u}, key=len, reverse=True)
        self._user_re = re.compile("|".join(re.escape(u) for u in ud)) if ud else None
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        """Number of pieces (token ids 0..vocab_size-1)."""
        return len(self.pieces)

    def _char_ids(self, text: str) -> list[int]:
        ids = []
        for ch in text:
            i = self._lookup.get(ch)
            if i is not None:
                ids.append(i)
                continue
            for b in ch.encode("utf-8"):
                j = self._byte_ids.get(b)
                if j is None:
                    raise ValueError(f"character {ch!r} is not in the vocabulary and it has no byte fallback pieces")
                ids.append(j)
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Greedy best-score merging with a heap; same result as run.c's quadratic loop."""
        n = len(ids)
        if n < 2:
            return ids
        toks = list(ids)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        alive = [True] * n
        heap = []
        lookup, scores, pieces = self._lookup, self.scores, self.pieces

        def push(i):
            j = nxt[i]
            if j == -1:
                return
            m = lookup.get(pieces[toks[i]] + pieces[toks[j]])
            if m is not None:
                heapq.heappush(heap, (-scores[m], i, toks[i], toks[j], m))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b, m = heapq.heappop(heap)
            j = nxt[i]
            # stale entry: one side was merged since it was pushed
            if not alive[i] or j == -1 or toks[i] != a or toks[j] != b:
                continue
            toks[i] = m
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prev[nxt[j]] = i
            if prev[i] != -1:
                push(prev[i])
            push(i)
        return [toks[i] for i in range(n) if alive[i]]

    def _encode_chunk(self, chunk: str) -> list[int]:
        out = self._cache.get(chunk)
        if out is None:
            out = self._merge(self._char_ids(chunk))
            if len(self._cache) < 200_000:
                self._cache[chunk] = out
        return out

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text`` (str) to token ids (list of int), BOS first when ``bos`` and known."""
        ids: list[int] = []
        if bos and self.bos_id is not None:
            ids.append(self.bos_id)
        if text:
            if self.add_dummy_prefix:
                text = " " + text
            if self.space != " ":
                text = text.replace(" ", self.space)
            parts = [(False, text)]
            if self._user_re is not None:
                parts, pos = [], 0
                for m in self._user_re.finditer(text):
                    if m.start() > pos:
                        parts.append((False, text[pos:m.start()]))
                    parts.append((True, m.group(0)))
                    pos = m.end()
                if pos < len(text):
                    parts.append((False, text[pos:]))
            for is_user, part in parts:
                if is_user:
                    ids.append(self._lookup[part])
                    continue
                # Merges never cross a newline when no piece holds one inside, so long texts can be
                # encoded line by line (and cached) with exactly the whole-text result.
                for line in self._split_lines(part):
                    ids.extend(self._encode_chunk(line))
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _split_lines(self, text: str) -> list[str]:
        if not hasattr(self, "_nl_safe"):
            self._nl_safe = not any("\n" in p and p != "\n" for i, p in enumerate(self.pieces)
                                    if i not in self.special_ids)
        if not self._nl_safe or len(text) < 4096:
            return [text]
        out = re.split(r"(\n)", text)
        return [s for s in out if s]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids to text; control tokens are dropped, byte pieces re-joined as UTF-8."""
        buf = bytearray()
        first = True
        for i in ids:
            i = int(i)
            if i in self.special_ids or i == self.bos_id or i == self.eos_id:
                continue
            if not 0 <= i < len(self.pieces):
                raise ValueError(f"token id {i} out of range [0, {len(self.pieces)})")
            b = self._byte_of_id.get(i)
            if b is not None:
                buf.append(b)
            else:
                piece = self.pieces[i]
                if self.space != " ":
                    piece = piece.replace(self.space, " ")
                # sentencepiece drops the dummy-prefix space of the first piece
                if first and self.add_dummy_prefix and piece.startswith(" "):
                    piece = piece[1:]
                buf.extend(piece.encode("utf-8"))
            first = False
        return buf.decode("utf-8", errors="replace")


def load_llama2c_tokenizer(path: str, vocab_size: int | None = None) -> SentencePieceBPETokenizer:
    """Read a llama2.c tokenizer ``.bin``: int32 max_token_length, then per token float32 score,
    int32 byte length, bytes. ``vocab_size`` (from the checkpoint) sets how many tokens to read;
    by default all the file holds. BOS is id 1, EOS id 2, byte pieces ``<0xXX>`` as in run.c."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        data = f.read()
    if size < 4:
        raise ValueError(f"{path}: tokenizer file is {size} bytes, too short for a llama2.c tokenizer header")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= 1 << 16:
        raise ValueError(f"{path}: max_token_length {max_len} is not a plausible llama2.c tokenizer header")
    pieces, scores = [], []
    off = 4
    while off < size and (vocab_size is None or len(pieces) < vocab_size):
        if off + 8 > size:
            raise ValueError(f"{path}: truncated at token {len(pieces)} (offset {off} of {size} bytes)")
        score, n = struct.unpack_from("<fi", data, off)
        if not 0 <= n <= max_len or off + 8 + n > size:
            raise ValueError(f"{path}: token {len(pieces)} has length {n}; expected 0..{max_len} bytes within the file")
        pieces.append(data[off + 8: off + 8 + n].decode("utf-8", errors="replace"))
        scores.append(score)
        off += 8 + n
    if vocab_size is not None and len(pieces) < vocab_size:
        raise ValueError(f"{path}: holds {len(pieces)} tokens, the model expects {vocab_size}")
    specials = [i for i in (0, 1, 2) if i < len(pieces)]
    return SentencePieceBPETokenizer(pieces, scores, bos_id=1, eos_id=2, space=" ",
                                     add_dummy_prefix=True, special_ids=specials)


class HFTokenizer:
    """Wrapper over a ``tokenizers.Tokenizer`` giving the common ``encode``/``decode`` interface."""

    def __init__(self, tok, bos_id=None, eos_id=None):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode ``text`` to ids without the tokenizer's own special-token template; BOS/EOS
        are added here when asked for and known."""
        ids = list(self.tok.encode(text, add_special_tokens=False).ids)
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text, skipping special tokens."""
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_hf_tokenizer(folder: str, config: dict | None = None) -> HFTokenizer | None:
    """Load ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt`` byte-level BPE) from ``folder``;
    None when neither exists. BOS/EOS ids come from ``config`` (config.json) or tokenizer_config.json."""
    import json

    import tokenizers

    config = config or {}
    tj = os.path.join(folder, "tokenizer.json")
    if os.path.exists(tj):
        tok = tokenizers.Tokenizer.from_file(tj)
    else:
        # GPT-2 style byte-level BPE: HF names (vocab.json, merges.txt) or OpenAI's (encoder.json, vocab.bpe)
        for vocab_name, merges_name in (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            vp, mp = os.path.join(folder, vocab_name), os.path.join(folder, merges_name)
            if os.path.exists(vp) and os.path.exists(mp):
                tok = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(vp, mp))
                tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = tokenizers.decoders.ByteLevel()
                break
        else:
            return None
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    tc = os.path.join(folder, "tokenizer_config.json")
    if (bos is None or eos is None) and os.path.exists(tc):
        with open(tc) as f:
            tcfg = json.load(f)
        for key in ("bos_token", "eos_token"):
            v = tcfg.get(key)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                i = tok.token_to_id(v)
                if key == "bos_token" and bos is None:
                    bos = i
                if key == "eos_token" and eos is None:
                    eos = i
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return HFTokenizer(tok, bos_id=bos, eos_id=eos)


# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizer regexes of byte-level BPE vocabularies, by ``tokenizer.ggml.pre`` value, as llama.cpp
# (src/llama-vocab.cpp) applies them: each regex splits every piece the previous one left, keeping
# both the matches and the text between them; then each piece is byte-encoded and merged on its own.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Llama 3 / Qwen2: case-insensitive contractions, one non-letter before a word, digit groups
# (up to 3 for Llama 3, 1 for Qwen2), punctuation runs with their newlines, newline runs.
_LLAMA3_RE = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = _LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
_DEEPSEEK_LLM_RES = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
    "\\p{N}+",
)
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {}  # name -> (regexes, ignore_merges)


def _register(names, regexes, ignore_merges=False):
    for n in names:
        _PRE_TOKENIZERS[n] = (tuple(regexes), ignore_merges)


_register(("default",), (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"))
_register(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
          (_LLAMA3_RE,), ignore_merges=True)
_register(("dbrx", "smaug-bpe", "chatglm-bpe"), (_LLAMA3_RE,))
_register(("qwen2", "stablelm2", "hunyuan"), (_QWEN2_RE,))
_register(("deepseek-llm",), _DEEPSEEK_LLM_RES)
_register(("deepseek-coder",), ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+",
                                r"\p{N}"))
_register(("falcon",), (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_RE, "[0-9][0-9][0-9]"))
_register(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
          (r"\p{N}", _GPT2_RE))
_register(("gpt-2", "phi-2", "mpt", "olmo", "jais", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de",
           "jina-v2-code", "roberta-bpe"), (_GPT2_RE,))
_register(("poro-chat", "bloom", "gpt3-finnish"), (r" ?[^(\s|.,!?…。，、।۔،)]+",))
_register(("viking",), (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"))


def gguf_pre_tokenizers() -> list[str]:
    """The ``tokenizer.ggml.pre`` values of byte-level BPE GGUF vocabularies this module supports."""
    return sorted(_PRE_TOKENIZERS)


def _bpe_pre_tokenizer(pre: str):
    """A ``tokenizers`` pre-tokenizer doing what llama.cpp does for ``tokenizer.ggml.pre`` = ``pre``,
    and whether whole pre-tokens found in the vocabulary skip the merges (Llama 3)."""
    import tokenizers
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    try:
        regexes, ignore_merges = _PRE_TOKENIZERS[pre]
    except KeyError:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; expected one of "
                         f"{', '.join(gguf_pre_tokenizers())}") from None
    steps = [pt.Split(Regex(r), behavior="isolated") for r in regexes]
    steps.append(pt.ByteLevel(add_prefix_space=False, use_regex=False))
    _ = tokenizers
    return pt.Sequence(steps), ignore_merges


def tokenizer_from_gguf_fields(fields: dict, source: str | None = None):
    """Build a tokenizer from GGUF metadata (already decoded to Python values): model "llama"
    (sentencepiece pieces + scores) or "gpt2" (byte-level BPE with merges, pre-tokenized as
    llama.cpp does for ``tokenizer.ggml.pre``; unknown pre-tokenizer names raise ValueError).

    source: the file the fields come from, named in errors. A vocabulary that does not hold
    together (a merge of tokens the vocabulary lacks, a field of the wrong type: a corrupt
    file) raises ValueError naming the file and the entry, never the tokenizers library's
    bare Exception. Its ``chat_template`` is the file's ``tokenizer.chat_template`` (None when
    absent)."""
    where = f"{source}: " if source else ""
    try:
        return _tokenizer_from_gguf_fields(fields, where)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises bare Exception
        _check_gguf_merges(fields, where)  # names the broken merge when that is the cause
        raise ValueError(f"{where}the GGUF vocabulary cannot be built: {' '.join(str(e).split())[:300]}; "
                         f"the file is corrupt or its tokenizer is not supported") from None


def _check_gguf_vocab(fields: dict, where: str) -> None:
    """Types and cross-references of the GGUF vocabulary fields (llama.cpp checks these too)."""
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{where}tokenizer.ggml.tokens must be a list of strings; the file is corrupt")
    n = len(tokens)
    for key, kinds in (("tokenizer.ggml.token_type", (int,)), ("tokenizer.ggml.scores", (int, float))):
        v = fields.get(key)
        if v is not None and (not isinstance(v, list) or len(v) != n or not all(isinstance(x, kinds) for x in v)):
            raise ValueError(f"{where}{key} must be a list of {n} numbers, one per token; the file is corrupt")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        v = fields.get(key)
        if v is not None and (not isinstance(v, int) or not 0 <= v < n):
            raise ValueError(f"{where}{key} = {v!r} is not a token id in [0, {n}); the file is corrupt")
    merges = fields.get("tokenizer.ggml.merges")
    if merges is not None and not isinstance(merges, list):
        raise ValueError(f"{where}tokenizer.ggml.merges must be a list of strings; the file is corrupt")


def _check_gguf_merges(fields: dict, where: str) -> None:
    """Every merge is two tokens of the vocabulary whose concatenation is one too (run only once
    the tokenizers library has refused the vocabulary: about a second for 280k merges)."""
    tokens, merges = fields.get("tokenizer.ggml.tokens"), fields.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise ValueError(f"{where}tokenizer.ggml.merges must be a list of strings; the file is corrupt")
    vocab = set(tokens)
    for i, m in enumerate(merges):
        parts = m.split(" ", 1) if isinstance(m, str) else []
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{where}merge {i} of tokenizer.ggml.merges is {m!r}; expected two tokens "
                             f"separated by a space (the file is corrupt)")
        for part in (*parts, parts[0] + parts[1]):
            if part not in vocab:
                raise ValueError(f"{where}merge {i} of tokenizer.ggml.merges ({m!r}) uses {part!r}, which is not "
                                 f"in the vocabulary (tokenizer.ggml.tokens); the file is corrupt")


def _tokenizer_from_gguf_fields(fields: dict, where: str):
    model = fields.get("tokenizer.ggml.model")
    tokens = fields.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        return None
    _check_gguf_vocab(fields, where)
    types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    bos = fields.get("tokenizer.ggml.bos_token_id")
    eos = fields.get("tokenizer.ggml.eos_token_id")
    add_bos = fields.get("tokenizer.ggml.add_bos_token", True)
    if model == "llama":
        scores = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        specials = [i for i, t in enumerate(types) if t == _CONTROL]
        user = [tokens[i] for i, t in enumerate(types) if t == _USER_DEFINED]
        tok = SentencePieceBPETokenizer(tokens, scores, bos_id=bos if add_bos else None, eos_id=eos,
                                        space="\u2581",
                                        add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True)),
                                        special_ids=specials, user_defined=user)
        tok.bos_token_id = bos
        tok.chat_template = fields.get("tokenizer.chat_template")
        return tok
    if model == "gpt2":
        import tokenizers

        pre = fields.get("tokenizer.ggml.pre")
        if pre is None:
            # llama.cpp falls back to "default" with a warning that quality will be degraded; a
            # missing name most often means an old GPT-2-style conversion
            pre = "gpt-2"
        pre_tok, ignore_merges = _bpe_pre_tokenizer(str(pre))
        merges_raw = fields.get("tokenizer.ggml.merges") or []
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tok
        tok.decoder = tokenizers.decoders.ByteLevel()
        # user-defined tokens are matched verbatim in the text before pre-tokenization, as llama.cpp does;
        # control tokens are added as special tokens (dropped by decode)
        user = [tokenizers.AddedToken(tokens[i], normalized=False, special=False)
                for i, t in enumerate(types) if t == _USER_DEFINED]
        if user:
            tok.add_tokens(user)
        special = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
        if special:
            tok.add_special_tokens(special)
        out = HFTokenizer(tok, bos_id=bos if add_bos else None, eos_id=eos)
        out.chat_template = fields.get("tokenizer.chat_template")
        return out
    raise ValueError(f"{where}GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; expected 'llama' "
                     f"(sentencepiece) or 'gpt2' (byte-level BPE)")


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str) -> dict:
    """The metadata key/value pairs of a GGUF file (version 2 or 3) as Python values, without
    reading its tensors: strings as str, arrays as lists. Much faster than ``gguf.GGUFReader`` for
    large vocabularies (one ``struct`` call per entry). Raises ValueError on a malformed header."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24 or data[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (expected the magic b'GGUF' and a 24-byte header)")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported; expected 2 or 3")
    off = 24
    unpack = struct.unpack_from

    def string(o):
        (n,) = unpack("<Q", data, o)
        if o + 8 + n > len(data):
            raise ValueError(f"{path}: string at byte {o} runs past the end of the file; truncated or corrupt")
        return data[o + 8:o + 8 + n].decode("utf-8", errors="replace"), o + 8 + n

    def value(t, o):
        fmt = _GGUF_SCALARS.get(t)
        if fmt is not None:
            return unpack(fmt, data, o)[0], o + struct.calcsize(fmt)
        if t == _GGUF_STRING:
            return string(o)
        if t == _GGUF_ARRAY:
            et, n = unpack("<IQ", data, o)
            o += 12
            efmt = _GGUF_SCALARS.get(et)
            if efmt is not None:
                size = struct.calcsize(efmt)
                if o + n * size > len(data):
                    raise ValueError(f"{path}: array at byte {o} runs past the end of the file")
                return list(struct.unpack_from(f"<{n}{efmt[1]}", data, o)), o + n * size
            if n > len(data):
                raise ValueError(f"{path}: array of {n} entries at byte {o} cannot fit in the file")
            out = []
            for _ in range(n):
                v, o = value(et, o)
                out.append(v)
            return out, o
        raise ValueError(f"{path}: unknown GGUF value type {t} at byte {o}")

    fields = {}
    try:
        for _ in range(n_kv):
            key, off = string(off)
            (t,) = unpack("<I", data, off)
            fields[key], off = value(t, off + 4)
    except struct.error:
        raise ValueError(f"{path}: metadata runs past the end of the file; truncated or corrupt") from None
    return fields


def load_tokenizer(path: str, vocab_size: int | None = None, config: dict | None = None):
    """Load a tokenizer from ``path``: a llama2.c ``.bin``, a ``tokenizer.json``, a folder with
    tokenizer.json / vocab.json + merges.txt / encoder.json + vocab.bpe, or a ``.gguf`` file."""
    if os.path.isdir(path):
        tok = load_hf_tokenizer(path, config)
        if tok is None:
            raise ValueError(f"{path}: no tokenizer.json, vocab.json + merges.txt or encoder.json + vocab.bpe")
        return tok
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer {path!r} does not exist")
    if path.endswith(".json"):
        import tokenizers

        config = config or {}
        return HFTokenizer(tokenizers.Tokenizer.from_file(path), bos_id=config.get("bos_id"),
                           eos_id=config.get("eos_id"))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return tokenizer_from_gguf_fields(read_gguf_metadata(path), source=path)
    return load_llama2c_tokenizer(path, vocab_size)
