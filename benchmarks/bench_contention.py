"""Int8Linear throughput when the CPU is shared: calls/s alone and next to busy neighbours.

A layer's call rate is measured three ways in one run, interleaved round by round so that
slow drifts of a shared machine hit every case alike:

  alone       nothing else of ours runs;
  numpy       a Python thread of this process keeps NumPy (OpenBLAS, all its threads) busy
              with float32 matmuls;
  process     a separate process spins on one core.

The table gives the median calls/s over the rounds and the ratio to "alone". A ratio near
1 (numpy: near the share of the cores left to us) means contention costs what it takes
from the cores and no more; before llmint8 ran its loops on its own thread pool, OpenMP's
spinning workers and end-of-loop barrier made it 10-30x slower.

The whole-model view (``--model-tokens``): perplexity of the stories260K model (llmint8.models)
over wikitext-2 tokens, float32 and llm.int8(), alone and next to each neighbour. The float32
model runs on NumPy alone: its slowdown is NumPy's (its BLAS threads wait for each other
too), which the llm.int8() model shares for everything but its linear layers.

  python benchmarks/bench_contention.py                      # layers + model
  python benchmarks/bench_contention.py --hot-path           # + 4096x4096 ms/call at 1, 32, 512 tokens, alone
  python benchmarks/bench_contention.py --thresholds         # + 1 thread vs all, per size (the break-even)
  python benchmarks/bench_contention.py --markdown out.md    # tables as Markdown too
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time


def _blas_threads_from_argv():
    """--blas-threads N must act before NumPy loads OpenBLAS, so it is read here."""
    for i, a in enumerate(sys.argv):
        if a.startswith("--blas-threads"):
            n = a.split("=", 1)[1] if "=" in a else sys.argv[i + 1]
            for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # not OMP_NUM_THREADS: llmint8 reads it
                os.environ[var] = n


_blas_threads_from_argv()
import numpy as np  # noqa: E402

import llmint8  # noqa: E402
from benchutil import cpu_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

CONDITIONS = ("alone", "numpy", "process")
LAYERS = [  # (label, out, in, tokens)
    ("1024x1024, 4 tokens", 1024, 1024, 4),
    ("4096x4096, 4 tokens", 4096, 4096, 4),
    ("4096x4096, 64 tokens", 4096, 4096, 64),
]


# ------------------------------------------------------------------ neighbours
@contextlib.contextmanager
def numpy_neighbour():
    """A thread of this process running float32 matmuls (OpenBLAS, all its threads) nonstop."""
    stop = threading.Event()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 512), dtype=np.float32)
    b = rng.standard_normal((512, 512), dtype=np.float32)

    def spin():
        while not stop.is_set():
            a @ b

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    time.sleep(0.05)
    try:
        yield
    finally:
        stop.set()
        t.join()


@contextlib.contextmanager
def process_neighbour():
    """Another process spinning on one core."""
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.1)
    try:
        yield
    finally:
        p.kill()
        p.wait()


NEIGHBOURS = {"alone": contextlib.nullcontext, "numpy": numpy_neighbour, "process": process_neighbour}


# ------------------------------------------------------------------ timing
def calls_per_s(fn, seconds, min_calls=5):
    """Calls of fn() per second over about `seconds` (after one warm-up call)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= min_calls:
            return n / dt


def make_layer(out_f, in_f, tokens, seed=0):
    x, w, outliers = llmint8.paper_like(m=tokens, k=in_f, n=out_f, seed=seed)
    layer = llmint8.Int8Linear.from_float(w, threshold=6.0, outlier_columns=outliers)
    return layer, x


def bench_layers(rounds, seconds):
    cases = [(label, *make_layer(o, i, t)) for label, o, i, t in LAYERS]
    rates = {(label, c): [] for label, _, _ in cases for c in CONDITIONS}
    for r in range(rounds):
        for c in CONDITIONS:
            with NEIGHBOURS[c]():
                for label, layer, x in cases:
                    rates[label, c].append(calls_per_s(lambda: layer(x), seconds))
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
    rows = []
    for label, _, _ in cases:
        alone = statistics.median(rates[label, "alone"])
        row = [label]
        for c in CONDITIONS:
            med = statistics.median(rates[label, c])
            row += [f"{med:.0f}", f"{med / alone:.2f}"]
        rows.append(row)
    header = ["layer"] + [h for c in CONDITIONS for h in (f"{c} calls/s", f"{c} / alone")]
    return header, rows


def bench_model(rounds, n_tokens):
    from data_paths import data_path

    from llmint8.models import load_model, perplexity

    mdir, text = data_path("models", "stories260K"), data_path("text", "wikitext2_test.txt")
    if mdir is None or text is None:
        print("model section skipped: stories260K or wikitext2_test.txt not found (../shared/data or $LLMINT8_DATA)", file=sys.stderr)
        return None, None
    model = load_model(str(mdir))
    with open(text, encoding="utf-8") as f:
        tokens = np.asarray(model.tokenizer.encode(f.read()), dtype=np.int64)[:n_tokens]
    q = model.quantize("llm.int8", threshold=6.0, calibration_tokens=tokens[:256])
    # the float model is NumPy alone: how much of the slowdown is NumPy's own (its BLAS threads)
    models = [("float32 (NumPy only)", model), ("llm.int8", q)]
    for _, mod in models:
        perplexity(mod, tokens[:600], progress=False)  # warm-up
    secs = {(name, c): [] for name, _ in models for c in CONDITIONS}
    ppl = {}
    for r in range(rounds):
        for c in CONDITIONS:
            with NEIGHBOURS[c]():
                for name, mod in models:
                    t0 = time.perf_counter()
                    res = perplexity(mod, tokens, progress=False)
                    secs[name, c].append(time.perf_counter() - t0)
                    ppl.setdefault(name, res["ppl"])
                    assert abs(res["ppl"] - ppl[name]) <= 1e-6 * ppl[name], "perplexity must not depend on neighbours"
        print(f"  model round {r + 1}/{rounds} done", file=sys.stderr)
    rows = []
    for name, _ in models:
        alone = statistics.median(secs[name, "alone"])
        row = [f"stories260K {name}, {len(tokens)} tokens (ppl {ppl[name]:.2f})"]
        for c in CONDITIONS:
            med = statistics.median(secs[name, c])
            row += [f"{med:.2f}", f"{len(tokens) / med:.0f}", f"{med / alone:.2f}"]
        rows.append(row)
    header = ["model"] + [h for c in CONDITIONS for h in (f"{c} s", f"{c} tokens/s", f"{c} time / alone")]
    return header, rows


def bench_hot_path(rounds, seconds):
    rows = []
    for tokens in (1, 32, 512):
        layer, x = make_layer(4096, 4096, tokens)
        ms = [1000.0 / calls_per_s(lambda: layer(x), seconds) for _ in range(rounds)]
        rows.append([f"4096x4096, {tokens} tokens", f"{statistics.median(ms):.3f}", f"{min(ms):.3f}"])
    return ["layer (alone)", "median ms/call", "fastest ms/call"], rows


def bench_thresholds(rounds, seconds):
    """ms per call on one thread and on all, for sizes around the parallel break-even."""
    rows = []
    default = llmint8.get_num_threads()
    for out_f, in_f, tokens in [(256, 256, 4), (512, 512, 4), (1024, 1024, 1), (1024, 1024, 4), (1024, 1024, 16),
                                (2048, 2048, 1), (2048, 2048, 4), (64, 64, 256), (256, 256, 256), (1024, 1024, 64)]:
        layer, x = make_layer(out_f, in_f, tokens)
        res = {}
        for nt in (1, default):
            llmint8.set_num_threads(nt)
            res[nt] = statistics.median(1e6 / calls_per_s(lambda: layer(x), seconds) for _ in range(rounds))
        llmint8.set_num_threads(0)
        rows.append([f"{out_f}x{in_f}, {tokens} tokens", f"{tokens * out_f * in_f / 1e6:.2f}", f"{res[1]:.1f}",
                     f"{res[default]:.1f}", f"{res[1] / res[default]:.2f}"])
    return ["layer", "M multiply-adds", "1 thread us", f"{default} threads us", "speed-up"], rows


# ------------------------------------------------------------------ output
def table(header, rows, markdown=False):
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    fmt = "  ".join("{:>%d}" % w for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds per case; the median is reported (default 5)")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement (default 0.5)")
    ap.add_argument("--model-tokens", type=int, default=20000, help="tokens for the model section; 0 skips it")
    ap.add_argument("--model-rounds", type=int, default=3)
    ap.add_argument("--no-layers", action="store_true", help="skip the layer section")
    ap.add_argument("--hot-path", action="store_true", help="also 4096x4096 at 1, 32, 512 tokens, alone")
    ap.add_argument("--thresholds", action="store_true", help="also one thread vs all per size")
    ap.add_argument("--markdown", help="also write the tables as Markdown to this file")
    ap.add_argument("--blas-threads", help="threads of NumPy's BLAS (set before NumPy loads); isolates "
                    "llmint8's share of the model's time from NumPy's own thread waits")
    args = ap.parse_args(argv)

    info = llmint8.build_info()
    head = (f"llmint8 {llmint8.__version__} from {os.path.dirname(llmint8.__file__)}\n"
            f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, kernel {info.get('cpu_kernel')}, "
            f"threads {llmint8.get_num_threads()}, numpy {np.__version__} "
            f"(BLAS threads: {os.environ.get('OPENBLAS_NUM_THREADS', 'default')}), "
            f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}")
    print(head)
    md = [head.replace("\n", "  \n")]
    sections = []
    if not args.no_layers:
        sections.append(("Layers: calls/s (median of rounds)", bench_layers(args.rounds, args.seconds)))
    if args.model_tokens > 0:
        h, r = bench_model(args.model_rounds, args.model_tokens)
        if h:
            sections.append(("Model: perplexity time (median of rounds)", (h, r)))
    if args.hot_path:
        sections.append(("Hot path, alone", bench_hot_path(args.rounds, args.seconds)))
    if args.thresholds:
        sections.append(("One thread vs all", bench_thresholds(args.rounds, args.seconds)))
    for title, (h, r) in sections:
        print(f"\n{title}\n{table(h, r)}")
        md.append(f"\n{title}\n\n{table(h, r, markdown=True)}")
    print(f"\nload at the end: {os.getloadavg()[0]:.2f}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
