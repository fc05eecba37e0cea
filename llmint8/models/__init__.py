"""Real models without PyTorch: checkpoint loaders (llama2.c, Hugging Face safetensors, GGUF),
tokenizers, a NumPy transformer whose linear layers can be llmint8 layers, and perplexity.

    from llmint8.models import load_model, perplexity
    model = load_model("stories260K")            # zoo name or a path
    qm = model.quantize("llm.int8", threshold=6.0)
    perplexity(qm, model.tokenizer.encode(text), context=256, stride=128)
"""

from __future__ import annotations

import os

from .loaders import Checkpoint, load_checkpoint
from .perplexity import perplexity, read_text, token_nll
from .quantized import save_quantized
from .transformer import METHODS, Model

__all__ = ["load_model", "save_quantized", "perplexity", "read_text", "token_nll", "Model", "METHODS", "Checkpoint"]


def load_model(name_or_path: str, dtype: str = "float32", tokenizer: str | None = None,
               device: str | None = "cpu") -> Model:
    """Load a model by zoo name (see :mod:`llmint8.models.zoo`) or path.

    A path may be a llama2.c ``.bin`` (tokenizer ``tok{vocab}.bin``/``tokenizer.bin`` beside it, or
    ``tokenizer``), a ``.gguf`` file, a Hugging Face folder (config.json + .safetensors), or a
    quantized folder: one written by :func:`save_quantized` or a Hugging Face + bitsandbytes 8-bit
    checkpoint (``quantization_config.load_in_8bit``), loaded without re-quantizing onto ``device``.
    ``tokenizer`` (a path, see :func:`llmint8.models.tokenizers.load_tokenizer`) replaces the
    tokenizer found beside the weights.
    ``dtype`` is the activation dtype, "float32" or "float16". Returns a float :class:`Model`, or
    for a quantized folder a model whose ``method`` is "llm.int8" (or "vectorwise")."""
    from . import zoo
    from .quantized import detect_quantized_format, load_quantized_checkpoint

    path = str(name_or_path)
    if not os.path.exists(path):
        if zoo.is_zoo_name(path):
            path = zoo.fetch(path)
        else:
            raise FileNotFoundError(f"{name_or_path!r} is neither an existing path nor a zoo model "
                                    f"(known: {', '.join(zoo.names())})")
    kind = detect_quantized_format(path)
    if kind is not None:
        m = load_quantized_checkpoint(path, kind, dtype=dtype, device=device)
        if tokenizer:
            from .tokenizers import load_tokenizer

            m.tokenizer = load_tokenizer(tokenizer, m.config["vocab_size"], m.config)
        return m
    ck = load_checkpoint(path, tokenizer if tokenizer and path.endswith(".bin") else None)
    if tokenizer:
        from .tokenizers import load_tokenizer

        ck.tokenizer = load_tokenizer(tokenizer, ck.config["vocab_size"], ck.config)
    name = ck.name
    if zoo.is_zoo_name(str(name_or_path)):
        name = zoo.canonical_name(str(name_or_path))
    m = Model(ck.config, ck.weights, ck.tokenizer, name=name, dtype=dtype, baseline_note=ck.baseline_note)
    m.source = ck.source or path
    return m
