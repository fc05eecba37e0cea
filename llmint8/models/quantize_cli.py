"""``python -m llmint8 quantize``: quantize a model with LLM.int8() once and save it.

    python -m llmint8 quantize --model smollm2-135m --out smollm2-int8 \\
        [--calibration-text FILE] [--format llmint8|bitsandbytes]

The saved folder loads with ``llmint8.models.load_model(DIR)`` and is accepted by
``python -m llmint8 perplexity --model DIR`` and ``python -m llmint8 analyze --model DIR``.
"""

from __future__ import annotations

import math
import os
import stat
import time

from .._cli import ArgumentParser, CommandError, UsageError, check_output_dir
from .._cli import add_tokenizer_argument, check_tokenizer, read_text_arg


def _entries(folder: str) -> dict:
    """name -> lstat of each entry of ``folder`` ({} when it does not exist). lstat: a link
    (dangling or not) is an entry of its own, never followed."""
    if not os.path.isdir(folder):
        return {}
    return {name: os.lstat(os.path.join(folder, name)) for name in os.listdir(folder)}


def _changed(old, new) -> bool:
    return old is None or (old.st_ino, old.st_mtime_ns, old.st_size) != (new.st_ino, new.st_mtime_ns, new.st_size)


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m llmint8 quantize",
        description="Quantize a model's linear layers with LLM.int8() and save the result to a folder.")
    p.add_argument("--model", required=True, help="zoo name (e.g. stories260K, smollm2-135m) or a path "
                                                  "(llama2.c .bin, .gguf, or a Hugging Face folder)")
    p.add_argument("--out", required=True, help="output folder (created; must not already hold a model "
                                                "unless --overwrite)")
    p.add_argument("--format", default="llmint8", choices=["llmint8", "bitsandbytes"],
                   help="llmint8 (default: keeps known outlier columns, loads bit-identically) or "
                        "bitsandbytes (the Hugging Face + bitsandbytes 8-bit layout; Llama-family models)")
    add_tokenizer_argument(p)
    p.add_argument("--calibration-text", default=None,
                   help="UTF-8 text whose activations fix each layer's outlier columns (default: none; "
                        "outliers are then found per call)")
    p.add_argument("--calibration-tokens", type=int, default=2048,
                   help="tokens of the calibration text to run (default 2048)")
    p.add_argument("--threshold", type=float, default=6.0, help="outlier threshold (default 6.0)")
    p.add_argument("--device", default="cpu", help="where to run calibration and quantization: cpu (default), "
                                                    "cuda or cuda:N (needs CuPy: pip install 'llmint8[gpu]'); the "
                                                    "files written are the same")
    p.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def quantize_main(argv: list[str]) -> int:
    """Entry point of ``python -m llmint8 quantize`` (run through llmint8._cli.run_command):
    UsageError (exit 2) for a bad argument or a model that cannot be quantized, found before
    any work; CommandError (exit 1) when quantizing or writing fails."""
    args = _parser().parse_args(argv)
    if not math.isfinite(args.threshold) or args.threshold < 0:
        raise UsageError(f"--threshold must be a finite number >= 0, got {args.threshold}")
    if args.calibration_tokens < 1:
        raise UsageError("--calibration-tokens must be >= 1")
    if args.calibration_text is not None:
        calib_text = read_text_arg(args.calibration_text, "calibration text", args.calibration_tokens * 16)
    check_tokenizer(args.tokenizer)
    out = check_output_dir(args.out, "--out")
    held = _entries(out)
    if "config.json" in held and not args.overwrite:
        raise UsageError(f"--out {out!r} already holds a model; pass --overwrite to replace it")
    if held and "config.json" not in held:
        # a folder of other things (a home folder, /, a checkout) is never the place to write
        # a model into: its files would be mixed with the model's, or replaced by them
        shown = ", ".join(sorted(held)[:3]) + (", ..." if len(held) > 3 else "")
        raise UsageError(f"--out {out!r} is a folder that already holds {len(held)} other entr"
                         f"{'y' if len(held) == 1 else 'ies'} ({shown}); expected a new or empty folder, "
                         f"or one holding a model saved before (with --overwrite)")
    from .device import check_cli_device

    args.device = check_cli_device(args.device, int8_layers=True)
    progress = not args.no_progress
    if progress:
        try:
            import tqdm  # noqa: F401
        except ModuleNotFoundError:
            raise UsageError("progress bars need tqdm (pip install 'llmint8[models]'), or pass --no-progress") \
                from None

    from . import load_model, save_quantized
    from .zoo import ZooError

    t0 = time.perf_counter()
    try:
        model = load_model(args.model, device=args.device, tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError, ZooError) as e:
        raise UsageError(str(e)) from None
    if model.method != "float":
        raise UsageError(f"{args.model!r} is already quantized ({model.method}); give the float model")
    calib = None
    if args.calibration_text is not None:
        if model.tokenizer is None:
            raise UsageError(f"model {args.model!r} has no tokenizer to encode the calibration text")
        calib = model.tokenizer.encode(calib_text, bos=True)[: args.calibration_tokens]
        if len(calib) < 1:
            raise UsageError("the calibration text holds no tokens")
    try:
        q = model.quantize("llm.int8", threshold=args.threshold, calibration_tokens=calib, progress=progress)
        before = _entries(out)
        save_quantized(q, out, format=args.format, overwrite=args.overwrite, progress=progress)
        after = _entries(out)
    except (ValueError, OSError, RuntimeError) as e:
        raise CommandError(str(e)) from None
    # the files this save wrote (new or changed), not whatever else the folder holds
    size = sum(st.st_size for name, st in after.items()
               if stat.S_ISREG(st.st_mode) and _changed(before.get(name), st))
    n_out = sum(len(layer.outlier_columns) for layer in q.linears.values())
    print(f"saved {model.name} ({model.n_params:,} parameters) as llm.int8 ({args.format} format, threshold "
          f"{args.threshold:g}, {len(calib) if calib is not None else 0} calibration tokens, {n_out} known outlier "
          f"columns) to {out}: {size / 2**20:.2f} MiB in {time.perf_counter() - t0:.1f} s")
    return 0
