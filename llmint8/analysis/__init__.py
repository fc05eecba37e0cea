"""Outlier-feature analysis (LLM.int8() paper, Section 4).

Array-level API (works on activations from any source)::

    from llmint8.analysis import analyze_activations
    res = analyze_activations({"layers.0.attn.q": x0, "layers.0.mlp.up": u0, ...})
    res.summary.features, res.summary.layer_share, res.summary.position_share

Model-level API (any object with the ``llmint8.models`` model interface)::

    from llmint8.analysis import analyze_model, zeroing_experiment, tokenize_text
    tokens = tokenize_text(model, text, 2048)
    res = analyze_model(model, tokens)
    z = zeroing_experiment(model, tokens, res.features)

Plots live in :mod:`llmint8.analysis.plots` (imported lazily: matplotlib is optional), the
paper's reported values in :mod:`llmint8.analysis.paper`, the command line in
:mod:`llmint8.analysis.cli`.
"""

from .experiments import (
    ATTENTION_INPUTS,
    ZeroingResult,
    ZeroingRun,
    analyze_model,
    mean_top1_attention,
    split_sequences,
    tokenize_text,
    zeroing_experiment,
)
from .outliers import (
    DEFAULT_MIN_LAYER_SHARE,
    DEFAULT_MIN_POSITION_SHARE,
    DEFAULT_THRESHOLD,
    OutlierAccumulator,
    OutlierAnalysis,
    OutlierFeature,
    OutlierSummary,
    analyze_activations,
    input_key,
    is_default_input,
    layer_key,
)
from .paper import PAPER_SOURCE, PAPER_TABLE1, PAPER_TABLE1_PARAMS, PAPER_TABLE4, PAPER_ZEROING

__all__ = [
    "ATTENTION_INPUTS", "DEFAULT_MIN_LAYER_SHARE", "DEFAULT_MIN_POSITION_SHARE", "DEFAULT_THRESHOLD",
    "OutlierAccumulator", "OutlierAnalysis", "OutlierFeature", "OutlierSummary",
    "PAPER_SOURCE", "PAPER_TABLE1", "PAPER_TABLE1_PARAMS", "PAPER_TABLE4", "PAPER_ZEROING",
    "ZeroingResult", "ZeroingRun",
    "analyze_activations", "analyze_model", "input_key", "is_default_input", "layer_key",
    "mean_top1_attention", "split_sequences", "tokenize_text", "zeroing_experiment",
]
