"""Speed of the NumPy model runner by method: prefill over perplexity windows, decode with the
key/value cache, and peak memory, for float, fp16 and llm.int8 on the real models at hand.

    python benchmarks/bench_models.py                       # every available model, 512 tokens
    python benchmarks/bench_models.py --models stories260K --tokens 2048 --repeat 5

Models: stories260K (shared data folder), smollm2-135m and gemma3-270m (zoo, only if already
cached: fetch them with ``python -c "from llmint8.models import zoo; zoo.fetch('NAME')"``);
missing ones are skipped with a note. Each (model, method) runs in its own process so that its
peak RSS (``ru_maxrss``) is its own. Prefill: ``perplexity`` over the first ``--tokens`` tokens of
WikiText-2 (context 256, stride 128; every scored token, window overlap included in the time),
best of ``--repeat``. Decode: greedy ``generate`` of 32 tokens after a 16-token prompt, best of
``--repeat``. The ratio columns compare with float in the same run.
``--clock cpu`` times with the process's CPU time instead of the wall clock: with one thread
per library (``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1``) it counts the work done and not the
time other processes held the cores, so ratios hold on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from benchutil import cpu_model

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

MODELS = ("stories260K", "smollm2-135m", "gemma3-270m")
METHODS = ("float", "fp16", "llm.int8")


def _text_path():
    from llmint8.models import zoo

    d = zoo.data_dir()
    p = os.path.join(d, "text", "wikitext2_test.txt") if d else None
    return p if p and os.path.exists(p) else None


def _available(name: str):
    from llmint8.models import zoo

    return zoo.cached_path(name)


def worker(model_name: str, method: str, n_tokens: int, repeat: int, clock: str = "wall") -> dict:
    """Measure one (model, method) in this process; returns a dict of numbers."""
    import numpy as np

    now = time.process_time if clock == "cpu" else time.perf_counter

    from llmint8.models import load_model, perplexity

    path = _available(model_name)
    model = load_model(path)
    with open(_text_path(), encoding="utf-8") as f:
        text = f.read(n_tokens * 16)
    tokens = np.asarray(model.tokenizer.encode(text, bos=True)[:n_tokens])
    qm = model if method == "float" else model.quantize(method)
    best_ppl_t, ppl = float("inf"), None
    for _ in range(repeat):
        t0 = now()
        r = perplexity(qm, tokens, context=256, stride=128, progress=False)
        best_ppl_t = min(best_ppl_t, now() - t0)
        ppl = r["ppl"]
    n_dec = 32
    prompt = [int(t) for t in tokens[:16]]
    best_dec_t = float("inf")
    for _ in range(repeat):
        cache: dict = {}
        h = qm.hidden_states(np.array([prompt]), start_pos=0, cache=cache)
        nxt = int(np.argmax(qm.logits_from_hidden(h[0, -1])))
        t0 = now()
        for i in range(n_dec):
            h = qm.hidden_states(np.array([[nxt]]), start_pos=len(prompt) + i, cache=cache)
            nxt = int(np.argmax(qm.logits_from_hidden(h[0, -1])))
        best_dec_t = min(best_dec_t, now() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return dict(model=model.name, method=method, n_tokens=len(tokens), ppl=ppl,
                prefill_tok_s=(len(tokens) - 1) / best_ppl_t, decode_tok_s=n_dec / best_dec_t,
                peak_rss_mib=rss / 2**20, linear_mib=qm.linear_weight_nbytes / 2**20)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all available)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--tokens", type=int, default=512, help="tokens scored for prefill (default 512)")
    p.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock (default) or the process's CPU time (see above)")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.tokens, a.repeat, a.clock)))
        return 0
    import llmint8

    if _text_path() is None:
        print("WikiText-2 (text/wikitext2_test.txt) not found in the shared data folder; set LLMINT8_DATA")
        return 1
    info = llmint8.build_info()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"llmint8 threads {llmint8.get_num_threads()}, kernel {info.get('cpu_kernel')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"prefill: perplexity over {a.tokens} tokens (context 256, stride 128); decode: 32 tokens with the "
          f"KV cache after a 16-token prompt; best of {a.repeat}; {a.clock} clock\n")
    head = (f"{'model':<14} {'method':<9} {'prefill tok/s':>13} {'x float':>7} {'decode tok/s':>12} "
            f"{'x float':>7} {'peak RSS MiB':>12} {'linear MiB':>10} {'perplexity':>10}")
    print(head)
    print("-" * len(head))
    rows = []
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        if _available(name) is None:
            print(f"{name:<14} (not available here: skipped)")
            continue
        base = None
        for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, method,
                                "--tokens", str(a.tokens), "--repeat", str(a.repeat), "--clock", a.clock],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name:<14} {method:<9} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            if method == "float":
                base = row
            pf = row["prefill_tok_s"] / base["prefill_tok_s"] if base else float("nan")
            df = row["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
            print(f"{name:<14} {method:<9} {row['prefill_tok_s']:>13.0f} {pf:>7.2f} {row['decode_tok_s']:>12.1f} "
                  f"{df:>7.2f} {row['peak_rss_mib']:>12.0f} {row['linear_mib']:>10.1f} {row['ppl']:>10.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
