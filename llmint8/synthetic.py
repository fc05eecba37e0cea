"""Paper-like synthetic data: normal activations with a few large outlier feature columns."""
from __future__ import annotations

import numpy as np

__all__ = ["paper_like"]


def paper_like(m, k, n, outlier_fraction=0.001, magnitude=(20.0, 30.0), dtype=np.float16, seed=0):
    """Activations and a weight shaped like the paper's setting.

    x (m, k): standard normal, with ``max(1, round(outlier_fraction * k))`` feature columns
    (the same in every token, as the paper observes) scaled by a factor drawn
    uniformly from ``magnitude``. w (n, k): normal with std 1/sqrt(k).

    Returns ``(x, w, outlier_columns)``, x and w in ``dtype``, columns sorted int32.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k), dtype=np.float32)
    n_out = max(1, int(round(outlier_fraction * k))) if outlier_fraction > 0 else 0
    cols = np.sort(rng.choice(k, size=n_out, replace=False)).astype(np.int32)
    if n_out:
        x[:, cols] *= rng.uniform(magnitude[0], magnitude[1], size=n_out).astype(np.float32)
    w = (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    return x.astype(dtype), w.astype(dtype), cols
