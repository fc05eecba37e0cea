"""Command line: ``python -m llmint8 [--version] [demo|perplexity|analyze|quantize|generate|outliers] ...``.

  demo        backends, then error / memory / CPU time per method on a 4096x4096 layer (default)
  perplexity  perplexity of a real model by quantization method
  analyze     outlier-feature analysis of a real model (plots and a JSON report)
  quantize    quantize a model with LLM.int8() once and save it (llmint8 or bitsandbytes format)
  generate    text from a prompt, streamed, under one or several methods side by side
  outliers    each linear layer input's outlier columns (|x| >= threshold), with counts

``python -m llmint8 COMMAND --help`` describes each. Errors are one line on stderr; the exit
code is 2 for a bad argument, 1 for a failure while running (see ``llmint8/_cli.py``).
"""
import importlib
import sys

# name -> (module, function, one-line description); a subcommand is one entry here, its function
# ``main(argv: list[str]) -> int`` raising llmint8._cli.UsageError / CommandError for errors
COMMANDS = {
    "demo": ("llmint8.demo", "main", "backends, then error / memory / CPU time per method"),
    "perplexity": ("llmint8.models.cli", "perplexity_main", "perplexity of a real model by method"),
    "analyze": ("llmint8.analysis.cli", "analyze_main", "outlier-feature analysis of a real model"),
    "quantize": ("llmint8.models.quantize_cli", "quantize_main", "quantize a model once and save it"),
    "generate": ("llmint8.models.generate_cli", "generate_main", "text from a prompt, streamed, by method"),
    "outliers": ("llmint8.analysis.cli", "outliers_main", "each linear input's outlier columns, with counts"),
}


def main(argv=None):
    """Dispatch to a subcommand; returns the process exit code."""
    from . import _cli
    from ._version import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in ("-h", "--help", "help"):
            print(__doc__)
            sys.stdout.flush()
            return 0
        if argv and argv[0] in ("-V", "--version", "version"):
            print(f"llmint8 {__version__}")
            sys.stdout.flush()
            return 0
    except BrokenPipeError:
        return _cli.broken_pipe_exit()
    cmd = argv[0] if argv and not argv[0].startswith("-") else "demo"
    rest = argv[1:] if argv and argv[0] == cmd else argv
    if cmd not in COMMANDS:
        print(f"python -m llmint8: error: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[cmd]

    def call(args):
        return getattr(importlib.import_module(module), func)(args)

    return _cli.run_command(f"python -m llmint8 {cmd}", call, rest)


if __name__ == "__main__":
    sys.exit(main())
