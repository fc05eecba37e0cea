"""llmint8's row scales against bitsandbytes', on a real model's activations.

    python benchmarks/bnb_rowscale.py [--model smollm2-135m] [--tokens 256] [--text FILE]

Both compute LLM.int8() on the same int8 weights (``model.quantize("llm.int8")``: row absmax
scales, no calibrated outlier columns, threshold 6) and the same inputs (each linear layer's
input in the float model's forward over ``--tokens`` tokens of ``--text``):

  llmint8        each row of x scaled by its absmax over the non-outlier columns
  bitsandbytes   x cast to fp16, each row scaled by its absmax over the elements below the
                 threshold (llmint8.compat.bitsandbytes_forward)

Per layer: the error of each against the exact product ``x @ W_int8_dequantized.T`` in float64
(so only the activations' quantization differs) and their difference, all as
``relative_error`` (mean |a - b| / mean |b|). Prints the median difference, the layers where
they differ most, the v-projections of the last layers, and the perplexity of each on those
tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--text", default=None, help="default: WikiText-2 test from the shared data")
    args = ap.parse_args()
    import llmint8
    from llmint8.compat import bitsandbytes_forward
    from llmint8.models import load_model
    from llmint8.models.perplexity import token_nll
    from llmint8.models.quantized import with_bitsandbytes_forward
    from benchutil import cpu_model

    text = args.text
    if text is None:
        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        from data_paths import data_path

        text = data_path("text", "wikitext2_test.txt")
        if text is None:
            sys.exit("no --text given and the shared WikiText-2 is not found (set LLMINT8_DATA)")
    m = load_model(args.model)
    with open(text, encoding="utf-8") as f:
        toks = np.array(m.tokenizer.encode(f.read(200_000), bos=True)[: args.tokens])
    q = m.quantize("llm.int8", threshold=6.0)
    layers = {n: q.linears[n].layer for n in q.linears}
    rows = []

    def hook(name, x):
        layer = layers[name]
        wq, ws, _, _ = layer._export()
        exact = x.astype(np.float64) @ (wq.astype(np.float64) * (ws.astype(np.float64) / 127.0)[:, None]).T
        own = layer(x)
        bnb = bitsandbytes_forward(layer, x)
        n_out = len(llmint8.find_outlier_columns(x, 6.0))
        rows.append((name, llmint8.relative_error(own, exact), llmint8.relative_error(bnb, exact),
                     llmint8.relative_error(bnb, own), n_out))

    t0 = time.time()
    with m.add_hook(hook):
        m.forward(toks[None])
    print(f"{m.name} ({m.arch}), {len(toks)} tokens of {os.path.basename(text)}, {len(rows)} layers, "
          f"{cpu_model()}, {time.time() - t0:.0f} s")
    if m.baseline_note:
        print(f"note: {m.baseline_note}")
    d = np.array([r[3] for r in rows])
    e_own, e_bnb = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    with_out = np.array([r[4] > 0 for r in rows])
    print(f"\nerror against the exact product (same int8 weights), relative_error, over all layers:")
    print(f"  median: llmint8 {np.median(e_own):.2e}, bitsandbytes {np.median(e_bnb):.2e}; "
          f"difference bitsandbytes vs llmint8: median {np.median(d):.2e}, max {d.max():.2e}")
    print(f"  layers with outlier columns: {with_out.sum()} of {len(rows)}; there bitsandbytes is worse in "
          f"{int((e_bnb > e_own)[with_out].sum())}, llmint8 in {int((e_own > e_bnb)[with_out].sum())}")
    print(f"\n{'layer':<22}{'outlier cols':>13}{'llmint8':>10}{'bnb':>10}{'bnb/llmint8':>13}")
    worst = sorted(rows, key=lambda r: -r[3])[:8]
    for name, a, b, _, k in worst:
        print(f"{name:<22}{k:>13}{a:>10.2%}{b:>10.2%}{b / a:>13.2f}")
    L = m.config["n_layers"]
    first = max(0, L - 8)
    last = [r for r in rows if r[0].endswith("attn.v") and int(r[0].split(".")[1]) >= first]
    if last:
        a = np.mean([r[1] for r in last])
        b = np.mean([r[2] for r in last])
        print(f"\nv-projections of layers {first}-{L - 1}: mean error llmint8 {a:.2%}, bitsandbytes {b:.2%}")
        print("  " + ", ".join(f"{r[0].split('.')[1]}: {r[1]:.1%} / {r[2]:.1%}" for r in last) + "  (llmint8 / bnb)")
    nll = {}
    for label, model in (("float", m), ("llmint8", q), ("bitsandbytes row scales", with_bitsandbytes_forward(q))):
        nll[label] = float(np.mean(token_nll(model, toks)))
    print("\nperplexity on those tokens: " + ", ".join(f"{k} {np.exp(v):.3f}" for k, v in nll.items()))


if __name__ == "__main__":
    main()
