"""Outlier-feature statistics from recorded activations (LLM.int8() paper, Section 4).

The paper's definition: a hidden-state feature dimension ``h_i`` is an *outlier feature* when it
has at least one value of magnitude ``>= 6.0``, this happens in the same dimension in at least
25% of the transformer layers, and it appears in at least 6% of all sequence positions across
all hidden states. Statistics are taken from the inputs of the attention projections
(query/key/value/output) and of the FFN expansion (first) layer; the attention function itself
and the FFN contraction layer are ignored.

Everything here works on plain NumPy arrays, so activations recorded by any framework can be
analysed. Choices the paper leaves open, and how this module settles them:

* **What a "layer" is** (``group_by``). Default ``"block"``: one layer per transformer block; a
  dimension is in a layer when it reaches the threshold in any of that block's recorded
  projection inputs (attention input, attention-output-projection input, FFN input). Names
  of the form ``layers.{i}.…`` are grouped by ``i``; other names are their own layer.
  ``"input"`` makes each distinct projection input its own layer (up to three per block) and
  ``"name"`` each recorded name; a callable ``name -> key`` gives any other grouping.
* **Shared inputs are not double-counted.** Query, key and value read the same array, and so do
  the FFN's up and gate projections. Names ending in ``attn.q|k|v`` (and ``mlp.up|gate``) of
  one block are treated as one input: only the first of them to deliver a given range of
  positions is counted (with ``group_by="name"`` the shared input therefore appears under that
  first name only).
* **Summary shares.** ``layer_share`` / ``position_share`` of :class:`OutlierSummary` are the
  shares of layers / positions where at least one outlier feature reaches the threshold; the
  per-feature shares (the paper's Table 4 reports those of the most common outlier) are in
  ``OutlierSummary.outlier_features`` and ``top_feature``.
* **Which inputs count** (``names``). By default every recorded name except the FFN
  contraction input (``….mlp.down``, ``….ffn.down``, ``….w2``), as in the paper.
* **Feature width.** A feature index is only comparable between inputs of equal width. The
  analysed width is the most common width among the selected inputs (the residual stream in
  a standard transformer); inputs of another width (e.g. Gemma's attention-output input,
  ``n_heads * head_dim != dim``) still get per-input statistics but are left out of the
  cross-layer criteria and listed in ``OutlierAnalysis.skipped_inputs``.
* **How "in >= 6% of positions" is aggregated across layers** (``position_aggregation``).
  Default ``"any"``: a position counts for a feature when the feature reaches the threshold at
  that position in at least one analysed layer (the paper's "across all hidden states").
  ``"max"``: the largest per-layer share must reach the bound; ``"mean"``: the per-layer share
  averaged over all layers must.
* **Exact boundaries.** Every comparison is ``>=``. Magnitudes are compared in float64, so a
  value of exactly 6.0 counts. Shares are compared as exact fractions of integer counts: a
  share is taken as the decimal it prints as (``0.06`` is 6/100), so 3 of 50 positions meets
  ``0.06`` although ``0.06 * 50 == 3.0000000000000004`` in floating point.
* **Non-finite input** (NaN or ±inf) raises ``ValueError``; a magnitude criterion is
  meaningless on it.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_MIN_LAYER_SHARE",
    "DEFAULT_MIN_POSITION_SHARE",
    "OutlierFeature",
    "OutlierSummary",
    "OutlierAnalysis",
    "OutlierAccumulator",
    "analyze_activations",
    "layer_key",
    "input_key",
    "is_default_input",
]

DEFAULT_THRESHOLD = 6.0
DEFAULT_MIN_LAYER_SHARE = 0.25
DEFAULT_MIN_POSITION_SHARE = 0.06

_BLOCK_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
# Suffixes of projections that read the same array: one input per block.
_ATTN_IN = ("attn.q", "attn.k", "attn.v", "attn.qkv", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj")
_FFN_IN = ("mlp.up", "mlp.gate", "mlp.gate_up", "mlp.up_proj", "mlp.gate_proj")
_CONTRACTION = ("mlp.down", "ffn.down", "mlp.down_proj", ".w2", "mlp.c_proj", "mlp.fc2")


def _block_index(name: str) -> int | None:
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def input_key(name: str) -> str:
    """Identify the array a projection reads: q/k/v share one input, FFN up/gate another.

    ``"layers.3.attn.k"`` -> ``"layers.3.attn_in"``, ``"layers.3.mlp.gate"`` ->
    ``"layers.3.ffn_in"``; any other name is its own input.
    """
    for suffixes, tag in ((_ATTN_IN, "attn_in"), (_FFN_IN, "ffn_in")):
        for s in suffixes:
            if name.endswith(s):
                return name[: len(name) - len(s)] + tag
    return name


def layer_key(name: str) -> str:
    """Default (``group_by="block"``) layer of a recorded name: ``"layers.{i}"`` or the name."""
    i = _block_index(name)
    return f"layers.{i}" if i is not None else name


def is_default_input(name: str) -> bool:
    """True for inputs the paper analyses: everything but the FFN contraction layer's input."""
    return not any(name.endswith(s) for s in _CONTRACTION)


def _as_fraction(share: float, what: str) -> Fraction:
    try:
        f = Fraction(str(share))
    except (ValueError, TypeError):
        raise ValueError(f"{what} must be a number in [0, 1], got {share!r}") from None
    if not 0 <= f <= 1:
        raise ValueError(f"{what} must be in [0, 1], got {share!r}")
    return f


def _sort_key(name: str, seen: int) -> tuple:
    # Natural order: layers.2 before layers.10; otherwise first-seen order.
    i = _block_index(name)
    return (0, i, seen) if i is not None else (1, 0, seen)


@dataclasses.dataclass(frozen=True)
class OutlierFeature:
    """One outlier feature dimension.

    ``layer_share``/``position_share`` are the measured shares; ``quartiles`` are the signed
    25/50/75% quantiles of the feature's values over its occurrences (every recorded input
    value with magnitude >= threshold), as in the paper's Table 4; ``one_sided`` is True when
    all occurrences have the same sign.
    """

    index: int
    n_layers: int
    layer_share: float
    n_positions: int
    position_share: float
    n_occurrences: int
    max_magnitude: float
    median_magnitude: float
    quartiles: tuple[float, float, float]
    one_sided: bool
    layers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OutlierSummary:
    """Summary of one analysis (the quantities behind the paper's Figures 3 and 4a).

    * ``layer_share``: share of layers in which at least one outlier feature reaches the
      threshold (0 when there are no outlier features).
    * ``position_share``: share of sequence positions at which at least one outlier feature
      reaches the threshold in at least one layer.
    * ``median_magnitude`` / ``max_magnitude``: median and largest ``|x|`` over all
      occurrences (values >= threshold in an analysed input) of all outlier features; NaN
      when there are none.
    * ``top_feature``: the most common outlier feature (most layers, then most positions,
      then most occurrences, then lowest index) — the row the paper's Table 4 reports.
    """

    threshold: float
    min_layer_share: float
    min_position_share: float
    position_aggregation: str
    group_by: str
    n_layers: int
    n_positions: int
    n_features: int
    n_outlier_features: int
    features: tuple[int, ...]
    layers_affected: tuple[str, ...]
    layer_share: float
    n_positions_affected: int
    position_share: float
    median_magnitude: float
    max_magnitude: float
    n_one_sided: int
    top_feature: OutlierFeature | None
    outlier_features: tuple[OutlierFeature, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN becomes None)."""
        def clean(v):
            if isinstance(v, float) and not np.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v
        return clean(dataclasses.asdict(self))

    def table(self) -> str:
        """Plain-text table of the headline numbers."""
        rows = [
            ("layers (analysed)", f"{self.n_layers}"),
            ("positions", f"{self.n_positions}"),
            ("feature width", f"{self.n_features}"),
            ("outlier features", f"{self.n_outlier_features}"
             + (f"  dims {list(self.features)}" if 0 < len(self.features) <= 16 else
                f"  dims {str(list(self.features[:16]))[:-1]}, ...]" if self.features else "")),
            ("layers affected", f"{self.layer_share:.1%} ({len(self.layers_affected)})"),
            ("positions affected", f"{self.position_share:.1%} ({self.n_positions_affected})"),
            ("median |outlier|", _fmt(self.median_magnitude)),
            ("largest |outlier|", _fmt(self.max_magnitude)),
            ("one-sided features", f"{self.n_one_sided}"),
        ]
        w = max(len(a) for a, _ in rows)
        head = (f"criteria: |x| >= {self.threshold:g}, >= {self.min_layer_share:.0%} of layers "
                f"(grouped by {self.group_by}), >= {self.min_position_share:.0%} of positions "
                f"({self.position_aggregation})")
        return "\n".join([head] + [f"  {a:<{w}}  {b}" for a, b in rows])


def _fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.3g}"


@dataclasses.dataclass
class OutlierAnalysis:
    """Full result of :func:`analyze_activations` / :meth:`OutlierAccumulator.result`.

    Arrays (``G`` analysed layers, ``D`` feature width):

    * ``max_abs``: float64 ``(G, D)``, largest ``|x|`` per layer and feature (over the layer's
      analysed inputs and all positions).
    * ``share_above``: float64 ``(G, D)``, share of positions at which the feature reaches the
      threshold in that layer (any of its inputs).
    * ``layer_hits``: bool ``(G, D)``, ``max_abs >= threshold``.
    * ``position_count``: int64 ``(D,)``, positions counted for the position criterion under
      the chosen aggregation (for ``"mean"``, the sum over layers of per-layer counts).
    * ``is_outlier``: bool ``(D,)``.
    * ``input_max_abs`` / ``input_share_above``: per analysed-or-skipped input key, float64
      ``(width,)`` arrays of the same statistics for that input alone.
    * ``input_rms``: per input key, the root-mean-square of all its values (its typical scale;
      the paper's fixed threshold 6.0 presumes features of roughly unit scale).
    * ``input_hit_count``: per input key, int64 ``(width,)``: positions at which each feature
      (column) reaches the threshold in that input; ``input_positions``: the positions it saw;
      ``input_names``: the recorded names that read it (q, k and v share one input). The columns
      with a nonzero count are those LLM.int8() multiplies in fp16 for that input.
    """

    layers: list[str]
    max_abs: np.ndarray
    share_above: np.ndarray
    layer_hits: np.ndarray
    position_count: np.ndarray
    is_outlier: np.ndarray
    input_max_abs: dict[str, np.ndarray]
    input_share_above: dict[str, np.ndarray]
    skipped_inputs: list[str]
    summary: OutlierSummary
    input_rms: dict[str, float] = dataclasses.field(default_factory=dict)
    _base_rate: float = float("nan")
    input_hit_count: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    input_positions: dict[str, int] = dataclasses.field(default_factory=dict)
    input_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    @property
    def features(self) -> tuple[int, ...]:
        return self.summary.features

    @property
    def share_values_above(self) -> float:
        """Share of all analysed input values (every position, feature and distinct input) with
        ``|x| >= threshold``: the base rate against which a few outlier dimensions stand out."""
        return self._base_rate

    @property
    def typical_rms(self) -> float:
        """Median over the analysed inputs of their RMS (NaN when none)."""
        v = [r for k, r in self.input_rms.items() if k not in self.skipped_inputs]
        return float(np.median(v)) if v else float("nan")


class OutlierAccumulator:
    """Streams activations and keeps only what the outlier criteria need.

    Feed it chunks with :meth:`update` (directly, or from a model hook) and call
    :meth:`result`. The magnitude ``threshold`` is fixed at construction because per-position
    hit masks depend on it; layer/position shares and aggregation can be chosen at
    :meth:`result`.

    Memory: per analysed layer, one boolean ``(positions, width)`` hit mask, plus the values
    of the occurrences (``|x| >= threshold``).

    Positions of different names are aligned by arrival order: the k-th row a name receives
    is position k. Every name must therefore see the same rows in the same order (true for
    hooks called once per forward pass, and for a mapping of arrays over one token stream).
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        *,
        group_by: str | Callable[[str], str] = "block",
        names: Iterable[str] | Callable[[str], bool] | None = None,
    ):
        threshold = float(threshold)
        if not np.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        self.threshold = threshold
        if callable(group_by):
            self._group = group_by
            self.group_by = getattr(group_by, "__name__", "custom")
        elif group_by == "block":
            self._group, self.group_by = layer_key, "block"
        elif group_by == "input":
            self._group, self.group_by = input_key, "input"
        elif group_by == "name":
            self._group, self.group_by = (lambda n: n), "name"
        else:
            raise ValueError(f"group_by must be 'block', 'input', 'name' or a callable, got {group_by!r}")
        if names is None:
            self._select = is_default_input
        elif callable(names):
            self._select = names
        else:
            wanted = set(names)
            self._select = wanted.__contains__
        self._cursor: dict[str, int] = {}          # rows received per name
        self._done: dict[str, int] = {}            # rows already counted per input key
        self._order: list[str] = []                # input keys, first-seen order
        self._width: dict[str, int] = {}
        self._group_of: dict[str, str] = {}
        self._max: dict[str, np.ndarray] = {}      # per input key, (width,)
        self._count: dict[str, np.ndarray] = {}    # per input key, (width,) int64
        self._sumsq: dict[str, float] = {}         # per input key, for the typical scale (RMS)
        self._masks: dict[str, list[tuple[int, np.ndarray]]] = {}   # per input key
        self._occ: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # (feature idx, value)
        self._names_of: dict[str, list[str]] = {}  # per input key, the names that read it

    def wants(self, name: str) -> bool:
        """Whether inputs recorded under ``name`` are analysed."""
        return bool(self._select(name))

    def update(self, name: str, x: Any) -> None:
        """Add activations ``x`` (``(positions, features)`` float array; leading dims are
        flattened into positions) recorded at the input of projection ``name``."""
        if not self.wants(name):
            return
        a = np.asarray(x)
        if a.ndim < 1:
            raise ValueError(f"{name}: activations must have a feature axis, got a scalar")
        if a.ndim == 1:
            a = a[None, :]
        elif a.ndim > 2:
            a = a.reshape(-1, a.shape[-1])
        if a.dtype.kind not in "fiub":
            raise ValueError(f"{name}: activations must be numeric, got dtype {a.dtype}")
        n, d = a.shape
        key = input_key(name)
        if name not in self._names_of.setdefault(key, []):
            self._names_of[key].append(name)
        start = self._cursor.get(name, 0)
        self._cursor[name] = start + n
        if key in self._width and self._width[key] != d:
            raise ValueError(f"{name}: width {d} differs from {self._width[key]} seen before for input {key}")
        if self._done.get(key, 0) >= start + n:
            return  # a sibling projection (q/k/v, up/gate) already delivered these rows
        if self._done.get(key, 0) != start:
            raise ValueError(f"{name}: rows {start}..{start + n} do not continue input {key} "
                             f"(counted up to row {self._done.get(key, 0)})")
        mag = np.abs(a.astype(np.float64, copy=False))
        if not np.isfinite(mag).all():
            raise ValueError(f"{name}: activations contain NaN or inf")
        if key not in self._width:
            self._order.append(key)
            self._width[key] = d
            self._group_of[key] = self._group(name)
            self._max[key] = np.zeros(d, np.float64)
            self._count[key] = np.zeros(d, np.int64)
            self._sumsq[key] = 0.0
            self._masks[key] = []
            self._occ[key] = []
        self._done[key] = start + n
        if n == 0:
            return
        np.maximum(self._max[key], mag.max(axis=0), out=self._max[key])
        self._sumsq[key] += float(np.einsum("ij,ij->", mag, mag))
        hit = mag >= np.float64(self.threshold)
        self._count[key] += hit.sum(axis=0)
        self._masks[key].append((start, hit))
        rows, cols = np.nonzero(hit)
        if rows.size:
            self._occ[key].append((cols.astype(np.int64), a[rows, cols].astype(np.float64)))

    def result(
        self,
        min_layer_share: float = DEFAULT_MIN_LAYER_SHARE,
        min_position_share: float = DEFAULT_MIN_POSITION_SHARE,
        position_aggregation: str = "any",
    ) -> OutlierAnalysis:
        """Apply the layer and position criteria to everything seen so far."""
        fl = _as_fraction(min_layer_share, "min_layer_share")
        fp = _as_fraction(min_position_share, "min_position_share")
        if position_aggregation not in ("any", "max", "mean"):
            raise ValueError(f"position_aggregation must be 'any', 'max' or 'mean', got {position_aggregation!r}")
        if not self._order:
            raise ValueError("no activations to analyse (nothing recorded, or every name filtered out)")
        width = Counter(self._width[k] for k in self._order).most_common()
        # Most common width; on a tie the width of the earliest input wins (deterministic).
        top = max(c for _, c in width)
        cands = {w for w, c in width if c == top}
        d = next(self._width[k] for k in self._order if self._width[k] in cands)
        used = [k for k in self._order if self._width[k] == d]
        skipped = [k for k in self._order if self._width[k] != d]
        n_pos = {self._done[k] for k in used}
        if len(n_pos) != 1:
            raise ValueError(f"inputs cover different numbers of positions: {sorted(n_pos)}; "
                             "all layers must see the same token stream")
        N = n_pos.pop()
        groups: list[str] = []
        for k in used:
            g = self._group_of[k]
            if g not in groups:
                groups.append(g)
        seen = {g: i for i, g in enumerate(groups)}
        groups.sort(key=lambda g: _sort_key(g, seen[g]))
        gi = {g: i for i, g in enumerate(groups)}
        G = len(groups)

        masks = np.zeros((G, N, d), dtype=bool)
        max_abs = np.zeros((G, d), np.float64)
        for k in used:
            i = gi[self._group_of[k]]
            for start, m in self._masks[k]:
                masks[i, start:start + m.shape[0]] |= m
            np.maximum(max_abs[i], self._max[k], out=max_abs[i])
        per_layer_count = masks.sum(axis=1).astype(np.int64)          # (G, d)
        share_above = per_layer_count / N if N else np.zeros((G, d))
        layer_hits = per_layer_count > 0
        n_layers_hit = layer_hits.sum(axis=0).astype(np.int64)         # (d,)

        any_mask = masks.any(axis=0)                                   # (N, d)
        if position_aggregation == "any":
            pos_count = any_mask.sum(axis=0).astype(np.int64)
            denom = N
        elif position_aggregation == "max":
            pos_count = per_layer_count.max(axis=0) if G else np.zeros(d, np.int64)
            denom = N
        else:
            pos_count = per_layer_count.sum(axis=0)
            denom = N * G
        # Exact rational comparisons: count / total >= p/q  <=>  count * q >= p * total.
        layer_ok = n_layers_hit * fl.denominator >= fl.numerator * G
        pos_ok = pos_count * fp.denominator >= fp.numerator * denom
        is_outlier = layer_ok & pos_ok & (n_layers_hit > 0)
        feats = tuple(int(f) for f in np.flatnonzero(is_outlier))

        # Occurrence values of outlier features, per feature.
        vals: dict[int, list[np.ndarray]] = {f: [] for f in feats}
        if feats:
            for k in used:
                for cols, v in self._occ[k]:
                    sel = is_outlier[cols]
                    if sel.any():
                        c, x = cols[sel], v[sel]
                        order = np.argsort(c, kind="stable")
                        c, x = c[order], x[order]
                        uniq, starts = np.unique(c, return_index=True)
                        for f, part in zip(uniq, np.split(x, starts[1:])):
                            vals[int(f)].append(part)
        details = []
        for f in feats:
            v = np.concatenate(vals[f]) if vals[f] else np.zeros(0)
            m = np.abs(v)
            q = tuple(float(x) for x in np.quantile(v, [0.25, 0.5, 0.75])) if v.size else (np.nan,) * 3
            details.append(OutlierFeature(
                index=f,
                n_layers=int(n_layers_hit[f]),
                layer_share=float(n_layers_hit[f] / G),
                n_positions=int(pos_count[f]),
                position_share=float(pos_count[f] / denom) if denom else 0.0,
                n_occurrences=int(v.size),
                max_magnitude=float(m.max()) if v.size else float("nan"),
                median_magnitude=float(np.median(m)) if v.size else float("nan"),
                quartiles=q,
                one_sided=bool(v.size and (np.all(v > 0) or np.all(v < 0))),
                layers=tuple(groups[i] for i in np.flatnonzero(layer_hits[:, f])),
            ))
        if feats:
            all_m = np.abs(np.concatenate([np.concatenate(vals[f]) for f in feats]))
            med, mx = float(np.median(all_m)), float(all_m.max())
            aff_layers = layer_hits[:, list(feats)].any(axis=1)
            aff_pos = any_mask[:, list(feats)].any(axis=1)
            top_f = min(details, key=lambda o: (-o.n_layers, -o.n_positions, -o.n_occurrences, o.index))
        else:
            med = mx = float("nan")
            aff_layers = np.zeros(G, bool)
            aff_pos = np.zeros(N, bool)
            top_f = None
        summary = OutlierSummary(
            threshold=self.threshold,
            min_layer_share=float(min_layer_share),
            min_position_share=float(min_position_share),
            position_aggregation=position_aggregation,
            group_by=self.group_by,
            n_layers=G,
            n_positions=N,
            n_features=d,
            n_outlier_features=len(feats),
            features=feats,
            layers_affected=tuple(groups[i] for i in np.flatnonzero(aff_layers)),
            layer_share=float(aff_layers.sum() / G) if G else 0.0,
            n_positions_affected=int(aff_pos.sum()),
            position_share=float(aff_pos.sum() / N) if N else 0.0,
            median_magnitude=med,
            max_magnitude=mx,
            n_one_sided=sum(o.one_sided for o in details),
            top_feature=top_f,
            outlier_features=tuple(details),
        )
        input_share = {k: (self._count[k] / self._done[k] if self._done[k] else
                           np.zeros(self._width[k])) for k in self._order}
        return OutlierAnalysis(
            layers=groups,
            max_abs=max_abs,
            share_above=share_above,
            layer_hits=layer_hits,
            position_count=pos_count,
            is_outlier=is_outlier,
            input_max_abs={k: self._max[k].copy() for k in self._order},
            input_share_above=input_share,
            skipped_inputs=skipped,
            summary=summary,
            input_rms={k: (float(np.sqrt(self._sumsq[k] / (self._done[k] * self._width[k])))
                           if self._done[k] and self._width[k] else 0.0) for k in self._order},
            input_hit_count={k: self._count[k].copy() for k in self._order},
            input_positions={k: int(self._done[k]) for k in self._order},
            input_names={k: list(v) for k, v in self._names_of.items()},
            _base_rate=(float(sum(int(self._count[k].sum()) for k in used)
                              / sum(self._done[k] * self._width[k] for k in used))
                        if N and d else float("nan")),
        )


def analyze_activations(
    activations: Mapping[str, Any],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_layer_share: float = DEFAULT_MIN_LAYER_SHARE,
    min_position_share: float = DEFAULT_MIN_POSITION_SHARE,
    position_aggregation: str = "any",
    group_by: str | Callable[[str], str] = "block",
    names: Iterable[str] | Callable[[str], bool] | None = None,
) -> OutlierAnalysis:
    """Find outlier features in recorded projection inputs.

    Parameters
    ----------
    activations:
        ``name -> array`` of shape ``(positions, features)`` (any float dtype; leading axes
        beyond two are flattened into positions), or ``name -> iterable of such arrays``
        (chunks in position order). Every analysed name must cover the same positions (one
        token stream). Names like ``"layers.{i}.attn.q"`` enable block grouping and the
        de-duplication of shared inputs (see the module docstring).
    threshold:
        Magnitude bound; a value counts when ``|x| >= threshold``.
    min_layer_share, min_position_share:
        Fractions in [0, 1]; a feature is an outlier when it reaches the threshold in
        ``>= min_layer_share`` of the layers and ``>= min_position_share`` of the positions.
    position_aggregation:
        ``"any"`` (default), ``"max"`` or ``"mean"``; see the module docstring.
    group_by:
        ``"block"`` (default), ``"input"``, ``"name"`` or a callable ``name -> layer key``.
    names:
        Names to analyse (an iterable, or a predicate); default all but the FFN contraction
        input.

    Returns
    -------
    OutlierAnalysis
        Per-layer arrays and the :class:`OutlierSummary` (``.summary``).

    Raises
    ------
    ValueError
        On NaN/inf input, inconsistent widths or position counts, bad parameters, or when
        nothing is left to analyse.
    """
    acc = OutlierAccumulator(threshold, group_by=group_by, names=names)
    for name, value in activations.items():
        if isinstance(value, np.ndarray) or hasattr(value, "__array__") or not isinstance(value, Iterable):
            acc.update(name, value)
        else:
            for chunk in value:
                acc.update(name, chunk)
    return acc.result(min_layer_share, min_position_share, position_aggregation)
