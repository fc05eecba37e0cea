"""Speed of the model runner by method: prefill over perplexity windows, decode with the
key/value cache, and peak memory, for float, fp16 and llm.int8, on the CPU or a GPU.

    python benchmarks/bench_models.py                       # every available model, 512 tokens, CPU
    python benchmarks/bench_models.py --models stories260K --tokens 2048 --repeat 5
    python benchmarks/bench_models.py --models smollm2-135m --decode-context 512   # decode at 512 tokens
    python benchmarks/bench_models.py --device cuda --models synthetic:smollm2-135m,synthetic:llama3-8b:2

Models: stories260K (shared data folder), smollm2-135m and gemma3-270m (zoo, only if already
cached: fetch them with ``python -c "from llmint8.models import zoo; zoo.fetch('NAME')"``);
missing ones are skipped with a note. ``synthetic:SHAPE[:BLOCKS]`` is a random model with a real
model's layer shapes and injected outlier features (:mod:`llmint8.models.synthetic`; SHAPE one
of smollm2-135m, llama3-8b, tiny; the Llama-3 one with a 32000-entry vocabulary to keep its
set-up short); it is scored on random token ids.

Each (model, method) runs in its own process so that its peak memory is its own. Prefill:
``perplexity`` over the first ``--tokens`` tokens (context 256, stride 128; every scored token,
window overlap included in the time, log-softmax included), best of ``--repeat``. Decode: greedy
decoding of 32 tokens with a preallocated KV cache after a ``--decode-context``-token prompt
(default 16), best of ``--repeat``. The ratio columns compare with float in the same run.

On ``--device cuda`` the whole forward runs on the GPU (CuPy); times are wall-clock with a
synchronization at the end of each measured loop; "GPU MiB" is the device memory in use after
the runs (CuPy's pool and llmint8's stream-ordered pool keep what they once held, so this is the
peak); "launches/token" counts the kernel nodes of one decode step captured into a CUDA graph
(the number of kernels a decoded token launches without a graph); "graph decode" is the same
decoding through ``Model.decoder`` (fixed-shape step replayed as one CUDA graph per token) and
"graph kernels" the kernel nodes of that graph; "x CPU" is the prefill throughput against the
CPU float path of the same model in the same process.

``--clock cpu`` times with the process's CPU time instead of the wall clock: with one thread
per library (``OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1``) it counts the work done and not the
time other processes held the cores, so ratios hold on a shared machine (CPU only).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from benchutil import cpu_model  # noqa: E402

MODELS = ("stories260K", "smollm2-135m", "gemma3-270m")
METHODS = ("float", "fp16", "llm.int8")
N_DECODE = 32


def _text_path():
    from llmint8.models import zoo

    d = zoo.data_dir()
    p = os.path.join(d, "text", "wikitext2_test.txt") if d else None
    return p if p and os.path.exists(p) else None


def _available(name: str):
    if name.startswith("synthetic:"):
        return name
    from llmint8.models import zoo

    return zoo.cached_path(name)


def load(name: str, device: str = "cpu"):
    """(model, tokens source) for a model spec of this script."""
    from llmint8.models import load_model

    if name.startswith("synthetic:"):
        from llmint8.models.synthetic import synthetic_model

        parts = name.split(":")
        shape = parts[1]
        blocks = int(parts[2]) if len(parts) > 2 else None
        extra = {"vocab_size": 32000} if shape == "llama3-8b" else {}
        m = synthetic_model(shape, n_layers=blocks, **extra)
        return m.to(device)
    return load_model(_available(name), device=device)


def _tokens(model, n_tokens):
    import numpy as np

    if model.tokenizer is None or _text_path() is None:
        return np.random.default_rng(0).integers(0, model.config["vocab_size"], n_tokens)
    with open(_text_path(), encoding="utf-8") as f:
        text = f.read(n_tokens * 16)
    return np.asarray(model.tokenizer.encode(text, bos=True)[:n_tokens])


def _sync(model):
    xp = getattr(model, "xp", None)
    if xp is not None and xp.__name__ == "cupy":
        xp.cuda.get_current_stream().synchronize()


def _gpu_used(xp) -> int:
    free, total = xp.cuda.runtime.memGetInfo()
    return int(total - free)


def _decode_loop(qm, cache, first, n):
    xp = qm.xp
    nxt = first
    for _ in range(n):
        lg = qm.step([[nxt]], cache)
        nxt = int(xp.argmax(lg[0]))
    return nxt


def count_launches(qm, prompt):
    """Kernel nodes of one decode step captured into a CUDA graph on a fresh stream, or a string
    saying why the step could not be captured."""
    from llmint8 import cuda
    from llmint8.models.transformer import graph_kernel_nodes

    xp = qm.xp
    cache = qm.new_cache(capacity=len(prompt) + 8)
    qm.step([prompt], cache)
    ids = xp.asarray([[2]])  # the token on the device already: a capture may not copy from the host
    qm.step(ids, cache)  # warm: every kernel compiled, every array allocated once
    cache.length -= 1
    s = xp.cuda.Stream(non_blocking=True)
    try:
        try:
            with s:
                s.begin_capture()
                try:
                    qm.step(ids, cache)
                finally:
                    g = s.end_capture()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            return f"capture failed: {str(e).splitlines()[0][:80]}"
        n = graph_kernel_nodes(g)
        return "cuGraphGetNodes failed" if n is None else n
    finally:
        cuda.set_stream(1)


def worker(model_name: str, method: str, n_tokens: int, repeat: int, device: str, decode_context: int,
           cache_kind: str = "kv", clock: str = "wall") -> dict:
    """Measure one (model, method) in this process; returns a dict of numbers."""
    import numpy as np

    now = time.process_time if clock == "cpu" else time.perf_counter

    from llmint8.models import perplexity

    gpu = device != "cpu"
    base_used = 0
    if gpu:
        from llmint8.models.device import namespace

        xp = namespace(device)
        xp.zeros(1)  # the CUDA context, before any model memory
        base_used = _gpu_used(xp)
    model = load(model_name, device)
    tokens = _tokens(model, n_tokens)
    qm = model if method == "float" else model.quantize(method)
    if method != "float":
        del model
    best_ppl_t, ppl = float("inf"), None
    for _ in range(repeat + gpu):  # on the GPU one more: the first call compiles CuPy's kernels
        t0 = now()
        r = perplexity(qm, tokens, context=256, stride=128, progress=False)
        _sync(qm)
        best_ppl_t = min(best_ppl_t, now() - t0)
        ppl = r["ppl"]
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in (tokens[:decode_context] if len(tokens) >= decode_context else
                               rng.integers(0, qm.config["vocab_size"], decode_context))]
    best_dec_t = float("inf")
    new_cache = getattr(qm, "new_cache", None) if cache_kind == "kv" else None
    for _ in range(repeat + gpu):
        if new_cache is not None:
            cache = new_cache(capacity=len(prompt) + N_DECODE + 1)
            nxt = int(qm.xp.argmax(qm.step([prompt], cache)[0]))
            _sync(qm)
            t0 = now()
            _decode_loop(qm, cache, nxt, N_DECODE)
        else:  # the concatenating dict cache the runner had before KVCache (kept for comparisons)
            cache = {}
            h = qm.hidden_states(np.array([prompt]), start_pos=0, cache=cache)
            nxt = int(np.argmax(qm.logits_from_hidden(h[0, -1])))
            t0 = now()
            for i in range(N_DECODE):
                h = qm.hidden_states(np.array([[nxt]]), start_pos=len(prompt) + i, cache=cache)
                nxt = int(np.argmax(qm.logits_from_hidden(h[0, -1])))
        _sync(qm)
        best_dec_t = min(best_dec_t, now() - t0)
    graph_t, kernels = float("inf"), None
    if gpu:
        # the same decoding as one CUDA graph per token (Model.decoder): the GPU's fast path
        dec = qm.decoder(capacity=len(prompt) + N_DECODE + 2)
        for _ in range(repeat + 1):
            dec.reset()
            nxt = int(qm.xp.argmax(dec.prefill(prompt)[0]))
            _sync(qm)
            t0 = time.perf_counter()
            for _ in range(N_DECODE):
                nxt = int(qm.xp.argmax(dec.next(nxt)[0]))
            _sync(qm)
            graph_t = min(graph_t, time.perf_counter() - t0)
        kernels = dec.kernels if dec.capture_error is None else f"eager: {dec.capture_error[:40]}"
    out = dict(model=qm.name, method=method, device=device, n_tokens=len(tokens), ppl=ppl,
               prefill_tok_s=(len(tokens) - 1) / best_ppl_t, decode_tok_s=N_DECODE / best_dec_t,
               decode_context=len(prompt), linear_mib=qm.linear_weight_nbytes / 2**20)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    out["peak_rss_mib"] = rss / 2**20
    if gpu:
        out["gpu_mib"] = (_gpu_used(qm.xp) - base_used) / 2**20
        out["launches"] = count_launches(qm, prompt[:16])
        out["graph_decode_tok_s"] = N_DECODE / graph_t
        out["graph_kernels"] = kernels
        if method == "float":  # the CPU float path of the same model, for the GPU/CPU prefill ratio
            cpu = qm.to("cpu")
            toks = tokens[: min(len(tokens), 257)]
            t0 = time.perf_counter()
            perplexity(cpu, toks, context=256, stride=128, progress=False)
            out["cpu_prefill_tok_s"] = (len(toks) - 1) / (time.perf_counter() - t0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated (default: every available real model on the CPU; "
                                                  "synthetic:smollm2-135m,synthetic:llama3-8b:2 on a GPU)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--tokens", type=int, default=512, help="tokens scored for prefill (default 512)")
    p.add_argument("--decode-context", type=int, default=16,
                   help="prompt tokens before the 32 decoded ones (default 16)")
    p.add_argument("--repeat", type=int, default=3, help="best of N (default 3)")
    p.add_argument("--cache", default="kv", choices=["kv", "dict"],
                   help="decode with the preallocated KVCache (default) or the concatenating dict cache (CPU)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock (default) or the process's CPU time (see above; CPU only)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker[0], a.worker[1], a.tokens, a.repeat, a.device, a.decode_context, a.cache,
                                      a.clock)))
        return 0
    import llmint8

    gpu = a.device != "cpu"
    if a.models is None:
        a.models = "synthetic:smollm2-135m,synthetic:llama3-8b:2" if gpu else ",".join(MODELS)
    if gpu:
        from llmint8.models.device import DeviceError, namespace

        try:
            xp = namespace(a.device)
        except DeviceError as e:
            print(f"--device {a.device}: {e}")
            return 1
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        print(f"GPU: {props['name'].decode()}, CuPy {xp.__version__}, llmint8 CUDA backend "
              f"{'available' if llmint8.cuda_available() else 'NOT available'}")
    info = llmint8.build_info()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f}; "
          f"llmint8 threads {llmint8.get_num_threads()}, kernel {info.get('cpu_kernel')}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '-')}")
    print(f"prefill: perplexity over {a.tokens} tokens (context 256, stride 128); decode: {N_DECODE} tokens with the "
          f"KV cache after a {a.decode_context}-token prompt; best of {a.repeat}; {a.clock} clock\n")
    head = (f"{'model':<24} {'method':<9} {'prefill tok/s':>13} {'x float':>7} {'decode tok/s':>12} "
            f"{'x float':>7} {'peak RSS MiB':>12} {'linear MiB':>10} {'perplexity':>10}")
    if gpu:
        head = head.replace("decode tok/s", "eager decode")
        head += f" {'GPU MiB':>8} {'launches/token':>14} {'x CPU':>6} {'graph decode':>12} {'x float':>7} {'graph kernels':>13}"
    print(head)
    print("-" * len(head))
    rows = []
    for name in [m.strip() for m in a.models.split(",") if m.strip()]:
        if _available(name) is None:
            print(f"{name:<24} (not available here: skipped)")
            continue
        base = None
        for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, method,
                                "--tokens", str(a.tokens), "--repeat", str(a.repeat), "--device", a.device,
                                "--decode-context", str(a.decode_context), "--cache", a.cache,
                                "--clock", a.clock],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name:<24} {method:<9} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            if method == "float":
                base = row
            pf = row["prefill_tok_s"] / base["prefill_tok_s"] if base else float("nan")
            df = row["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
            line = (f"{name:<24} {method:<9} {row['prefill_tok_s']:>13.0f} {pf:>7.2f} {row['decode_tok_s']:>12.1f} "
                    f"{df:>7.2f} {row['peak_rss_mib']:>12.0f} {row['linear_mib']:>10.1f} {row['ppl']:>10.3f}")
            if gpu:
                xcpu = (row["prefill_tok_s"] / base["cpu_prefill_tok_s"]
                        if base and base.get("cpu_prefill_tok_s") else float("nan"))
                gf = row["graph_decode_tok_s"] / base["graph_decode_tok_s"] if base else float("nan")
                line += (f" {row['gpu_mib']:>8.0f} {str(row['launches']):>14} {xcpu:>6.1f}"
                         f" {row['graph_decode_tok_s']:>12.1f} {gf:>7.2f} {str(row['graph_kernels']):>13}")
            print(line, flush=True)
    if gpu and rows:
        print("\ntargets: llm.int8 decode >= fp16 decode; llm.int8 prefill >= 0.8x fp16; llm.int8 linear bytes "
              "<= 0.55x fp16's; GPU prefill >= 20x CPU at SmolLM2's shapes")
        for name in dict.fromkeys(r["model"] for r in rows):
            by = {r["method"]: r for r in rows if r["model"] == name}
            if "fp16" in by and "llm.int8" in by:
                i8, f16 = by["llm.int8"], by["fp16"]
                print(f"  {name}: decode int8/fp16 {i8['decode_tok_s'] / f16['decode_tok_s']:.2f} eager, "
                      f"{i8['graph_decode_tok_s'] / f16['graph_decode_tok_s']:.2f} graph; prefill int8/fp16 "
                      f"{i8['prefill_tok_s'] / f16['prefill_tok_s']:.2f}, linear bytes int8/fp16 "
                      f"{i8['linear_mib'] / f16['linear_mib']:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
