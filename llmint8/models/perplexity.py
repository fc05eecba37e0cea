"""Sliding-window perplexity of a model over a token sequence.

On a GPU model the log-softmax runs on the device too: per window only the sum of the
negative log-likelihoods (one float64) comes back to the host."""

from __future__ import annotations

import math
import os
import time
import warnings

import numpy as np

from .._cli import format_duration
from .device import to_host, xp_of

__all__ = ["perplexity", "token_nll", "read_text"]

#: perplexity() warns when scoring all its tokens would take longer than this (seconds),
#: estimated from its first window, naming max_tokens.
SLOW_WARNING_S = 60.0


def read_text(path, max_chars: int | None = None) -> str:
    """The text of a UTF-8 file to score or calibrate on (a leading byte-order mark dropped).

    max_chars: read only the first ``max_chars`` characters (None: the whole file).
    A file that is not text raises ValueError naming it: a NUL byte (a binary file) or bytes
    that are not UTF-8, with their offset; such files used to be decoded with replacement
    characters and scored as if they were text."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read() if max_chars is None else f.read(4 * max_chars + 3)  # UTF-8: <= 4 bytes a character
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{path}: a NUL byte at offset {nul}: a binary file, not text; expected a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not (max_chars is not None and e.reason == "unexpected end of data" and e.start >= len(data) - 3):
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); expected a UTF-8 text file "
                             f"(convert it, e.g. with iconv)") from None
        text = data[:e.start].decode("utf-8")  # only the last character was cut by the read limit
    if text.startswith("\ufeff"):
        text = text[1:]
    return text if max_chars is None else text[:max_chars]


def token_nll(model, tokens) -> np.ndarray:
    """Negative log-likelihood (nats) of each predicted token of one sequence in one window.

    tokens: int sequence (seq,) -> float64 array (seq-1,): -log p(tokens[t] | tokens[:t])."""
    tokens = np.asarray(tokens, dtype=np.int64)
    h = model.forward(tokens[None, :-1], logits=False)[0]
    return to_host(_nll_rows(model, h, tokens[1:]))


def _nll_rows(model, h, targets, block=64):
    """-log softmax(logits)[target] per row of hidden states h (n, dim) -> float64 (n,).

    The logits stay float32 (a block of rows at a time, so a 262k vocabulary costs 64 MB, not a
    float64 copy of the whole window): the max is subtracted in float32, exp is taken in float32
    and only the row sums and the final log-sum-exp are float64. exp(l - max) is in (0, 1] with a
    relative error of ~1e-7 per term, so the result agrees with a float64 log-softmax to ~1e-7.

    ``h`` and the result are arrays of the model's device (NumPy, or CuPy on a GPU)."""
    xp = xp_of(h)
    if xp is not np:
        targets = xp.asarray(targets)
    out = xp.empty(len(targets), dtype=np.float64)
    for s in range(0, len(targets), block):
        lg = model.logits_from_hidden(h[s:s + block])
        if xp is np:
            lg = np.asarray(lg, dtype=np.float32)
            if lg.base is not None or not lg.flags.writeable:
                lg = lg.copy()  # worked on in place below: never a view of someone else's array
        else:
            lg = lg.astype(np.float32, copy=True)
        rows = xp.arange(lg.shape[0])
        target = lg[rows, targets[s:s + block]].astype(np.float64)
        m = lg.max(axis=-1, keepdims=True)
        xp.subtract(lg, m, out=lg)
        xp.exp(lg, out=lg)
        total = lg.sum(axis=-1, dtype=np.float64)
        out[s:s + block] = m[:, 0].astype(np.float64) + xp.log(total) - target
    return out


def perplexity(model, tokens, context: int = 256, stride: int = 128, progress: bool = True,
               max_tokens: int | None = None) -> dict:
    """Perplexity of ``model`` over ``tokens`` (int sequence (n,)) with a sliding window.

    Windows of ``context`` tokens start every ``stride`` tokens; each token is scored once, in the
    first window where it is new, so with stride < context later tokens see at least
    ``context - stride`` tokens of context. Returns dict(nll=mean nats per predicted token,
    ppl=exp(nll), n_tokens=number of predicted tokens, context=..., stride=...).

    max_tokens: score only the first ``max_tokens`` tokens (None: all of them). Scoring a whole
    corpus takes long (the WikiText-2 test split is ~800k tokens: about an hour for stories260K,
    more for larger models): when the first window says the rest will take more than a minute,
    a RuntimeWarning gives the estimate and names max_tokens."""
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
    if max_tokens is not None:
        if int(max_tokens) < 2:
            raise ValueError(f"max_tokens must be >= 2 (or None for all tokens), got {max_tokens}")
        tokens = tokens[:int(max_tokens)]
    n = len(tokens)
    if n < 2:
        raise ValueError(f"need at least 2 tokens for perplexity, got {n}")
    context, stride = int(context), int(stride)
    if context > model.config["max_seq_len"]:
        raise ValueError(f"context={context} exceeds the model's maximum sequence length "
                         f"(max_seq_len={model.config['max_seq_len']}); expected context <= max_seq_len")
    if context < 2 or not 1 <= stride <= context:
        raise ValueError(f"expected context >= 2 and 1 <= stride <= context, got context={context} stride={stride}")
    windows, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)  # first token index scored in this window
        if end > first:
            windows.append((begin, end, first))
        prev_end = end
        if end == n:
            break
        begin += stride
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n - 1, desc=f"ppl {getattr(model, 'method', '')}".strip(), unit="tok", leave=False)
    total, count = 0.0, 0
    try:
        for i, (begin, end, first) in enumerate(windows):
            t0 = time.perf_counter()
            # hidden states for inputs begin..end-2 predict tokens begin+1..end-1
            h = model.forward(tokens[None, begin:end - 1], logits=False)[0]
            rows = h[first - 1 - begin:]
            nll = _nll_rows(model, rows, tokens[first:end])
            total += float(nll.sum())
            count += len(nll)
            if bar is not None:
                bar.update(len(nll))
            if i == 0 and len(windows) > 1:
                rest = (time.perf_counter() - t0) * (len(windows) - 1)
                if rest > SLOW_WARNING_S:
                    warnings.warn(f"perplexity: {n} tokens in {len(windows)} windows of {context} will take about "
                                  f"{format_duration(rest)} more (measured on the first window); pass max_tokens=N to "
                                  f"score the first N tokens only", RuntimeWarning, stacklevel=2)
    finally:
        if bar is not None:
            bar.close()
    mean = total / count
    return dict(nll=mean, ppl=math.exp(mean), n_tokens=count, context=context, stride=stride)

