"""Experiments that drive a model: recording outlier statistics and zeroing outlier features.

These functions use only the model interface of :mod:`llmint8.models` (``forward``,
``add_hook``, ``tokenizer``, ``config``, ``linear_names``) and its ``perplexity`` function, so
any object with that interface works.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .outliers import (
    DEFAULT_MIN_LAYER_SHARE,
    DEFAULT_MIN_POSITION_SHARE,
    DEFAULT_THRESHOLD,
    OutlierAccumulator,
    OutlierAnalysis,
    _block_index,
)

__all__ = [
    "tokenize_text",
    "split_sequences",
    "analyze_model",
    "mean_top1_attention",
    "ZeroingRun",
    "ZeroingResult",
    "zeroing_experiment",
    "ATTENTION_INPUTS",
]

#: Projections whose (shared) input the zeroing experiment edits: the attention projections
#: that produce the attention probabilities.
ATTENTION_INPUTS = ("attn.q", "attn.k", "attn.v")


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return it
    return tqdm(it, **kw)


def _bar(enabled: bool, **kw):
    """A tqdm progress bar to update by hand (None when disabled or tqdm is missing)."""
    return _progress(None, enabled, **kw)


def tokenize_text(model: Any, text: str, n_tokens: int | None = None) -> np.ndarray:
    """Encode ``text`` with the model's tokenizer (BOS first), keeping ``n_tokens`` tokens.

    Only a prefix of a long text is encoded (doubling until enough tokens come out), so asking
    for a few hundred tokens of a megabyte file stays fast.

    Returns int64 array ``(n,)``; raises ValueError when the model has no tokenizer or the text
    yields fewer than 2 tokens.
    """
    if n_tokens is not None and n_tokens < 2:
        raise ValueError(f"n_tokens must be >= 2, got {n_tokens}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"model {getattr(model, 'name', '') or type(model).__name__} has no tokenizer to encode "
                         "the text (none was found beside its weights); load it with one, or pass token ids")
    if n_tokens is None:
        ids = model.tokenizer.encode(text, bos=True)
    else:
        n_chars = max(256, 8 * n_tokens)
        while True:
            ids = model.tokenizer.encode(text[:n_chars], bos=True)
            if len(ids) > n_tokens or n_chars >= len(text):
                break
            n_chars *= 2
        ids = ids[:n_tokens]
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size < 2:
        raise ValueError("the text gives fewer than 2 tokens")
    return ids


def split_sequences(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Cut a 1-D token stream into consecutive sequences of at most ``seq_len`` tokens.

    Returns a list of int64 arrays ``(1, L)`` (batch of one), ready for ``model.forward``.
    """
    t = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return [t[i:i + seq_len][None, :] for i in range(0, t.size, seq_len)]


def _default_seq_len(model: Any, seq_len: int | None) -> int:
    if seq_len is not None:
        return int(seq_len)
    cfg = getattr(model, "config", {}) or {}
    for k in ("seq_len", "max_seq_len", "context_length", "max_position_embeddings"):
        if cfg.get(k):
            return int(min(int(cfg[k]), 512))
    return 256


def analyze_model(
    model: Any,
    tokens: np.ndarray,
    *,
    seq_len: int | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    min_layer_share: float = DEFAULT_MIN_LAYER_SHARE,
    min_position_share: float = DEFAULT_MIN_POSITION_SHARE,
    position_aggregation: str = "any",
    group_by: str = "block",
    names: Sequence[str] | None = None,
    progress: bool = False,
) -> OutlierAnalysis:
    """Record projection inputs while running ``tokens`` through ``model`` and find outliers.

    The token stream (int ``(n,)``) is cut into sequences of ``seq_len`` tokens (default: the
    model's context, at most 512), each run separately; statistics stream into an
    :class:`OutlierAccumulator` through a ``linear_input`` hook, so no activations are kept.
    All sequence positions of all sequences together form the position axis.

    ``names`` defaults to every linear of the model except the FFN contraction (``mlp.down``).
    Other parameters as in :func:`analyze_activations`.
    """
    acc = OutlierAccumulator(threshold, group_by=group_by, names=names)
    wanted = [n for n in model.linear_names if acc.wants(n)]

    seqs = split_sequences(tokens, _default_seq_len(model, seq_len))
    L = int((getattr(model, "config", None) or {}).get("n_layers", 1) or 1)
    bar = _bar(progress, total=len(seqs) * L, desc="recording activations", unit="layer")
    done = [0]  # sequences finished

    def hook(name, x):
        acc.update(name, x)
        # one tick per layer, from the hook already there (a sequence of a large model takes a
        # while): the blocks before this input's are done
        b = _block_index(name) if bar is not None else None
        if b is not None and bar.n < done[0] * L + b:
            bar.update(done[0] * L + b - bar.n)
        return None

    handle = model.add_hook(hook, kind="linear_input", names=wanted)
    try:
        for k, s in enumerate(seqs):
            model.forward(s)
            done[0] = k + 1
            if bar is not None and bar.n < (k + 1) * L:
                bar.update((k + 1) * L - bar.n)
    finally:
        handle.remove()
        if bar is not None:
            bar.close()
    return acc.result(min_layer_share, min_position_share, position_aggregation)


def _attn_layer_names(model: Any, layer: int | None, projections: Sequence[str]) -> list[str]:
    out = []
    for n in model.linear_names:
        if any(n.endswith(p) for p in projections):
            if layer is None or _block_index(n) == layer:
                out.append(n)
    return out


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the layer being measured has been read."""


def _zero_hook(features: np.ndarray, allowed: set[str]) -> Callable:
    def hook(name, x):
        if name not in allowed or features.size == 0:
            return None
        y = np.array(x, dtype=np.float32, copy=True)
        y[..., features] = 0.0
        return y
    return hook


def _can_run_blocks(model: Any) -> bool:
    # llmint8.models.Model offers its blocks one at a time; a duck-typed model may not
    return callable(getattr(model, "embed", None)) and callable(getattr(model, "run_blocks", None))


def _top1_independent_by_block(
    model: Any,
    seqs: list[np.ndarray],
    conditions: Sequence[np.ndarray],
    projections: Sequence[str],
    bar=None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Independent-mode sums and counts of the top-1 probabilities for several sets of zeroed
    features at once, reusing the unmodified prefix.

    In independent mode, the pass that measures layer ``l`` edits only layer ``l``'s inputs, so
    blocks ``0 .. l-1`` see exactly the unmodified forward pass. Each sequence therefore runs
    through the blocks once, unmodified (its own attention probabilities give the conditions
    that zero nothing), and at every block ``l`` the block alone is run again from the same
    residual stream once per condition, with the features zeroed, up to its attention
    probabilities. The per-layer sums see the sequences in the same order as one full forward
    pass per layer and sequence would: the results are bit-identical to that, at about the cost
    of ``1 + len(conditions) * (share of a block up to its attention)`` forward passes instead
    of ``len(conditions) * n_layers / 2``.
    """
    L = int(model.config["n_layers"])
    res = [(np.zeros(L), np.zeros(L)) for _ in conditions]
    plain = [i for i, f in enumerate(conditions) if f.size == 0]
    edited = [i for i, f in enumerate(conditions) if f.size]
    current: dict = {}   # which condition and layer the probability hook is reading

    def probs_hook(layer_index, probs):
        if layer_index != current["layer"]:
            return None
        p = np.asarray(probs)
        top = float(p.max(axis=-1).sum(dtype=np.float64))
        rows = p.size // p.shape[-1]
        for c in current["conds"]:
            res[c][0][layer_index] += top
            res[c][1][layer_index] += rows
        if current["stop"]:
            raise _StopForward
        return None

    hp = model.add_hook(probs_hook, kind="attention_probs")
    try:
        for s in seqs:
            x = model.embed(s)
            for layer in range(L):
                names = _attn_layer_names(model, layer, projections)
                for c in edited:
                    current.update(layer=layer, conds=(c,), stop=True)
                    hz = model.add_hook(_zero_hook(conditions[c], set(names)), kind="linear_input", names=names)
                    try:
                        model.run_blocks(x, layer, layer + 1)
                    except _StopForward:
                        pass
                    finally:
                        hz.remove()
                current.update(layer=layer, conds=tuple(plain), stop=False)
                x = model.run_blocks(x, layer, layer + 1)
                if bar is not None:
                    bar.update(1)
    finally:
        hp.remove()
    return res


def mean_top1_attention(
    model: Any,
    tokens: np.ndarray,
    *,
    seq_len: int | None = None,
    zero_features: Sequence[int] = (),
    projections: Sequence[str] = ATTENTION_INPUTS,
    mode: str = "independent",
    progress: bool = False,
) -> np.ndarray:
    """Mean top-1 attention probability per layer, optionally with features zeroed.

    For each layer, the largest probability of every attention row (query position, head)
    is averaged over rows, heads and sequences. Returns float64 ``(n_layers,)``.

    ``zero_features`` are set to zero in the inputs of ``projections`` (default q, k, v).
    ``mode="independent"`` (the paper's procedure) zeroes them in one layer at a time and
    reads that layer's probabilities, so earlier layers run unmodified and errors do not
    cascade. On a model that runs its blocks one at a time (``embed`` / ``run_blocks``, as
    :class:`llmint8.models.Model` does) the unmodified prefix is computed once per sequence and
    each layer's edited block is run from it; on any other model, one forward pass per layer
    and sequence, each stopped right after the layer it measures. Both give the same numbers.
    ``mode="all"`` zeroes them in every layer in a single pass (later layers also see the
    earlier layers' changes).
    """
    if mode not in ("independent", "all"):
        raise ValueError(f"mode must be 'independent' or 'all', got {mode!r}")
    feats = np.asarray(sorted(set(int(f) for f in zero_features)), dtype=np.int64)
    seqs = split_sequences(tokens, _default_seq_len(model, seq_len))
    if mode == "independent" and feats.size and _can_run_blocks(model):
        return _top1_independent(model, seqs, [feats], projections, progress, "top-1 attention")[0]
    return _top1_by_forward(model, seqs, feats, projections, mode, progress)


def _top1_independent(model, seqs, conds, projections, progress, desc) -> list[np.ndarray]:
    """Per condition (features zeroed), the mean top-1 probability per layer (float64
    ``(n_layers,)``) by running each edited block from the unmodified prefix, with a bar."""
    L = int(model.config["n_layers"])
    bar = _bar(progress, total=len(seqs) * L, desc=desc, unit="layer")
    try:
        sc = _top1_independent_by_block(model, seqs, conds, projections, bar)
    finally:
        if bar is not None:
            bar.close()
    with np.errstate(invalid="ignore", divide="ignore"):
        return [sums / counts for sums, counts in sc]


def _top1_by_forward(model, seqs, feats, projections, mode, progress):
    """mean_top1_attention through whole forward passes (any model with the hook interface)."""
    L = int(model.config["n_layers"])
    sums = np.zeros(L)
    counts = np.zeros(L)

    def run(layer_sel: int | None, names: list[str]):
        def probs_hook(layer_index, probs):
            if layer_sel is not None and layer_index != layer_sel:
                return None
            p = np.asarray(probs)
            sums[layer_index] += float(p.max(axis=-1).sum(dtype=np.float64))
            counts[layer_index] += p.size // p.shape[-1]
            if layer_sel is not None:
                # Later layers are not read in this pass: stop the forward pass early.
                raise _StopForward
            return None
        hs = [model.add_hook(probs_hook, kind="attention_probs")]
        if feats.size:
            hs.append(model.add_hook(_zero_hook(feats, set(names)), kind="linear_input", names=names))
        try:
            for s in seqs:
                try:
                    model.forward(s)
                except _StopForward:
                    pass
        finally:
            for h in hs:
                h.remove()

    if mode == "all" or feats.size == 0:
        run(None, _attn_layer_names(model, None, projections))
    else:
        for layer in _progress(range(L), progress, desc="zeroing per layer", unit="layer", leave=False):
            run(layer, _attn_layer_names(model, layer, projections))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


@dataclasses.dataclass(frozen=True)
class ZeroingRun:
    """One condition of the zeroing experiment.

    ``top1_per_layer``: float64 ``(n_layers,)``; ``top1``: their mean; ``ppl``: perplexity of
    the token stream with the features zeroed in every layer (NaN when not measured).
    """

    label: str
    features: tuple[int, ...]
    top1: float
    top1_per_layer: tuple[float, ...]
    ppl: float
    nll: float


@dataclasses.dataclass(frozen=True)
class ZeroingResult:
    """Baseline, outliers zeroed, and random-feature controls (one per seed)."""

    baseline: ZeroingRun
    outliers: ZeroingRun
    random: tuple[ZeroingRun, ...]
    projections: tuple[str, ...]
    mode: str
    n_tokens: int

    @staticmethod
    def _rel(a: float, b: float) -> float:
        return (a - b) / b if b and np.isfinite(a) and np.isfinite(b) else float("nan")

    @property
    def top1_change_outliers(self) -> float:
        """Relative change of the mean top-1 probability with outliers zeroed (-0.2 = -20%)."""
        return self._rel(self.outliers.top1, self.baseline.top1)

    @property
    def ppl_change_outliers(self) -> float:
        """Relative perplexity change with outliers zeroed (6.0 = +600%)."""
        return self._rel(self.outliers.ppl, self.baseline.ppl)

    @property
    def top1_change_random(self) -> tuple[float, ...]:
        return tuple(self._rel(r.top1, self.baseline.top1) for r in self.random)

    @property
    def ppl_change_random(self) -> tuple[float, ...]:
        return tuple(self._rel(r.ppl, self.baseline.ppl) for r in self.random)

    def to_dict(self) -> dict:
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v
        d = dataclasses.asdict(self)
        d.update(top1_change_outliers=self.top1_change_outliers,
                 ppl_change_outliers=self.ppl_change_outliers,
                 top1_change_random=list(self.top1_change_random),
                 ppl_change_random=list(self.ppl_change_random))
        return clean(d)

    def table(self) -> str:
        rows = [("condition", "features", "mean top-1", "change", "ppl", "change")]
        for r in (self.baseline, self.outliers, *self.random):
            rows.append((r.label, str(len(r.features)), f"{r.top1:.4f}",
                         "" if r is self.baseline else f"{self._rel(r.top1, self.baseline.top1):+.2%}",
                         f"{r.ppl:.3f}" if np.isfinite(r.ppl) else "n/a",
                         "" if r is self.baseline else f"{self._rel(r.ppl, self.baseline.ppl):+.2%}"))
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def zeroing_experiment(
    model: Any,
    tokens: np.ndarray,
    features: Sequence[int],
    *,
    seeds: Sequence[int] = (0, 1, 2),
    seq_len: int | None = None,
    projections: Sequence[str] = ATTENTION_INPUTS,
    mode: str = "independent",
    measure_ppl: bool = True,
    ppl_context: int = 256,
    ppl_stride: int = 128,
    perplexity_fn: Callable | None = None,
    baseline_perplexity: dict | None = None,
    progress: bool = False,
    timings: dict | None = None,
) -> ZeroingResult:
    """The paper's Section 4.2 experiment: zero outlier features before the attention projections.

    Parameters
    ----------
    model, tokens:
        A model with the :mod:`llmint8.models` interface and an int token stream ``(n,)``.
    features:
        Feature dimensions to zero (usually ``analysis.features``).
    seeds:
        One random control per seed: the same number of features drawn uniformly, without
        replacement, from the dimensions not in ``features``.
    projections:
        Suffixes of the linears whose inputs are edited (default q, k, v; they share one input).
    mode:
        How the top-1 probability is measured; see :func:`mean_top1_attention` (in independent
        mode every condition is measured in one sweep over the blocks, sharing the unmodified
        prefix, when the model runs its blocks one at a time).
    measure_ppl:
        Also compute perplexity with the features zeroed in every layer, using
        ``perplexity_fn(model, tokens, context=, stride=, progress=)`` (default
        :func:`llmint8.models.perplexity`).
    baseline_perplexity:
        The result of ``perplexity_fn`` on the unmodified model with the same tokens, context
        and stride, when already computed: used for the baseline instead of computing it again.
    timings:
        A dict that receives ``{"top-1 attention": (wall_s, cpu_s), "zeroed perplexity": ...}``.

    Returns
    -------
    ZeroingResult
    """
    if mode not in ("independent", "all"):
        raise ValueError(f"mode must be 'independent' or 'all', got {mode!r}")
    feats = tuple(sorted(set(int(f) for f in features)))
    width = int(model.config["dim"])
    if any(f < 0 or f >= width for f in feats):
        raise ValueError(f"feature indices must be in [0, {width}), got {feats}")
    if measure_ppl and perplexity_fn is None:
        from llmint8.models import perplexity as perplexity_fn  # noqa: N813
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    all_names = _attn_layer_names(model, None, projections)

    others = np.array([f for f in range(width) if f not in set(feats)], dtype=np.int64)
    plan = [("baseline", ()), ("outliers zeroed", feats)]
    for s in seeds:
        rng = np.random.default_rng(s)
        k = min(len(feats), others.size)
        pick = tuple(sorted(int(f) for f in rng.choice(others, size=k, replace=False))) if k else ()
        plan.append((f"random (seed {s})", pick))

    # top-1 attention of every condition
    t0, c0 = time.perf_counter(), time.process_time()
    conds = [np.asarray(fs, dtype=np.int64) for _, fs in plan]
    if mode == "independent" and _can_run_blocks(model):
        seqs = split_sequences(tokens, _default_seq_len(model, seq_len))
        top1 = _top1_independent(model, seqs, conds, projections, progress,
                                 f"top-1 attention, {len(plan)} conditions")
    else:
        top1 = [mean_top1_attention(model, tokens, seq_len=seq_len, zero_features=fs, projections=projections,
                                    mode=mode)
                for _, fs in _progress(plan, progress, desc="top-1 attention", unit="condition")]
    if timings is not None:
        timings["top-1 attention"] = (time.perf_counter() - t0, time.process_time() - c0)

    def ppl_with(fs: tuple[int, ...]) -> tuple[float, float]:
        if not measure_ppl:
            return float("nan"), float("nan")
        if not fs and baseline_perplexity is not None:
            return float(baseline_perplexity["ppl"]), float(baseline_perplexity["nll"])
        h = None
        if fs:
            h = model.add_hook(_zero_hook(np.asarray(fs, np.int64), set(all_names)),
                               kind="linear_input", names=all_names)
        try:
            r = perplexity_fn(model, tokens, context=ppl_context, stride=ppl_stride, progress=progress)
        finally:
            if h is not None:
                h.remove()
        return float(r["ppl"]), float(r["nll"])

    t0, c0 = time.perf_counter(), time.process_time()
    runs = []
    for (label, fs), per_layer in zip(_progress(plan, progress and measure_ppl, desc="perplexity, features zeroed",
                                                unit="condition"), top1):
        ppl, nll = ppl_with(fs)
        runs.append(ZeroingRun(label, fs, float(np.mean(per_layer)), tuple(float(v) for v in per_layer), ppl, nll))
    if timings is not None:
        timings["zeroed perplexity"] = (time.perf_counter() - t0, time.process_time() - c0)
    return ZeroingResult(runs[0], runs[1], tuple(runs[2:]), tuple(projections), mode, int(tokens.size))
