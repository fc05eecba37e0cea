"""Text generation: greedy decoding or sampling, streamed token by token, with chat templates.

    from llmint8.models import load_model, generate
    model = load_model("smollm2-135m")
    g = generate(model.quantize("llm.int8"), "What is 8-bit quantization?", chat=True,
                 max_new_tokens=64, stream=lambda piece: print(piece, end="", flush=True))
    g.text, g.token_ids, g.finish_reason, g.tokens_per_second

Decoding runs the model's key/value-cache runner (see :func:`_decoding_steps`: a GPU model's
fixed-shape decoder, else ``Model.step`` over a preallocated cache): the prompt in one forward
pass, then one position per new token. Only the last position's logits come back to the host,
where the next token is chosen in float64 NumPy:

- greedy (``temperature=0``, the default): the arg max of the logits (the lowest id on a tie);
- sampling (``temperature > 0``): softmax(logits / temperature), restricted to the ``top_k``
  most likely tokens (every token whose logit ties the k-th largest is kept), then to the
  smallest set of most likely tokens whose probability reaches ``top_p`` (the order among
  equal probabilities is by token id), renormalized, and drawn by inverse CDF with one uniform
  number from ``numpy.random.default_rng(seed)`` per token: a seed reproduces the text exactly.

Chat templates are the checkpoint's own Jinja template (GGUF ``tokenizer.chat_template``, Hugging
Face ``tokenizer_config.json`` ``chat_template``), rendered with jinja2 (in the ``models`` extra)
in a sandbox, as Hugging Face does: ``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception`` and ``strftime_now`` are defined.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .device import to_host

__all__ = ["generate", "stream_generate", "Generation", "GenerationStream", "sampling_probs", "next_token",
           "chat_template", "apply_chat_template", "stop_token_ids"]

# Texts of the tokens that end a chat turn in common templates (ChatML, Gemma, Llama 3, Phi):
# in chat mode, generation also stops at whichever of them the vocabulary holds as one token, as
# the template's turn ends there even when the checkpoint's EOS is another token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


# --------------------------------------------------------------------------- sampling


def _check_sampling(temperature, top_k, top_p) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None for no top-k filter), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number with 0 < top_p <= 1 (or None for no top-p filter), got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError("top_k and top_p filter sampled tokens, but temperature=0 decodes greedily; "
                         "set temperature > 0 (e.g. 0.8) to sample")


def sampling_probs(logits, temperature: float, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """The distribution a token is sampled from: float64 (vocab,) probabilities summing to 1, zero
    outside the kept set. ``logits`` (vocab,) of any float dtype; ``temperature > 0``. See the
    module docstring for the order and tie rules of the top-k and top-p filters."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("sampling_probs needs temperature > 0; temperature=0 is greedy (argmax)")
    z = np.asarray(logits, dtype=np.float64).ravel()
    if np.isnan(z).any():
        raise ValueError("the logits contain NaN (a float16 model that overflowed? try dtype='float32')")
    z = z / float(temperature)
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, z.size - top_k)[z.size - top_k]
        z = np.where(z >= kth, z, -np.inf)
    m = z.max()
    if not np.isfinite(m):
        raise ValueError("the logits hold no finite value to sample from")
    p = np.exp(z - m)
    p /= p.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-p, kind="stable")
        ps = p[order]
        before = np.cumsum(ps) - ps            # probability mass of the tokens ranked above
        drop = order[before >= top_p]          # the first token is always kept (before = 0)
        p[drop] = 0.0
        p /= p.sum()
    return p


def next_token(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               rng: np.random.Generator | None = None) -> int:
    """Choose the next token id from one position's logits (vocab,): the arg max when
    ``temperature == 0``, else a draw from :func:`sampling_probs` using one ``rng.random()``."""
    if temperature == 0:
        lg = np.asarray(logits).ravel()
        i = int(np.argmax(lg))
        if np.isnan(lg[i]):
            raise ValueError("the logits contain NaN (a float16 model that overflowed? try dtype='float32')")
        return i
    p = sampling_probs(logits, temperature, top_k, top_p)
    rng = np.random.default_rng() if rng is None else rng
    c = np.cumsum(p)
    # the first index whose cumulative probability exceeds u; tokens of probability 0 are never
    # chosen, since their cumulative value equals their predecessor's
    i = int(np.searchsorted(c, rng.random() * c[-1], side="right"))
    return min(i, p.size - 1)


# --------------------------------------------------------------------------- chat templates


def chat_template(model) -> str | None:
    """The chat template the checkpoint of ``model`` carries, or None: ``model.chat_template``
    when set, else the tokenizer's (GGUF ``tokenizer.chat_template``), else a
    ``tokenizer_config.json`` ``chat_template`` beside the weights (a Hugging Face folder, or a
    quantized folder saved from one)."""
    t = getattr(model, "chat_template", None) or getattr(getattr(model, "tokenizer", None), "chat_template", None)
    if t:
        return _template_text(t)
    src = getattr(model, "source", "") or ""
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    tc = os.path.join(folder, "tokenizer_config.json") if folder else ""
    if tc and os.path.isfile(tc):
        try:
            with open(tc, encoding="utf-8") as f:
                t = json.load(f).get("chat_template")
        except (OSError, ValueError, AttributeError):
            t = None
        if t:
            return _template_text(t)
    if src.endswith(".gguf") and os.path.isfile(src):
        st = os.stat(src)
        t = _gguf_chat_template(src, st.st_size, st.st_mtime_ns)
        if t:
            return _template_text(t)
    return None


@functools.lru_cache(maxsize=8)
def _gguf_chat_template(path: str, size: int, mtime_ns: int) -> str | None:
    # a model loaded from a saved folder names its GGUF source; reading the metadata reads the
    # whole file, so once per file version
    from .tokenizers import read_gguf_metadata

    return read_gguf_metadata(path).get("tokenizer.chat_template")


def _template_text(t) -> str:
    # tokenizer_config.json may hold a list of named templates; the chat one is "default"
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if not isinstance(t, str):
        raise ValueError(f"chat template must be a string, got {type(t).__name__}")
    return t


def apply_chat_template(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
                        bos_token: str = "", eos_token: str = "", **extra) -> str:
    """Render a Jinja chat ``template`` for ``messages`` (a list of {"role", "content"} dicts).

    Rendered as Hugging Face renders it: a sandboxed jinja2 environment with ``trim_blocks`` and
    ``lstrip_blocks``, the variables ``messages``, ``add_generation_prompt``, ``bos_token``,
    ``eos_token`` and ``extra``, and the functions ``raise_exception(msg)`` (raises ValueError)
    and ``strftime_now(fmt)``. Needs jinja2 (``pip install 'llmint8[models]'``)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("rendering a chat template needs the Python package 'jinja2', which is not installed; "
                          "install it with: pip install 'llmint8[models]'") from None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content', got {m!r}")

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    def strftime_now(fmt):
        return time.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        tpl = env.from_string(template)
        return tpl.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                          bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template cannot be rendered: {type(e).__name__}: {e}") from None


def _bos_id(tok):
    # a GGUF that adds no BOS keeps its BOS id in bos_token_id (bos_id is None): templates still name it
    i = getattr(tok, "bos_id", None)
    return getattr(tok, "bos_token_id", None) if i is None else i


def _token_text(tok, i) -> str:
    if i is None:
        return ""
    pieces = getattr(tok, "pieces", None)
    if pieces is not None:
        return pieces[i] if 0 <= i < len(pieces) else ""
    inner = getattr(tok, "tok", None)
    if inner is not None:
        return inner.id_to_token(int(i)) or ""
    return ""


def _special_token_id(tok, text: str) -> int | None:
    """Id of ``text`` when the vocabulary holds it as one special (control) token, else None."""
    pieces = getattr(tok, "pieces", None)
    if pieces is not None:
        lookup = tok.__dict__.get("_llmint8_piece_ids")
        if lookup is None:  # built once per tokenizer, not at every call
            lookup = tok.__dict__["_llmint8_piece_ids"] = {p: i for i, p in enumerate(pieces)}
        i = lookup.get(text)
        return i if i is not None and i in getattr(tok, "special_ids", ()) else None
    inner = getattr(tok, "tok", None)
    if inner is not None:
        i = inner.token_to_id(text)
        return i if i is not None else None
    return None


def _encode_rendered(tok, text: str) -> list[int]:
    """Encode rendered chat text, its special-token texts (<|im_start|>, <start_of_turn>, ...)
    becoming their single ids. Hugging Face tokenizers match them already; for the sentencepiece
    tokenizer the text is split at them and each piece between is encoded on its own."""
    bos_text = _token_text(tok, _bos_id(tok))
    add_bos = not (bos_text and text.startswith(bos_text))
    pieces = getattr(tok, "pieces", None)
    if pieces is None:
        return tok.encode(text, bos=add_bos)
    specials = sorted({pieces[i] for i in getattr(tok, "special_ids", ()) if pieces[i]}, key=len, reverse=True)
    ids = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    pos = 0
    while pos < len(text):
        hits = [(text.find(s, pos), s) for s in specials]
        hits = [(j, s) for j, s in hits if j >= 0]
        if not hits:
            ids.extend(tok.encode(text[pos:], bos=False))
            break
        j, s = min(hits, key=lambda h: (h[0], -len(h[1])))
        if j > pos:
            ids.extend(tok.encode(text[pos:j], bos=False))
        ids.append(_special_token_id(tok, s))
        pos = j + len(s)
    return ids


def stop_token_ids(model, chat: bool = False) -> set[int]:
    """Token ids that end generation: the tokenizer's EOS (or the config's ``eos_id``); for a
    llama2.c checkpoint (``.bin``) also BOS, which separates its training texts (llama2.c's run.c
    stops there too); in chat mode also the end-of-turn tokens of :data:`END_OF_TURN_TOKENS` the
    vocabulary holds."""
    tok = getattr(model, "tokenizer", None)
    ids = set()
    bos = model.config.get("bos_id") if str(getattr(model, "source", "") or "").endswith(".bin") else None
    for i in (getattr(tok, "eos_id", None), model.config.get("eos_id"), bos):
        if i is not None:
            ids.add(int(i))
    if chat and tok is not None:
        for t in END_OF_TURN_TOKENS:
            i = _special_token_id(tok, t)
            if i is not None:
                ids.add(int(i))
    return ids


# --------------------------------------------------------------------------- generation


@dataclass
class Generation:
    """The result of :func:`generate`.

    text: the generated text (the prompt excluded; a stop string and what follows removed);
    token_ids: the generated ids, the EOS / stop token that ended generation included;
    prompt_ids: the ids the model was fed as the prompt (after the chat template);
    finish_reason: "eos" (an EOS or end-of-turn token), "stop" (a stop string or stop id) or
    "length" (``max_new_tokens`` reached); prefill_seconds: the prompt's forward pass;
    decode_seconds: every later step (one forward and one token choice each)."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    method: str = ""
    prompt_text: str | None = field(default=None, repr=False)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of the whole generation (prefill included)."""
        t = self.prefill_seconds + self.decode_seconds
        return len(self.token_ids) / t if t > 0 else float("inf")

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second of the decode steps alone (the first token comes from the prefill)."""
        n = len(self.token_ids) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


def _prepare_prompt(model, prompt, chat, system):
    tok = getattr(model, "tokenizer", None)
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict)):
        if tok is None:
            raise ValueError(f"{model.name or 'this model'} has no tokenizer; pass the prompt as token ids")
        messages = None
        if isinstance(prompt, str) and (chat or system is not None):
            messages = ([{"role": "system", "content": system}] if system is not None else []) + \
                       [{"role": "user", "content": prompt}]
        elif not isinstance(prompt, str):
            messages = list(prompt)
        if messages is None:
            return tok.encode(prompt, bos=True), prompt, False
        template = chat_template(model)
        if template is None:
            raise ValueError(f"{model.name or 'this model'} carries no chat template (GGUF tokenizer.chat_template "
                             f"or tokenizer_config.json chat_template); generate without chat")
        text = apply_chat_template(template, messages, add_generation_prompt=True,
                                   bos_token=_token_text(tok, _bos_id(tok)),
                                   eos_token=_token_text(tok, tok.eos_id))
        return _encode_rendered(tok, text), text, True
    if chat or system is not None:
        raise ValueError("chat=True and system need a text prompt (str) or a list of messages, not token ids")
    try:
        arr = np.asarray(prompt)
    except (TypeError, ValueError):
        arr = None
    if arr is not None and arr.size == 0:
        raise ValueError("the prompt holds no token ids; give at least one (e.g. the BOS id)")
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"prompt must be a str, a list of chat messages or a 1-D sequence of integer token ids, "
                         f"got {type(prompt).__name__}" + (f" of dtype {arr.dtype} and shape {arr.shape}"
                                                           if arr is not None else ""))
    return [int(t) for t in arr], None, False


def _split_stop(stop):
    if stop is None:
        return [], set()
    if isinstance(stop, (str, int, np.integer)):
        stop = [stop]
    strings, ids = [], set()
    for s in stop:
        if isinstance(s, str):
            if not s:
                raise ValueError("stop strings must not be empty")
            strings.append(s)
        elif isinstance(s, (int, np.integer)) and not isinstance(s, bool):
            ids.add(int(s))
        else:
            raise ValueError(f"stop must hold strings and/or token ids, got {s!r}")
    return strings, ids


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string: that
    much cannot be streamed yet, as the next token may complete the stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class GenerationStream:
    """Iterator over the text pieces of a generation, in order (see :func:`stream_generate`);
    after it is exhausted, ``result`` holds the :class:`Generation`. ``prompt_ids`` and
    ``prompt_text`` (the rendered chat template, or None) are known before the first piece."""

    def __init__(self, gen, prompt_ids, prompt_text):
        self._gen = gen
        self.prompt_ids = list(prompt_ids)
        self.prompt_text = prompt_text
        self.result: Generation | None = None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration as e:
            self.result = e.value
            raise


def stream_generate(model, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop=None, chat: bool = False,
                    system: str | None = None) -> GenerationStream:
    """Like :func:`generate`, but returns an iterator of the text pieces as they are decoded (the
    arguments are checked before it is returned); its ``result`` is the :class:`Generation` once
    the iteration ends. Concatenated, the pieces are ``result.text``."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k, top_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 (or None), got {seed!r}")
    stop_strings, stop_ids = _split_stop(stop)
    prompt_ids, prompt_text, is_chat = _prepare_prompt(model, prompt, chat, system)
    cfg = model.config
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens (and the tokenizer adds no BOS); give a non-empty prompt")
    bad = [t for t in prompt_ids if not 0 <= t < cfg["vocab_size"]]
    if bad:
        raise ValueError(f"prompt token ids must lie in [0, {cfg['vocab_size']}), got {bad[:5]}")
    ctx = int(cfg["max_seq_len"])
    if len(prompt_ids) + int(max_new_tokens) > ctx:
        room = ctx - len(prompt_ids)
        hint = f"use max_new_tokens <= {room}" if room >= 1 else "shorten the prompt"
        raise ValueError(f"the prompt's {len(prompt_ids)} tokens + max_new_tokens={max_new_tokens} exceed the "
                         f"model's context of {ctx} tokens; {hint}")
    eos_ids = stop_token_ids(model, chat=is_chat)
    return GenerationStream(_run(model, prompt_ids, prompt_text, int(max_new_tokens), float(temperature), top_k,
                                 top_p, seed, stop_strings, stop_ids, eos_ids), prompt_ids, prompt_text)


def _decoding_steps(model, n_positions: int):
    """``(prefill(ids) -> logits, step(id) -> logits)`` over the best decoding interface the
    model's runner offers; the logits are the last position's, on the model's device:

    - a model on a GPU (and no hooks): its ``decoder()``, a fixed-shape decoding step;
    - else ``step()`` over a preallocated key/value cache (``new_cache()``).

    ``n_positions``: the prompt plus the new tokens (the cache's capacity)."""
    on_gpu = model.xp is not np
    hooked = bool(model._linear_hooks or model._attn_hooks)
    if on_gpu and not hooked:
        d = model.decoder(capacity=n_positions)
        return d.prefill, d.next
    kv = model.new_cache(capacity=n_positions)
    return (lambda ids: model.step(np.asarray([ids], dtype=np.int64), kv),
            lambda t: model.step(np.array([[t]], dtype=np.int64), kv))


def _run(model, prompt_ids, prompt_text, max_new_tokens, temperature, top_k, top_p, seed, stop_strings, stop_ids,
         eos_ids) -> Iterator[str]:
    tok = getattr(model, "tokenizer", None)
    rng = np.random.default_rng(seed)
    # decoding the new ids after a few prompt ids and dropping the prompt's text keeps the
    # separating space sentencepiece strips from a text's first piece
    ctx_ids = prompt_ids[-8:]
    ctx_text = tok.decode(ctx_ids) if tok is not None else ""
    out: list[int] = []
    text, streamed, sent = "", "", 0
    finish = "length"
    prefill, step = _decoding_steps(model, len(prompt_ids) + max_new_tokens)
    vocab = int(model.config["vocab_size"])
    t0 = time.perf_counter()
    logits = prefill(prompt_ids)
    t_prefill, t_decode = None, 0.0
    while True:
        nxt = next_token(to_host(logits).reshape(-1, vocab)[-1], temperature, top_k, top_p, rng)
        # only the model and the token choice are timed, not the consumer of the stream
        if t_prefill is None:
            t_prefill = time.perf_counter() - t0
        else:
            t_decode += time.perf_counter() - t0
        out.append(nxt)
        if nxt in eos_ids or nxt in stop_ids:
            finish = "eos" if nxt in eos_ids else "stop"
            new_text = text
        elif tok is not None:
            full = tok.decode(ctx_ids + out)
            new_text = full[len(ctx_text):] if full.startswith(ctx_text) else tok.decode(out)
        else:
            new_text = ""
        cut = -1
        for s in stop_strings:
            j = new_text.find(s, max(0, sent - len(s)))
            if j >= 0 and (cut < 0 or j < cut):
                cut = j
        if cut >= 0:
            new_text, finish = new_text[:cut], "stop"
        text = new_text
        done = finish != "length" or len(out) >= max_new_tokens
        # hold back a trailing partial UTF-8 character and a possible start of a stop string
        hold = 0 if done else max(_held_back(text, stop_strings), 1 if text.endswith("\ufffd") else 0)
        # a piece once streamed cannot be taken back: stream only text that extends it
        if len(text) - hold > sent and text.startswith(streamed):
            piece = text[sent:len(text) - hold]
            sent = len(text) - hold
            streamed += piece
            yield piece
        if done:
            break
        t0 = time.perf_counter()
        logits = step(nxt)
    return Generation(text=text, token_ids=out, prompt_ids=list(prompt_ids), finish_reason=finish,
                      prefill_seconds=t_prefill, decode_seconds=t_decode, method=getattr(model, "method", ""),
                      prompt_text=prompt_text)


def generate(model, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, stop=None, stream: Callable[[str], None] | None = None,
             chat: bool = False, system: str | None = None) -> Generation:
    """Generate text after ``prompt`` with ``model`` (a :class:`Model`, float or quantized, on the
    CPU or the device its layers were quantized onto). Returns a :class:`Generation` (``text``,
    ``token_ids``, ``finish_reason``, timings).

    prompt: a str (encoded with the model's tokenizer, BOS first), a list of chat messages
    ({"role", "content"} dicts, rendered with the checkpoint's chat template), or a sequence of
    token ids (used as given). ``chat=True`` renders a str prompt as one user message (after a
    ``system`` message when given) through the chat template; the model must carry one.
    max_new_tokens >= 1: at most this many tokens; the prompt plus them must fit the model's
    context (``config["max_seq_len"]``). temperature (0 = greedy, the default), top_k >= 1,
    0 < top_p <= 1, seed: sampling, see the module docstring; top_k / top_p need temperature > 0.
    stop: a string, a token id, or a list of them: generation ends when the text contains a stop
    string (cut off before it) or a stop id is drawn. Generation always ends at the EOS token, and
    in chat mode at the end-of-turn tokens (:func:`stop_token_ids`).
    stream: called with each new piece of text as soon as it is known (a partial UTF-8
    character or the possible start of a stop string is held back until resolved); the pieces
    concatenate to ``text``. For an iterator instead, see :func:`stream_generate`.

    Raises ValueError for an argument out of range, with what was expected."""
    it = stream_generate(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, seed=seed, stop=stop, chat=chat, system=system)
    for piece in it:
        if stream is not None:
            stream(piece)
    return it.result
