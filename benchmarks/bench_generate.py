"""Generation speed and agreement by method: prefill and decode tokens/s of greedy decoding
(llmint8.models.generate) for each method, and the first generated token where each method's
text leaves the float model's.

    python benchmarks/bench_generate.py [--models stories260K,smollm2-135m] [--methods float,fp16,llm.int8]
        [--prompt-tokens 32] [--new-tokens 64] [--rounds 3] [--blas-threads 1]

The prompt is the first --prompt-tokens tokens of the WikiText-2 test text (shared data) or of a
fixed English sentence when it is absent. EOS is ignored (the config's is cleared) so that every
method decodes the same number of tokens. Rounds alternate the methods (float, fp16, llm.int8,
float, ...) so that a neighbour's load falls on all of them; each figure is the median of the
rounds. Zoo models other than stories260K run only when already cached.
"""
import argparse
import os
import statistics
import sys
import time


def _blas_threads_from_argv():
    """--blas-threads N must act before NumPy loads OpenBLAS, so it is read here."""
    for i, a in enumerate(sys.argv):
        if a.startswith("--blas-threads"):
            n = a.split("=", 1)[1] if "=" in a else sys.argv[i + 1]
            for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = n


_blas_threads_from_argv()

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchutil import cpu_model  # noqa: E402

FALLBACK = "The history of the city begins with a small settlement on the river, where traders met. " * 8


def _prompt_text():
    from llmint8.models import zoo

    for d in zoo.data_dir_candidates():
        p = os.path.join(d, "text", "wikitext2_test.txt")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                return " ".join(f.read(20000).split())
    return FALLBACK


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="stories260K,smollm2-135m")
    ap.add_argument("--methods", default="float,fp16,llm.int8")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blas-threads", default=None, help="OpenBLAS threads (set before NumPy loads)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()

    import llmint8
    from llmint8.models import generate, load_model, zoo

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    print(f"{cpu_model()}, llmint8 {llmint8.__version__}, kernel {llmint8.cpu_kernels()[-1]}, "
          f"BLAS threads {args.blas_threads or 'default'}, device {args.device}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}")
    text = _prompt_text()
    print(f"| model | method | prompt tokens | new tokens | prefill tok/s | decode tok/s | first difference from float |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name != "stories260K" and zoo.is_zoo_name(name) and zoo.cached_path(name) is None:
            print(f"| {name} | not cached: skipped |  |  |  |  |  |")
            continue
        model = load_model(name, device=args.device)
        prompt = model.tokenizer.encode(text, bos=True)[:args.prompt_tokens]
        # no stop token (EOS, and BOS for llama2.c files, found through the source path), so that
        # every method decodes --new-tokens tokens
        model.config = dict(model.config, eos_id=None)
        model.tokenizer.eos_id = None
        model.source = ""
        ms = {m: model if m == "float" else model.quantize(m, device=args.device) for m in methods}
        runs = {m: [] for m in methods}
        for _ in range(args.rounds):
            for m in methods:
                runs[m].append(generate(ms[m], prompt, max_new_tokens=args.new_tokens))
        base = runs[methods[0]][0].token_ids
        for m in methods:
            g = runs[m][0]
            pre = statistics.median(len(prompt) / r.prefill_seconds for r in runs[m])
            dec = statistics.median(r.decode_tokens_per_second for r in runs[m])
            i = next((k for k, (a, b) in enumerate(zip(base, g.token_ids)) if a != b), None)
            diff = "-" if m == methods[0] else ("identical" if i is None else f"token {i}")
            print(f"| {name} | {m} | {len(prompt)} | {len(g.token_ids)} | {pre:.0f} | {dec:.1f} | {diff} |",
                  flush=True)


if __name__ == "__main__":
    main()
