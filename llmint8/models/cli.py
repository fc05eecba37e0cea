"""``python -m llmint8 perplexity``: perplexity of a real model under each quantization method."""

from __future__ import annotations

import math
import os
import sys
import time

from .._cli import (ArgumentParser, CommandError, UsageError, check_input_file, check_output_file,
                    require_module, run_command)
from .._cli import add_tokenizer_argument, check_tokenizer, format_duration, read_text_arg, write_json

PROG = "python -m llmint8 perplexity"
DEFAULT_METHODS = "fp16,llm.int8,vectorwise,rowwise,absmax,zeropoint"
# Enough tokens for the methods' perplexities to separate (the differences the paper reports are
# 0.1-10%), few enough that stories260K runs every method in well under a minute on 2 cores.
DEFAULT_MAX_TOKENS = 4096
# Rough cost of each method relative to the float forward, for the time estimate printed before
# starting (measured on stories260K, SmolLM2-135M and Gemma 3 270M; see benchmarks/bench_models.py).
_COST = {"float": 1.0, "fp16": 1.2, "llm.int8": 1.2, "vectorwise": 1.1, "rowwise": 1.5, "absmax": 1.5,
         "zeropoint": 1.7}


def _max_tokens(s: str):
    if s.strip().lower() == "all":
        return None
    try:
        v = int(s)
    except ValueError:
        raise UsageError(f"--max-tokens: expected a positive integer or 'all', got {s!r}") from None
    if v < 1:
        raise UsageError(f"--max-tokens: expected a positive integer or 'all', got {v}")
    return v


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Perplexity of a model over a text with its linear layers computed by each method, "
                    "compared with the float baseline.")
    p.add_argument("--model", required=True, help="zoo name (e.g. stories260K, smollm2-135m, gemma3-270m) or a path "
                                                  "(llama2.c .bin, .gguf, or a Hugging Face folder)")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    add_tokenizer_argument(p)
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated methods besides the float baseline (default {DEFAULT_METHODS})")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N (the whole "
                                                    "forward on the GPU; needs CuPy: pip install 'llmint8[gpu]')")
    p.add_argument("--threshold", type=float, default=6.0, help="LLM.int8 outlier threshold (default 6.0)")
    p.add_argument("--max-tokens", default=str(DEFAULT_MAX_TOKENS), metavar="N|all",
                   help=f"score the first N tokens of the text (default {DEFAULT_MAX_TOKENS}); 'all' scores "
                        "the whole text, which can take hours for a large text and many methods")
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


def _needed_modules(model: str) -> list[tuple[str, str]]:
    """(module, purpose) the loader of ``model`` will import, to check before any work."""
    from . import zoo

    low = model.lower()
    if zoo.is_zoo_name(model) and zoo.canonical_name(model) != "stories260K" or low.endswith(".gguf"):
        return [("gguf", "reading GGUF models"), ("tokenizers", "GGUF tokenizers")]
    if os.path.isdir(model):
        return [("safetensors", "reading Hugging Face checkpoints"), ("tokenizers", "Hugging Face tokenizers")]
    return []


def _n_windows(n: int, context: int, stride: int) -> int:
    return 1 if n <= context else 1 + -(-(n - context) // stride)


def perplexity_main(argv: list[str]) -> int:
    """Entry point of ``python -m llmint8 perplexity``; returns the process exit code
    (0 ok, 2 for a bad argument, 1 for a failure while running; errors are one stderr line)."""
    return run_command(PROG, _perplexity_command, argv)


def _perplexity_command(argv: list[str]) -> int:
    from .transformer import METHODS

    args = _parser().parse_args(argv)
    max_tokens = _max_tokens(args.max_tokens)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown method(s) {', '.join(bad)}; expected some of {', '.join(METHODS[1:])}")
    if args.context < 2 or not 1 <= args.stride <= args.context:
        raise UsageError(f"expected --context >= 2 and 1 <= --stride <= --context, got --context {args.context} "
                         f"--stride {args.stride}")
    if not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise UsageError(f"--threshold must be a finite number >= 0, got {args.threshold}")
    from .device import check_cli_device

    args.device = check_cli_device(args.device, int8_layers=any(m in ("llm.int8", "vectorwise") for m in methods))
    check_input_file(args.text, "text file")
    check_tokenizer(args.tokenizer)
    if args.json:
        check_output_file(args.json, "--json file")
    if not args.no_progress:
        require_module("tqdm", "models", "the progress bars (or pass --no-progress)")
    for module, purpose in _needed_modules(args.model):
        require_module(module, "models", purpose)
    from . import zoo

    if not os.path.exists(args.model) and not zoo.is_zoo_name(args.model):
        raise UsageError(f"model {args.model!r} is neither an existing path nor a zoo model "
                         f"(known: {', '.join(zoo.names())})")
    text = read_text_arg(args.text, "text file", None if max_tokens is None else max_tokens * 16)
    if not text.strip():
        raise UsageError(f"text file {args.text!r} holds no text")

    from . import load_model, perplexity

    try:
        model = load_model(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    except zoo.ZooError as e:
        raise CommandError(str(e)) from None
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"cannot load model {args.model!r}: {e}") from None
    if model.tokenizer is None:
        raise CommandError(f"model {args.model!r} has no tokenizer")
    if args.context > model.config["max_seq_len"]:
        raise UsageError(f"--context {args.context} exceeds the model's maximum sequence length "
                         f"{model.config['max_seq_len']}")
    # tokens are rarely longer than 16 characters: only that much text was read for N tokens
    tokens = model.tokenizer.encode(text, bos=True)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise UsageError(f"text file {args.text!r} holds fewer than 2 tokens")
    order = ["float"] + [x for x in methods if x != "float"]
    if model.method != "float":  # a saved quantized model holds no float weights: score it as saved
        order = [model.method]

    # time one window of the float model for the estimate (also warms up the caches)
    n_win = _n_windows(len(tokens), args.context, args.stride)
    t0 = time.perf_counter()
    model.forward([tokens[:args.context - 1]], logits=False)
    t_win = time.perf_counter() - t0
    estimate = t_win * n_win * sum(_COST.get(m, 2.0) for m in order)
    how_many = "all" if max_tokens is None else f"--max-tokens {max_tokens}"
    print(f"model {model.name} ({model.arch}, {model.n_params:,} parameters), {len(tokens)} tokens ({how_many}), "
          f"context {args.context}, stride {args.stride}, activations {args.dtype}", flush=True)
    print(f"{len(order)} methods x {n_win} windows: estimated {format_duration(estimate)}", flush=True)
    progress = not args.no_progress
    rows = []
    if model.method != "float":
        print(f"note: {args.model} is already quantized ({model.method}, threshold {model.threshold:g}); "
              f"scoring it as saved, without a float baseline", flush=True)
    for m in order:
        t0 = time.perf_counter()
        qm = model if m == model.method else model.quantize(m, threshold=args.threshold)
        r = perplexity(qm, tokens, context=args.context, stride=args.stride, progress=progress)
        rows.append(dict(method=m, ppl=r["ppl"], nll=r["nll"], n_tokens=r["n_tokens"],
                         weight_bytes=qm.linear_weight_nbytes, seconds=time.perf_counter() - t0))
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
        write_json(args.json, out)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(perplexity_main(sys.argv[1:]))
