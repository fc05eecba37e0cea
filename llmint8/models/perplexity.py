"""Sliding-window perplexity of a model over a token sequence.

On a GPU model the log-softmax runs on the device too: per window only the sum of the
negative log-likelihoods (one float64) comes back to the host."""

from __future__ import annotations

import math

import numpy as np

from .device import to_host, xp_of

__all__ = ["perplexity", "token_nll"]


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


def perplexity(model, tokens, context: int = 256, stride: int = 128, progress: bool = True) -> dict:
    """Perplexity of ``model`` over ``tokens`` (int sequence (n,)) with a sliding window.

    Windows of ``context`` tokens start every ``stride`` tokens; each token is scored once, in the
    first window where it is new, so with stride < context later tokens see at least
    ``context - stride`` tokens of context. Returns dict(nll=mean nats per predicted token,
    ppl=exp(nll), n_tokens=number of predicted tokens, context=..., stride=...)."""
    tokens = np.asarray(tokens, dtype=np.int64).ravel()
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
        for begin, end, first in windows:
            # hidden states for inputs begin..end-2 predict tokens begin+1..end-1
            h = model.forward(tokens[None, begin:end - 1], logits=False)[0]
            rows = h[first - 1 - begin:]
            nll = _nll_rows(model, rows, tokens[first:end])
            total += float(nll.sum())
            count += len(nll)
            if bar is not None:
                bar.update(len(nll))
    finally:
        if bar is not None:
            bar.close()
    mean = total / count
    return dict(nll=mean, ppl=math.exp(mean), n_tokens=count, context=context, stride=stride)
