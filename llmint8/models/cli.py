"""``python -m llmint8 perplexity``: perplexity of a real model under each quantization method."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_METHODS = "fp16,llm.int8,vectorwise,rowwise,absmax,zeropoint"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llmint8 perplexity",
        description="Perplexity of a model over a text with its linear layers computed by each method, "
                    "compared with the float baseline.")
    p.add_argument("--model", required=True, help="zoo name (e.g. stories260K, smollm2-135m, gemma3-270m) or a path "
                                                  "(llama2.c .bin, .gguf, or a Hugging Face folder)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods besides the float baseline (default {DEFAULT_METHODS})")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of llm.int8/vectorwise layers")
    p.add_argument("--threshold", type=float, default=6.0, help="LLM.int8 outlier threshold (default 6.0)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--context", type=int, default=256, help="window length in tokens (default 256)")
    p.add_argument("--stride", type=int, default=128, help="window stride in tokens (default 128)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="activation dtype")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def perplexity_main(argv: list[str]) -> int:
    """Entry point of ``python -m llmint8 perplexity``; returns the process exit code
    (0 ok, 2 for a bad argument, missing file or unknown model)."""
    from . import load_model, perplexity
    from .transformer import METHODS
    from .zoo import ZooError

    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        print(f"error: unknown method(s) {', '.join(bad)}; expected some of {', '.join(METHODS[1:])}", file=sys.stderr)
        return 2
    if args.context < 2 or not 1 <= args.stride <= args.context:
        print(f"error: expected --context >= 2 and 1 <= --stride <= --context", file=sys.stderr)
        return 2
    if not os.path.isfile(args.text):
        print(f"error: text file {args.text!r} not found", file=sys.stderr)
        return 2
    try:
        model = load_model(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError, ZooError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model.tokenizer is None:
        print(f"error: model {args.model!r} has no tokenizer", file=sys.stderr)
        return 2
    with open(args.text, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if args.max_tokens:
        # tokens are rarely longer than 16 characters; encode only what can be needed
        text = text[: args.max_tokens * 16]
    tokens = model.tokenizer.encode(text, bos=True)
    if args.max_tokens:
        tokens = tokens[: args.max_tokens]
    if len(tokens) < 2:
        print("error: the text holds fewer than 2 tokens", file=sys.stderr)
        return 2
    progress = not args.no_progress
    rows = []
    print(f"model {model.name} ({model.arch}, {model.n_params:,} parameters), {len(tokens)} tokens, "
          f"context {args.context}, stride {args.stride}, activations {args.dtype}", flush=True)
    plan = ["float"] + [x for x in methods if x != "float"]
    if model.method != "float":
        # a saved quantized model holds no float weights: score it as saved
        print(f"note: {args.model} is already quantized ({model.method}, threshold {model.threshold:g}); "
              f"scoring it as saved, without a float baseline", flush=True)
        plan = [model.method]
    try:
        for m in plan:
            t0 = time.perf_counter()
            qm = model if m == model.method else model.quantize(m, threshold=args.threshold, device=args.device)
            r = perplexity(qm, tokens, context=args.context, stride=args.stride, progress=progress)
            rows.append(dict(method=m, ppl=r["ppl"], nll=r["nll"], n_tokens=r["n_tokens"],
                             weight_bytes=qm.linear_weight_nbytes, seconds=time.perf_counter() - t0))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = rows[0]["ppl"] if rows[0]["method"] == "float" else None
    for r in rows:
        r["change_pct"] = 100.0 * (r["ppl"] - base) / base if base else float("nan")
    head = f"{'method':<12} {'perplexity':>12} {'vs float':>10} {'linear weights':>15} {'seconds':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        change = f"{r['change_pct']:>+9.3f}%" if r["change_pct"] == r["change_pct"] else f"{'n/a':>10}"
        print(f"{r['method']:<12} {r['ppl']:>12.4f} {change} {_fmt_bytes(r['weight_bytes']):>15} "
              f"{r['seconds']:>9.1f}")
    if model.baseline_note:
        print(f"note: {model.baseline_note}")
    if args.json:
        out = dict(model=model.name, arch=model.arch, n_params=model.n_params, baseline_note=model.baseline_note,
                   text=os.path.abspath(args.text), n_tokens=len(tokens), context=args.context, stride=args.stride,
                   dtype=args.dtype, device=args.device, threshold=args.threshold, results=rows)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
