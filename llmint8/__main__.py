"""Command line: ``python -m llmint8 [demo|perplexity|analyze] ...``.

  demo        backends, then error / memory / CPU time per method on a 4096x4096 layer (default)
  perplexity  perplexity of a real model by quantization method
  analyze     outlier-feature analysis of a real model (plots and a JSON report)
  quantize    quantize a model with LLM.int8() once and save it (llmint8 or bitsandbytes format)
"""
import sys


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    cmd = argv[0] if argv and not argv[0].startswith("-") else "demo"
    rest = argv[1:] if argv and argv[0] == cmd else argv
    if cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if cmd == "perplexity":
        from .models.cli import perplexity_main
        return perplexity_main(rest)
    if cmd == "quantize":
        from .models.quantize_cli import quantize_main
        return quantize_main(rest)
    if cmd == "analyze":
        from .analysis.cli import analyze_main
        return analyze_main(rest)
    print(f"python -m llmint8: unknown command {cmd!r}; expected demo, perplexity, analyze or quantize", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
