"""AWQ (Lin et al., 2023) scale search as a pure array function.

For consumers W_j (K, N_j) that read the same input X (K channels), AWQ rescales input channel k by s_k, i.e.
computes (X / s)(diag(s) W), and quantizes diag(s) W: salient channels (large activations) get finer effective
steps. Two families of scales are searched, each over α on a grid, normalised by sqrt(max s · min s):

    activation only       s_k = mean|x_k|^α
    activation / weight   s_k = mean|x_k|^α / w̄_k^(1-α),  w̄_k = mean over outputs of |W_kn| / max_{k' in k's group} |W_k'n|

(the second also flattens input rows whose weights are large relative to their quantization group). The scale
kept is the one minimising the layers' output error, measured exactly through the input's Gram matrix H = XᵀX:

    err(s) = Σ_j tr(Δ_jᵀ H Δ_j),   Δ_j = W_j - diag(1/s) · Q(diag(s) W_j)

α = 0 of the first family is plain RTN, so the search never does worse than RTN on the calibration data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np


class AwqScale(NamedTuple):
    scale: np.ndarray  # (K,) float32
    alpha: float
    weight_term: bool  # from the activation / weight family
    relative_error: float  # err(scale) / err(RTN)


def _relative_weight(weights: Sequence[np.ndarray], group_size: int) -> np.ndarray:
    """w̄ (K,): each input row's mean |W| relative to its quantization group's maximum, over all consumers."""
    w = np.abs(np.concatenate([np.asarray(x, np.float64) for x in weights], axis=1))
    k = w.shape[0]
    g = group_size if 0 < group_size and k % group_size == 0 else k
    grouped = w.reshape(k // g, g, -1)
    grouped = grouped / np.maximum(grouped.max(axis=1, keepdims=True), 1e-12)
    return np.maximum(grouped.reshape(k, -1).mean(axis=1), 1e-8)


def _candidates(x: np.ndarray, w: np.ndarray, grid: int) -> Iterator[tuple[np.ndarray, float, bool]]:
    for weight_term in (False, True):
        for alpha in np.linspace(0.0, 1.0, grid + 1):
            s = x**alpha / w ** (1.0 - alpha) if weight_term else x**alpha
            yield s / np.sqrt(s.max() * s.min()), float(alpha), weight_term


def awq_scale(
    weights: Sequence[np.ndarray],
    H: np.ndarray,
    mean_abs: np.ndarray,
    quantize: Callable[[np.ndarray], np.ndarray],
    *,
    grid: int = 20,
    group_size: int = 0,
) -> AwqScale:
    """Best per-input-channel scale s (K,) for weights [(K, N_j)], with its family, α and error relative to RTN.

    ``quantize`` maps a (K, N) weight to its dequantized grid values (the format and granularity of the caller);
    ``group_size`` is its group length along K (0 or -1: the whole column), used by the weight term.
    """
    x = np.maximum(mean_abs.astype(np.float64), 1e-8)
    best = (np.ones_like(x), 0.0, False, np.inf)
    baseline = None
    for s, alpha, weight_term in _candidates(x, _relative_weight(weights, group_size), grid):
        err = 0.0
        for w in weights:
            delta = w.astype(np.float64) - quantize((w * s[:, None]).astype(np.float32)) / s[:, None]
            err += float(np.sum(delta * (H @ delta)))
        if baseline is None:
            baseline = err
        if err < best[3]:
            best = (s, alpha, weight_term, err)
    return AwqScale(best[0].astype(np.float32), best[1], best[2], best[3] / baseline if baseline else 1.0)
