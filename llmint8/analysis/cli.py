"""``python -m llmint8 analyze``: outlier-feature analysis of one model on one text.

Prints the summary table, writes ``report.json`` and PNG plots (``heatmap.png``,
``emergence.png``, ``magnitude.png``, ``zeroing.png``) into the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import pathlib
import sys
import time

import numpy as np

from .outliers import DEFAULT_MIN_LAYER_SHARE, DEFAULT_MIN_POSITION_SHARE, DEFAULT_THRESHOLD

from .._cli import (ArgumentParser, CommandError, UsageError, check_input_file, check_output_dir,
                    check_output_file, require_module)
from .._cli import run_command
from .._cli import add_tokenizer_argument, check_tokenizer, format_duration, read_text_arg, write_json

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


def _input_args(p: argparse.ArgumentParser) -> None:
    """Options naming the model and the tokens to run, shared by ``analyze`` and ``outliers``."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint path or model-zoo name (default: {DEFAULT_MODEL})")
    add_tokenizer_argument(p)
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N (needs "
                                                  "CuPy: pip install 'llmint8[gpu]'); only the recorded layer "
                                                  "inputs are copied to the host")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file to run (default: the shared WikiText-2 test split when present)")
    p.add_argument("--token-ids", default=None, metavar="FILE",
                   help="run these token ids instead of a text (integers separated by spaces, commas or "
                        "newlines, or a .npy array): for a model without a tokenizer, or text tokenized elsewhere")
    p.add_argument("--tokens", "--max-tokens", dest="tokens", type=int, default=2048,
                   help="number of tokens to analyse (default 2048)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per forward pass (default: model context, at most 512)")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="Find outlier features (LLM.int8() paper, Section 4) in a model's projection inputs, "
                    "measure the effect of zeroing them, and plot the results.",
    )
    _input_args(p)
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


#: Files ``analyze`` writes into ``--out``; each is checked writable before any work.
OUTPUT_FILES = ("report.json", "heatmap.png", "emergence.png", "magnitude.png", "zeroing.png")


def _check_common(args) -> None:
    if args.tokens < 2:
        raise UsageError(f"--tokens must be at least 2, got {args.tokens}")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len must be positive, got {args.seq_len}")
    if args.text and args.token_ids:
        raise UsageError("pass --text or --token-ids, not both")


def _read_inputs(args):
    """(text, text_path, ids): what to run, read and checked before the model is loaded (with
    --tokenizer and --device)."""
    from llmint8.models.device import check_cli_device

    check_tokenizer(args.tokenizer)
    args.device = check_cli_device(args.device)
    if args.token_ids:
        path = pathlib.Path(check_input_file(args.token_ids, "--token-ids file"))
        return None, path, _read_token_ids(path)
    if args.text:
        text_path = pathlib.Path(check_input_file(args.text, "text file"))
    else:
        text_path = default_text()
        if text_path is None:
            raise UsageError(f"no text to analyse: pass --text FILE (the shared WikiText-2 file "
                             f"{'/'.join(_DEFAULT_TEXT)} was not found; looked in {_where_looked()})")
    text = read_text_arg(str(text_path), "text file")
    if not text.strip():
        raise UsageError(f"text file {str(text_path)!r} holds no text")
    return text, text_path, None


def _read_token_ids(path: pathlib.Path) -> np.ndarray:
    """Token ids from a .npy array or a text file of integers (spaces, commas or newlines)."""
    what = f"--token-ids file {str(path)!r}"
    try:
        if path.suffix == ".npy":
            ids = np.load(path, allow_pickle=False)
        else:
            words = path.read_text(encoding="utf-8").replace(",", " ").split()
            try:
                ids = np.array([int(w) for w in words], dtype=np.int64)
            except ValueError:
                bad = next(w for w in words if not w.lstrip("+-").isdigit())
                raise UsageError(f"{what}: {bad[:20]!r} is not an integer token id") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"{what} cannot be read: {e}") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise UsageError(f"{what}: expected a 1-D array of integers, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size < 2:
        raise UsageError(f"{what} holds fewer than 2 token ids")
    return ids.astype(np.int64)


def _load_checked(args):
    try:
        # one argument on the CPU without --tokenizer: _load(spec) is the seam tests replace
        model = (_load(args.model) if args.device == "cpu" and args.tokenizer is None
                 else _load(args.model, device=args.device, tokenizer=args.tokenizer))
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one line
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ""
        if args.model == DEFAULT_MODEL:
            hint = (f"; pass --model PATH to a checkpoint (llama2.c .bin, GGUF or safetensors) or a zoo name "
                    f"such as smollm2-135m, or set LLMINT8_DATA to the shared data folder (looked in "
                    f"{_where_looked()})")
        raise CommandError(f"cannot load model {args.model!r}: {msg}{hint}") from None
    return model


def _tokens_for(model, args, text, ids) -> np.ndarray:
    from .experiments import tokenize_text

    if ids is not None:
        vocab = int((getattr(model, "config", None) or {}).get("vocab_size", 0) or 0)
        if vocab and (ids.min() < 0 or ids.max() >= vocab):
            raise UsageError(f"--token-ids: ids must lie in [0, {vocab}) for model {args.model!r}, got "
                             f"[{ids.min()}, {ids.max()}]")
        return ids[: args.tokens]
    if getattr(model, "tokenizer", None) is None:
        raise UsageError(f"model {args.model!r} has no tokenizer to encode the text (none was found beside its "
                         f"weights); pass --token-ids FILE with the text's token ids instead")
    try:
        return tokenize_text(model, text, args.tokens)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _attention_share(cfg: dict, seq: int) -> float:
    """Share of a block's multiply-adds up to its attention probabilities (q/k/v and q.k^T):
    what the zeroing experiment recomputes per condition and layer."""
    try:
        d, h, kv, hd = (int(cfg[k]) for k in ("dim", "n_heads", "n_kv_heads", "head_dim"))
        hidden = int(cfg["hidden_dim"])
        ffn = (3 if cfg.get("gated") else 2) * d * hidden
    except (KeyError, TypeError, ValueError):
        return 0.5
    qkv, scores = d * (h + 2 * kv) * hd, seq * h * hd
    return (qkv + scores) / (qkv + h * hd * d + ffn + 2 * scores)


def _estimate(model, args, n_tokens: int, seq_len: int) -> tuple[float, dict]:
    """Seconds each phase should take, from one timed forward pass of a perplexity window."""
    from llmint8.models.cli import _n_windows

    win = min(args.ppl_context, n_tokens) - 1
    # the first pass pays one-time costs (page faults, BLAS threads starting): not timed
    model.forward(np.zeros((1, min(win, 8) or 1), dtype=np.int64), logits=False)
    t0 = time.perf_counter()
    model.forward(np.zeros((1, max(win, 1)), dtype=np.int64), logits=False)
    t_tok = (time.perf_counter() - t0) / max(win, 1)          # seconds per token of forward pass
    # overheads measured on SmolLM2-135M and stories260K (benchmarks/bench_analyze.py)
    phases = {"recording": 1.3 * t_tok * n_tokens}
    n_win = _n_windows(n_tokens, args.ppl_context, args.ppl_stride)
    ppl = 1.2 * t_tok * n_win * (min(args.ppl_context, n_tokens) - 1)
    phases["perplexity"] = ppl
    if not args.no_zeroing:
        n_edit = 1 + args.seeds
        if args.zeroing_mode == "all":
            top1 = (1 + n_edit) * t_tok * n_tokens
        else:
            top1 = t_tok * n_tokens * (1 + n_edit * _attention_share(model.config, seq_len))
        phases["top-1 attention"] = top1
        phases["zeroed perplexity"] = n_edit * ppl
    return sum(phases.values()), phases


class _Timer:
    """Wall and CPU (user + sys of every thread of the process) seconds per phase."""

    def __init__(self):
        self.phases: dict[str, tuple[float, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, time.process_time() - c0)

    def add(self, name: str, wall: float, cpu: float) -> None:
        w, c = self.phases.get(name, (0.0, 0.0))
        self.phases[name] = (w + wall, c + cpu)

    def to_dict(self) -> dict:
        return {k: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for k, (w, c) in self.phases.items()}

    def line(self) -> str:
        return ", ".join(f"{k} {w:.0f} s ({c:.0f} s CPU)" for k, (w, c) in self.phases.items())


def _run(args) -> int:
    from .experiments import _can_run_blocks, _default_seq_len, analyze_model, zeroing_experiment

    _check_common(args)
    if args.seeds < 0 or args.zero_top < 0:
        raise UsageError("--seeds and --zero-top must be >= 0")
    if args.ppl_context < 2 or not 1 <= args.ppl_stride <= args.ppl_context:
        raise UsageError(f"expected --ppl-context >= 2 and 1 <= --ppl-stride <= --ppl-context, got "
                         f"--ppl-context {args.ppl_context} --ppl-stride {args.ppl_stride}")
    # everything that can fail without computing is checked first: inputs, outputs, dependencies
    text, text_path, ids = _read_inputs(args)
    check_output_dir(args.out, "--out folder", files=OUTPUT_FILES)
    require_module("matplotlib", "analysis", "the plots")
    if not args.no_progress:
        require_module("tqdm", "analysis", "the progress bars (or pass --no-progress)")
    progress = not args.no_progress

    t_start, c_start = time.perf_counter(), time.process_time()
    timer = _Timer()
    with timer("load"):
        model = _load_checked(args)
    name = getattr(model, "name", str(args.model))
    tokens = _tokens_for(model, args, text, ids)
    seq_len = _default_seq_len(model, args.seq_len)
    if _can_run_blocks(model):  # an llmint8 model: its forward pass can be timed for the estimate
        with timer("estimate"):
            total, phases = _estimate(model, args, int(tokens.size), seq_len)
        print(f"model {name}: {tokens.size} tokens in sequences of {seq_len}; estimated {format_duration(total)} ("
              + ", ".join(f"{k} {format_duration(v)}" for k, v in phases.items())
              + (", zeroing only if outlier features are found" if "top-1 attention" in phases else "") + ")",
              flush=True)

    with timer("recording"):
        try:
            res = analyze_model(model, tokens, seq_len=args.seq_len, threshold=args.threshold,
                                min_layer_share=args.min_layer_share, min_position_share=args.min_position_share,
                                position_aggregation=args.position_aggregation, group_by=args.group_by,
                                progress=progress)
        except ValueError as e:
            raise CommandError(str(e)) from None
    s = res.summary
    ppl_fn = _perplexity_fn()
    with timer("perplexity"):
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
            zt: dict = {}
            zero = zeroing_experiment(model, tokens, feats, seeds=tuple(range(args.seeds)), seq_len=args.seq_len,
                                      mode=args.zeroing_mode, ppl_context=args.ppl_context,
                                      ppl_stride=args.ppl_stride, perplexity_fn=ppl_fn, baseline_perplexity=ppl,
                                      progress=progress, timings=zt)
            for k, (w, c) in zt.items():
                timer.add(k, w, c)
            print()
            if zero_note:
                print(zero_note)
            print(zero.table())
        else:
            zero_note = "no outlier features to zero (use --zero-top K to zero the K largest instead)"
            print(zero_note)

    out = pathlib.Path(args.out)
    with timer("plots"):
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
    wall, cpu = time.perf_counter() - t_start, time.process_time() - c_start
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
        "seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "timings": timer.to_dict(),
    }
    write_json(out / "report.json", _jsonable(report))
    print(f"\nwrote {out / 'report.json'} and plots to {out}/")
    print(f"took {format_duration(wall)} ({format_duration(cpu)} CPU): {timer.line()}")
    return 0


OUTLIERS_PROG = "python -m llmint8 outliers"


def build_outliers_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=OUTLIERS_PROG,
        description="List, for every linear layer's input, the feature columns with any |x| >= threshold: the "
                    "columns LLM.int8() multiplies in fp16 there. Inputs shared by several projections (q/k/v, "
                    "FFN gate/up) are listed once.")
    _input_args(p)
    p.add_argument("--threshold", type=_positive_float, default=DEFAULT_THRESHOLD,
                   help="magnitude bound, |x| >= threshold (default 6.0)")
    p.add_argument("--top", type=int, default=10, metavar="K",
                   help="columns printed per input, most frequent first (default 10; 0 prints all)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every input's columns, counts and largest |x| as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def outliers_main(argv: list[str] | None = None) -> int:
    """``python -m llmint8 outliers``; returns the exit status (0 ok, 2 bad argument, 1 failure)."""
    return run_command(OUTLIERS_PROG, _outliers_command, sys.argv[1:] if argv is None else argv)


def _outliers_command(argv: list[str]) -> int:
    from .experiments import analyze_model

    args = build_outliers_parser().parse_args(argv)
    _check_common(args)
    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    text, text_path, ids = _read_inputs(args)
    if args.json:
        check_output_file(args.json, "--json file")
    if not args.no_progress:
        require_module("tqdm", "analysis", "the progress bars (or pass --no-progress)")
    model = _load_checked(args)
    name = getattr(model, "name", str(args.model))
    tokens = _tokens_for(model, args, text, ids)
    try:
        # every linear's input, the FFN contraction's too: LLM.int8() decomposes all of them
        res = analyze_model(model, tokens, seq_len=args.seq_len, threshold=args.threshold,
                            names=list(model.linear_names), progress=not args.no_progress)
    except ValueError as e:
        raise CommandError(str(e)) from None
    rows = []
    for key in sorted(res.input_hit_count, key=_input_order):
        count = res.input_hit_count[key]
        cols = np.flatnonzero(count)
        order = cols[np.argsort(-count[cols], kind="stable")]
        rows.append(dict(input=key, names=res.input_names.get(key, [key]), width=int(count.size),
                         positions=res.input_positions[key], n_columns=int(cols.size),
                         columns=[int(c) for c in order], counts=[int(count[c]) for c in order],
                         max_abs=[float(res.input_max_abs[key][c]) for c in order]))
    n = int(tokens.size)
    print(f"model {name}: {n} tokens of {text_path.name}; columns with any |x| >= {args.threshold:g} "
          f"per linear input (column: positions reaching it)")
    w = max(len(r["input"]) for r in rows)
    for r in rows:
        shown = r["columns"] if args.top == 0 else r["columns"][: args.top]
        listing = ", ".join(f"{c}: {k}" for c, k in zip(shown, r["counts"]))
        more = f", ... (+{r['n_columns'] - len(shown)})" if len(shown) < r["n_columns"] else ""
        print(f"  {r['input']:<{w}}  {r['n_columns']:>4} of {r['width']:<5}  {listing}{more}")
    total = sum(r["n_columns"] for r in rows)
    print(f"{total} outlier columns over {len(rows)} inputs (attn_in: the input of q, k and v; ffn_in: of the "
          f"FFN's gate and up); `python -m llmint8 analyze` applies the paper's outlier-feature criteria")
    if args.json:
        report = {"model": name, "spec": args.model, "source": str(text_path), "n_tokens": n,
                  "threshold": args.threshold, "inputs": rows}
        write_json(args.json, report)
    return 0


def _input_order(key: str):
    from .outliers import _block_index

    i = _block_index(key)
    part = ("attn_in", "attn.o", "ffn_in", "mlp.down")
    tail = key.rsplit(".", 1)[-1] if "." in key else key
    rank = next((j for j, p in enumerate(part) if key.endswith(p)), len(part))
    return (i if i is not None else 1 << 30, rank, tail)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(analyze_main(sys.argv[1:]))
