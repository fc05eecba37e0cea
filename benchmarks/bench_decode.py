"""CPU benchmark: decoding speed at a long context, on any llmint8 checkout.

Runs a --context-token random prompt through the model, then times --tokens greedy steps
of one token each: with ``Model.new_cache`` / ``Model.step`` (the preallocated KV cache)
where the checkout has them, else with the dict cache of ``Model.hidden_states`` that
grew by concatenation. So the same script times the runner before and after the KV cache:

    PYTHONPATH=/path/to/old/checkout python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py

Prints the best of --repeat runs per method, in milliseconds per token and tokens/s, with
the process's CPU time as the clock (--clock cpu, the default: other processes on the
machine do not count) or the wall clock. Run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
LLMINT8_NUM_THREADS=1 for one thread per library. The model is a zoo name or a path.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def decode_seconds(model, prompt: list[int], n: int, clock) -> float:
    """Seconds for n greedy single-token steps after prompt."""
    if hasattr(model, "new_cache"):
        cache = model.new_cache(capacity=len(prompt) + n + 1)
        nxt = int(np.argmax(model.step([prompt], cache)[0]))
        t0 = clock()
        for _ in range(n):
            nxt = int(np.argmax(model.step([[nxt]], cache)[0]))
        return clock() - t0
    cache: dict = {}
    h = model.hidden_states(np.array([prompt]), start_pos=0, cache=cache)
    nxt = int(np.argmax(model.logits_from_hidden(h[0, -1])))
    t0 = clock()
    for i in range(n):
        h = model.hidden_states(np.array([[nxt]]), start_pos=len(prompt) + i, cache=cache)
        nxt = int(np.argmax(model.logits_from_hidden(h[0, -1])))
    return clock() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="zoo name or model path")
    ap.add_argument("--methods", default="llm.int8,float")
    ap.add_argument("--context", type=int, default=512, help="prompt tokens before the timed steps")
    ap.add_argument("--tokens", type=int, default=16, help="timed decoding steps")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    a = ap.parse_args(argv)
    import llmint8
    from llmint8.models import load_model, zoo

    path = a.model
    if not os.path.exists(path):
        path = zoo.cached_path(a.model)
        if path is None:
            print(f"bench_decode: {a.model} is not cached; fetch it with "
                  f"python -c \"from llmint8.models import zoo; zoo.fetch('{a.model}')\"", file=sys.stderr)
            return 2
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    print(f"llmint8 {llmint8.__file__}, model {a.model}, context {a.context}, {a.tokens} tokens, "
          f"best of {a.repeat}, clock {a.clock}, load average {os.getloadavg()[0]:.1f}")
    base = load_model(path)
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(0, base.config["vocab_size"], a.context)]
    for method in a.methods.split(","):
        model = base if method == "float" else base.quantize(method)
        best = min(decode_seconds(model, prompt, a.tokens, clock) for _ in range(a.repeat)) / a.tokens
        print(f"{method:>10}  {best * 1e3:8.2f} ms/token  {1 / best:7.2f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
