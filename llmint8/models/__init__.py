"""Real models without PyTorch: checkpoint loaders (llama2.c, Hugging Face safetensors, GGUF),
tokenizers, a NumPy transformer whose linear layers can be llmint8 layers, and perplexity.

    from llmint8.models import load_model, perplexity
    model = load_model("stories260K")            # zoo name or a path
    qm = model.quantize("llm.int8", threshold=6.0)
    perplexity(qm, model.tokenizer.encode(text), context=256, stride=128)
    generate(qm, "Once upon a time", max_new_tokens=64).text
"""

from __future__ import annotations

import os

from .generate import Generation, generate, stream_generate
from .loaders import Checkpoint, load_checkpoint
from .perplexity import perplexity, read_text, token_nll
from .quantized import save_quantized
from .transformer import METHODS, KVCache, Model

__all__ = ["load_model", "save_quantized", "perplexity", "read_text", "token_nll", "Model", "METHODS", "Checkpoint",
           "KVCache", "generate", "stream_generate", "Generation"]


def load_model(name_or_path: str, dtype: str = "float32", tokenizer: str | None = None,
               device: str | None = "cpu", row_scale: str = "llmint8") -> Model:
    """Load a model by zoo name (see :mod:`llmint8.models.zoo`) or path.

    A path may be a llama2.c ``.bin`` (tokenizer ``tok{vocab}.bin``/``tokenizer.bin`` beside it, or
    ``tokenizer``), a ``.gguf`` file, a Hugging Face folder (config.json + .safetensors), or a
    quantized folder: one written by :func:`save_quantized` or a Hugging Face + bitsandbytes 8-bit
    checkpoint (``quantization_config.load_in_8bit``), loaded without re-quantizing onto ``device``.
    ``tokenizer`` (a path, see :func:`llmint8.models.tokenizers.load_tokenizer`) replaces the
    tokenizer found beside the weights.
    ``dtype`` is the activation dtype, "float32" or "float16". Returns a float :class:`Model`, or
    for a quantized folder a model whose ``method`` is "llm.int8" (or "vectorwise").
    ``row_scale="bitsandbytes"`` (quantized folders, CPU only) computes the int8 layers as
    bitsandbytes does (see :func:`llmint8.models.quantized.with_bitsandbytes_forward`).

    ``device`` ("cpu", "cuda", "cuda:N") is where every array of the model lives. A GPU model is
    read as on the CPU and copied to the device one array at a time, the host copy then released,
    so the host memory peak does not exceed a CPU load's; a quantized folder's int8 layers go from
    the memory-mapped file straight into their CUDA layers. Raises DeviceError (a RuntimeError)
    before reading anything when CuPy, the GPU or (for int8 layers) llmint8's CUDA backend is
    missing."""
    from . import device as _dev
    from . import zoo
    from .quantized import ROW_SCALES, detect_quantized_format, load_quantized_checkpoint

    device = _dev.parse_device(device)
    if row_scale not in ROW_SCALES:
        raise ValueError(f"row_scale must be one of {', '.join(map(repr, ROW_SCALES))}, got {row_scale!r}")
    if row_scale != "llmint8" and _dev.is_cuda(device):
        raise ValueError(f"row_scale={row_scale!r} is computed in NumPy on the CPU; load with device='cpu'")
    _dev.namespace(device)  # no CuPy, no GPU: say so before any work
    path = str(name_or_path)
    if not os.path.exists(path):
        if zoo.is_zoo_name(path):
            path = zoo.fetch(path)
        else:
            raise FileNotFoundError(f"{name_or_path!r} is neither an existing path nor a zoo model "
                                    f"(known: {', '.join(zoo.names())})")
    kind = detect_quantized_format(path)
    if row_scale != "llmint8" and kind is None:
        raise ValueError(f"row_scale={row_scale!r} applies to quantized folders (llmint8 or bitsandbytes 8-bit); "
                         f"{name_or_path!r} is a float model: quantize it, then use "
                         f"llmint8.models.quantized.with_bitsandbytes_forward")
    if kind is not None:
        if _dev.is_cuda(device):
            _dev.require_llmint8_cuda()
        m = load_quantized_checkpoint(path, kind, dtype=dtype, device=device, row_scale=row_scale)
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
    del ck
    return m.to(device)
