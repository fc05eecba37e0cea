"""``python -m llmint8 analyze``: outlier-feature analysis of one model on one text.

Prints the summary table, writes ``report.json`` and PNG plots (``heatmap.png``,
``emergence.png``, ``magnitude.png``, ``zeroing.png``) into the output folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from .outliers import DEFAULT_MIN_LAYER_SHARE, DEFAULT_MIN_POSITION_SHARE, DEFAULT_THRESHOLD

from .._cli import ArgumentParser, CommandError, UsageError, check_input_file, check_output_dir, require_module
from .._cli import run_command
from .._cli import add_tokenizer_argument, check_tokenizer, read_text_arg

PROG = "python -m llmint8 analyze"
DEFAULT_MODEL = "stories260K"
DEFAULT_OUT = "llmint8-analysis"
_DEFAULT_TEXT = ("text", "wikitext2_test.txt")


def shared_data_dir() -> pathlib.Path | None:
    """The shared data folder, resolved as for the models (:func:`llmint8.models.zoo.data_dir`):
    ``$LLMINT8_DATA``, else ``../shared/data`` beside the checkout or the current directory."""
    from llmint8.models import zoo

    d = zoo.data_dir()
    return pathlib.Path(d) if d else None


def default_text() -> pathlib.Path | None:
    """The shared WikiText-2 test split, if the shared data folder holds it."""
    d = shared_data_dir()
    if d is not None and (d.joinpath(*_DEFAULT_TEXT)).is_file():
        return d.joinpath(*_DEFAULT_TEXT)
    return None


def _where_looked() -> str:
    from llmint8.models import zoo

    env = os.environ.get("LLMINT8_DATA")
    if env:
        return f"$LLMINT8_DATA={env}"
    return ", ".join(zoo.data_dir_candidates()) + " (set LLMINT8_DATA to choose the folder)"


def _load(spec: str, device: str = "cpu", tokenizer: str | None = None):
    from llmint8.models import load_model

    return load_model(spec, dtype="float32", device=device, tokenizer=tokenizer)


def _perplexity_fn():
    from llmint8.models import perplexity

    return perplexity


def _share(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {s}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Find outlier features (LLM.int8() paper, Section 4) in a model's projection inputs, "
                    "measure the effect of zeroing them, and plot the results.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint path or model-zoo name (default: {DEFAULT_MODEL})")
    add_tokenizer_argument(p)
    p.add_argument("--text", default=None,
                   help="UTF-8 text file to run (default: the shared WikiText-2 test split when present)")
    p.add_argument("--tokens", type=int, default=2048, help="number of tokens to analyse (default 2048)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per forward pass (default: model context, at most 512)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT})")
    g = p.add_argument_group("outlier criteria")
    g.add_argument("--threshold", type=_positive_float, default=DEFAULT_THRESHOLD,
                   help="magnitude bound, |x| >= threshold (default 6.0)")
    g.add_argument("--min-layer-share", type=_share, default=DEFAULT_MIN_LAYER_SHARE,
                   help="share of layers a feature must reach the threshold in (default 0.25)")
    g.add_argument("--min-position-share", type=_share, default=DEFAULT_MIN_POSITION_SHARE,
                   help="share of sequence positions (default 0.06)")
    g.add_argument("--position-aggregation", choices=("any", "max", "mean"), default="any",
                   help="how positions are counted across layers (default any)")
    g.add_argument("--group-by", choices=("block", "input", "name"), default="block",
                   help="what counts as a layer (default: transformer block)")
    z = p.add_argument_group("zeroing experiment")
    z.add_argument("--no-zeroing", action="store_true", help="skip the zeroing experiment")
    z.add_argument("--seeds", type=int, default=3, help="random-feature controls (default 3)")
    z.add_argument("--zeroing-mode", choices=("independent", "all"), default="independent",
                   help="top-1 measurement: one layer edited at a time (paper) or all at once")
    z.add_argument("--zero-top", type=int, default=0, metavar="K",
                   help="when no feature meets the criteria, zero the K largest-magnitude features instead")
    z.add_argument("--ppl-context", type=int, default=256, help="perplexity window (default 256)")
    z.add_argument("--ppl-stride", type=int, default=128, help="perplexity stride (default 128)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N (needs "
                                                  "CuPy: pip install 'llmint8[gpu]'); only the recorded layer "
                                                  "inputs are copied to the host")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return v


def analyze_main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 for a bad argument, 1 for a failure
    while running; every error is one line on stderr)."""
    return run_command(PROG, _analyze_command, sys.argv[1:] if argv is None else argv)


def _analyze_command(argv: list[str]) -> int:
    return _run(build_parser().parse_args(argv))


def _run(args) -> int:
    from .experiments import analyze_model, tokenize_text, zeroing_experiment

    if args.tokens < 2:
        raise UsageError(f"--tokens must be at least 2, got {args.tokens}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len must be positive, got {args.seq_len}")
    if args.seeds < 0 or args.zero_top < 0:
        raise UsageError("--seeds and --zero-top must be >= 0")
    if args.ppl_context < 2 or not 1 <= args.ppl_stride <= args.ppl_context:
        raise UsageError(f"expected --ppl-context >= 2 and 1 <= --ppl-stride <= --ppl-context, got "
                         f"--ppl-context {args.ppl_context} --ppl-stride {args.ppl_stride}")
    # everything that can fail without computing is checked first: inputs, outputs, dependencies
    if args.text:
        text_path = pathlib.Path(check_input_file(args.text, "text file"))
    else:
        text_path = default_text()
        if text_path is None:
            raise UsageError(f"no text to analyse: pass --text FILE (the shared WikiText-2 file "
                             f"{'/'.join(_DEFAULT_TEXT)} was not found; looked in {_where_looked()})")
    check_output_dir(args.out, "--out folder")
    from llmint8.models.device import check_cli_device

    device = check_cli_device(getattr(args, "device", "cpu"))
    require_module("matplotlib", "analysis", "the plots")
    if not args.no_progress:
        require_module("tqdm", "analysis", "the progress bars (or pass --no-progress)")
    text = read_text_arg(str(text_path), "text file")
    check_tokenizer(args.tokenizer)
    if not text.strip():
        raise UsageError(f"text file {str(text_path)!r} holds no text")
    progress = not args.no_progress

    t0 = time.time()
    try:
        # one argument on the CPU without --tokenizer: _load(spec) is the seam tests replace
        model = (_load(args.model) if device == "cpu" and args.tokenizer is None
                 else _load(args.model, device=device, tokenizer=args.tokenizer))
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ""
        if args.model == DEFAULT_MODEL:
            hint = (f"; pass --model PATH to a checkpoint (llama2.c .bin, GGUF or safetensors) or a zoo name "
                    f"such as smollm2-135m, or set LLMINT8_DATA to the shared data folder (looked in "
                    f"{_where_looked()})")
        raise CommandError(f"cannot load model {args.model!r}: {msg}{hint}") from None
    name = getattr(model, "name", str(args.model))
    try:
        tokens = tokenize_text(model, text, args.tokens)
    except ValueError as e:
        raise CommandError(str(e)) from None

    try:
        res = analyze_model(model, tokens, seq_len=args.seq_len, threshold=args.threshold,
                            min_layer_share=args.min_layer_share, min_position_share=args.min_position_share,
                            position_aggregation=args.position_aggregation, group_by=args.group_by,
                            progress=progress)
    except ValueError as e:
        raise CommandError(str(e)) from None
    s = res.summary
    ppl_fn = _perplexity_fn()
    ppl = ppl_fn(model, tokens, context=args.ppl_context, stride=args.ppl_stride, progress=progress)

    print(f"model {name} ({getattr(model, 'n_params', 0):,} parameters), {tokens.size} tokens of {text_path.name}, "
          f"perplexity {ppl['ppl']:.3f}")
    print(s.table())
    print(f"  values >= threshold: {res.share_values_above:.3%} of all projection-input values; "
          f"typical |x| (median RMS of the inputs): {res.typical_rms:.3g}")

    zero = None
    zero_note = None
    if not args.no_zeroing:
        feats = list(s.features)
        if not feats and args.zero_top:
            order = np.argsort(-res.max_abs.max(axis=0), kind="stable")
            feats = [int(i) for i in order[: args.zero_top]]
            zero_note = f"no outlier features; zeroed the {len(feats)} largest-magnitude features instead"
        if feats:
            zero = zeroing_experiment(model, tokens, feats, seeds=tuple(range(args.seeds)), seq_len=args.seq_len,
                                      mode=args.zeroing_mode, ppl_context=args.ppl_context,
                                      ppl_stride=args.ppl_stride, perplexity_fn=ppl_fn, progress=progress)
            print()
            if zero_note:
                print(zero_note)
            print(zero.table())
        else:
            zero_note = "no outlier features to zero (use --zero-top K to zero the K largest instead)"
            print(zero_note)

    out = pathlib.Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"cannot create {out}: {e}") from None
    from . import plots
    from .paper import PAPER_SOURCE, PAPER_TABLE4

    rec = plots.model_record(name, getattr(model, "n_params", 0), s, ppl=ppl["ppl"])
    plots.plot_heatmap(res, title=f"{name}: max |x| by layer and feature", max_features=256,
                       path=out / "heatmap.png")
    plots.plot_emergence([rec], text_name=text_path.name, path=out / "emergence.png")
    plots.plot_magnitude([rec], path=out / "magnitude.png")
    if zero is not None:
        plots.plot_zeroing(zero, title=f"{name}: zeroing features before the attention projections",
                           path=out / "zeroing.png")
    import matplotlib.pyplot as plt

    plt.close("all")
    report = {
        "model": {"spec": args.model, "name": name, "n_params": getattr(model, "n_params", None),
                  "arch": getattr(model, "arch", None), "config": getattr(model, "config", None)},
        "text": str(text_path),
        "n_tokens": int(tokens.size),
        "perplexity": ppl,
        "summary": s.to_dict(),
        "layers": res.layers,
        "max_abs_per_layer": res.max_abs.max(axis=1).tolist(),
        "input_rms": res.input_rms,
        "typical_rms": res.typical_rms,
        "share_values_above": res.share_values_above,
        "skipped_inputs": res.skipped_inputs,
        "zeroing": zero.to_dict() if zero is not None else None,
        "zeroing_note": zero_note,
        "paper_reference": {"source": PAPER_SOURCE, "table4": PAPER_TABLE4},
        "seconds": round(time.time() - t0, 2),
    }
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=2))
    print(f"\nwrote {out / 'report.json'} and plots to {out}/")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(analyze_main(sys.argv[1:]))
