"""The zeroing experiment's top-1 attention measurement (independent mode, the paper's), by blocks
against whole forward passes, on one real model: wall and CPU seconds, the ratio, and a check
that both give the same numbers bit for bit.

    python benchmarks/bench_analyze.py                                  # stories260K, 512 tokens
    python benchmarks/bench_analyze.py --model smollm2-135m --tokens 256 --seq-len 128

"By blocks" is what ``zeroing_experiment`` does on an llmint8 model: each sequence runs once
through the unmodified blocks and, at every block, the block alone is run again per condition
with the features zeroed, up to its attention probabilities. "Whole forward passes" is the
generic path (any model with the hook interface): one forward pass per condition, layer and
sequence, stopped after the layer it measures, about L/2 blocks each. Conditions: the baseline,
the features given (default: the model's 4 largest-magnitude ones) and ``--seeds`` random controls.
CPU seconds are ``time.process_time`` (user + sys of every thread), less sensitive than wall
seconds to other jobs on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchutil import cpu_model  # noqa: E402


class _WholeForward:
    """The model without ``embed`` / ``run_blocks``: the experiment falls back to whole passes."""

    def __init__(self, model):
        self._m = model

    def __getattr__(self, k):
        if k in ("embed", "run_blocks"):
            raise AttributeError(k)
        return getattr(self._m, k)


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="stories260K")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--features", default=None, help="comma-separated feature indices (default: 4 largest)")
    args = p.parse_args(argv)

    from llmint8.analysis import analyze_model, tokenize_text, zeroing_experiment
    from llmint8.models import load_model, zoo

    model = load_model(args.model)
    d = zoo.data_dir()
    text = open(os.path.join(d, "text", "wikitext2_test.txt"), encoding="utf-8").read() if d else "Once upon a time " * 500
    tokens = tokenize_text(model, text, args.tokens)
    if args.features:
        feats = [int(f) for f in args.features.split(",")]
    else:
        res = analyze_model(model, tokens, seq_len=args.seq_len)
        feats = [int(i) for i in np.argsort(-res.max_abs.max(axis=0), kind="stable")[:4]]
    kw = dict(seeds=tuple(range(args.seeds)), seq_len=args.seq_len, measure_ppl=False)
    fast, w_fast, c_fast = _timed(lambda: zeroing_experiment(model, tokens, feats, **kw))
    slow, w_slow, c_slow = _timed(lambda: zeroing_experiment(_WholeForward(model), tokens, feats, **kw))
    same = fast.to_dict() == slow.to_dict()
    L = model.config["n_layers"]
    print(f"{model.name}: {L} layers, {tokens.size} tokens in sequences of {args.seq_len}, features {feats}, "
          f"{2 + args.seeds} conditions; {cpu_model()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'top-1 attention (independent)':<32} {'wall s':>8} {'CPU s':>8}")
    print(f"{'whole forward passes':<32} {w_slow:>8.1f} {c_slow:>8.1f}")
    print(f"{'by blocks, prefix reused':<32} {w_fast:>8.1f} {c_fast:>8.1f}")
    print(f"speed-up: {w_slow / w_fast:.1f}x wall, {c_slow / c_fast:.1f}x CPU; identical results: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
