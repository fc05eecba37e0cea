"""``python -m llmint8 generate``: text from a prompt, streamed, under one or several methods.

    python -m llmint8 generate --model smollm2-135m --prompt "What is a GPU?" --chat \\
        --methods float,llm.int8 [--max-new-tokens 64] [--temperature 0.8 --top-k 40 --top-p 0.95 --seed 1]

Each method's text is streamed to stdout under a header as it is generated, one method after
the other, then a summary: tokens, why each stopped, prefill seconds, decode tokens/s, and the
first token and character where each method's text differs from the first method's.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Sequence

from .._cli import (ArgumentParser, CommandError, UsageError, add_tokenizer_argument, check_tokenizer, positive_int,
                    require_module, run_command)

PROG = "python -m llmint8 generate"


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Generate text after a prompt with the model's linear layers computed by each method, "
                    "streaming the tokens as they come.")
    p.add_argument("--model", required=True, help="zoo name (e.g. stories260K, smollm2-135m, gemma3-270m) or a path "
                                                  "(llama2.c .bin, .gguf, a Hugging Face folder or a quantized folder)")
    p.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user's message)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) decodes greedily; > 0 samples from softmax(logits / temperature)")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample among the most likely tokens whose probability reaches P (0 < P <= 1)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed of the sampler (default: drawn and printed, to reproduce the run)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the text contains TEXT (repeatable); EOS always stops")
    p.add_argument("--methods", default="float",
                   help="comma-separated methods, run one after the other on the same prompt (default float; "
                        "e.g. float,llm.int8)")
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as a user message with the checkpoint's chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    add_tokenizer_argument(p)
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N (the whole "
                                                    "forward on the GPU; needs CuPy: pip install 'llmint8[gpu]')")
    p.add_argument("--threshold", type=float, default=6.0, help="LLM.int8 outlier threshold (default 6.0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="activation dtype")
    return p


def generate_main(argv: list[str]) -> int:
    """Entry point of ``python -m llmint8 generate``; returns the process exit code (0 ok, 2 for a
    bad argument, 1 for a failure while running; errors are one stderr line)."""
    return run_command(PROG, _generate_command, argv)


def _check_args(args) -> list[str]:
    from .transformer import METHODS

    methods = []
    for m in (x.strip() for x in args.methods.split(",")):
        if m and m not in methods:
            methods.append(m)
    if not methods:
        raise UsageError("--methods: expected at least one method")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown method(s) {', '.join(bad)}; expected some of {', '.join(METHODS)}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must satisfy 0 < P <= 1, got {args.top_p}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise UsageError("--top-k and --top-p filter sampled tokens, but --temperature 0 decodes greedily; "
                         "give --temperature > 0 (e.g. 0.8)")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {args.seed}")
    if not (math.isfinite(args.threshold) and args.threshold >= 0):
        raise UsageError(f"--threshold must be a finite number >= 0, got {args.threshold}")
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat (it is a message of the chat template)")
    if any(s == "" for s in args.stop or []):
        raise UsageError("--stop: expected a non-empty text")
    if not args.prompt and not args.chat:
        raise UsageError("--prompt is empty; give some text (or --chat to send an empty user message)")
    from .device import check_cli_device

    args.device = check_cli_device(args.device, int8_layers=any(m in ("llm.int8", "vectorwise") for m in methods))
    check_tokenizer(args.tokenizer)
    return methods


def _first_difference(a: Sequence, b: Sequence) -> int | None:
    """The first index where a and b differ (the shorter one's length when one extends the
    other), or None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _generate_command(argv: list[str]) -> int:
    import numpy as np

    from .cli import _needed_modules

    args = _parser().parse_args(argv)
    methods = _check_args(args)
    for module, purpose in _needed_modules(args.model):
        require_module(module, "models", purpose)
    if args.chat:
        require_module("jinja2", "models", "--chat (rendering the checkpoint's chat template)")
    from . import zoo

    if not os.path.exists(args.model) and not zoo.is_zoo_name(args.model):
        raise UsageError(f"model {args.model!r} is neither an existing path nor a zoo model "
                         f"(known: {', '.join(zoo.names())})")
    from . import load_model
    from .generate import stream_generate

    try:
        model = load_model(args.model, dtype=args.dtype, device=args.device, tokenizer=args.tokenizer)
    except zoo.ZooError as e:
        raise CommandError(str(e)) from None
    except (FileNotFoundError, ValueError) as e:
        raise CommandError(f"cannot load model {args.model!r}: {e}") from None
    if model.tokenizer is None:
        raise CommandError(f"model {args.model!r} has no tokenizer to encode the prompt; pass --tokenizer PATH")
    if model.method != "float":  # a saved quantized model holds no float weights: run it as saved
        if methods != [model.method]:
            print(f"note: {args.model} is already quantized ({model.method}); running it as saved instead of "
                  f"--methods {','.join(methods)}", flush=True)
        methods = [model.method]
    sampling = args.temperature > 0
    seed = args.seed
    if sampling and seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**32)
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
              top_p=args.top_p, seed=seed, stop=args.stop, chat=args.chat, system=args.system)
    try:
        # checks the prompt against the context length and renders the chat template before any
        # quantization; the returned generator has not run the model
        first = stream_generate(model, args.prompt, **kw)
    except ImportError as e:
        raise CommandError(str(e)) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    n_prompt = len(first.prompt_ids)
    how = "greedy" if not sampling else (
        f"sampling: temperature {args.temperature:g}" + (f", top-k {args.top_k}" if args.top_k else "")
        + (f", top-p {args.top_p:g}" if args.top_p is not None else "") + f", seed {seed}")
    print(f"model {model.name} ({model.arch}, {model.n_params:,} parameters), prompt {n_prompt} tokens"
          f"{' (chat template)' if args.chat else ''}, {how}, at most {args.max_new_tokens} new tokens, "
          f"device {args.device}", flush=True)
    results = []
    for m in methods:
        label = m + (f" (threshold {args.threshold:g})" if m == "llm.int8" else "")
        if m == model.method:
            qm, it = model, first if m == methods[0] else stream_generate(model, args.prompt, **kw)
        else:
            try:
                qm = model.quantize(m, threshold=args.threshold)  # on the model's device
            except (ValueError, RuntimeError) as e:
                raise CommandError(f"cannot quantize with {m}: {e}") from None
            it = stream_generate(qm, args.prompt, **kw)
        print(f"=== {label} ===", flush=True)
        if not args.chat:  # a continuation reads best after its prompt; a chat reply stands alone
            sys.stdout.write(args.prompt)
        for piece in it:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        results.append((m, it.result))
    head = (f"{'method':<12} {'tokens':>7} {'finish':>7} {'prefill s':>10} {'decode tok/s':>13}  "
            f"first difference from {methods[0]}")
    print(head)
    print("-" * len(head))
    base = results[0][1]
    for m, g in results:
        if g is base:
            diff = "-"
        else:
            i = _first_difference(base.token_ids, g.token_ids)
            if i is None:
                diff = "identical"
            else:
                j = _first_difference(base.text, g.text)
                j = len(base.text) if j is None else j  # other tokens spelling the same text
                diff = f"token {i}, character {j}"
        rate = g.decode_tokens_per_second
        rate = f"{rate:>13.1f}" if rate == rate else f"{'-':>13}"  # one token: no decode step
        print(f"{m:<12} {len(g.token_ids):>7} {g.finish_reason:>7} {g.prefill_seconds:>10.3f} {rate}  {diff}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(generate_main(sys.argv[1:]))
