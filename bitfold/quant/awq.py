"""AWQ (Lin et al., 2023) scale search as a pure array function.

For consumers W_j (K, N_j) that read the same input X (K channels), AWQ rescales input channel k by
s_k = mean|x_k|^α (normalised by sqrt(max s · min s)), i.e. computes (X / s)(diag(s) W), and quantizes diag(s) W:
salient channels (large activations) get finer effective steps. α is searched on a grid to minimise the layers'
output error, measured exactly through the input's Gram matrix H = XᵀX:

    err(α) = Σ_j tr(Δ_jᵀ H Δ_j),   Δ_j = W_j - diag(1/s) · Q(diag(s) W_j)

α = 0 is plain RTN, so the search never does worse than RTN on the calibration data. The grid is an argument.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def awq_scale(
    weights: Sequence[np.ndarray],
    H: np.ndarray,
    mean_abs: np.ndarray,
    quantize: Callable[[np.ndarray], np.ndarray],
    *,
    grid: int = 20,
) -> tuple[np.ndarray, float, float]:
    """Best per-input-channel scale s (K,) for weights [(K, N_j)], with its α and relative error vs α = 0.

    ``quantize`` maps a (K, N) weight to its dequantized grid values (the format and granularity of the caller).
    """
    x = np.maximum(mean_abs.astype(np.float64), 1e-8)
    best = (np.ones_like(x), 0.0, np.inf)
    baseline = None
    for alpha in np.linspace(0.0, 1.0, grid + 1):
        s = x**alpha
        s = s / np.sqrt(s.max() * s.min())
        err = 0.0
        for w in weights:
            delta = w.astype(np.float64) - quantize((w * s[:, None]).astype(np.float32)) / s[:, None]
            err += float(np.sum(delta * (H @ delta)))
        if baseline is None:
            baseline = err
        if err < best[2]:
            best = (s, float(alpha), err)
    return best[0].astype(np.float32), best[1], best[2] / baseline if baseline else 1.0
