"""Power-of-two weights (DeepShift-PS, DenseShift) as pure array functions.

W (N, K) ≈ s · U with s one scale per output row and U signed powers of two: U = ±2^(−e), e ∈ [0, e_max], plus 0
when ``zero``. Rounding happens in the log domain, e = round(−log2 |W / s|) (the threshold between two levels is
their geometric mean, as DeepShift-PS rounds its shift parameters), clipped to the code range; with ``zero`` a
magnitude below half the smallest level becomes 0. The scale s is the per-row choice among max|W|·2^(t/8),
t = −4 … 15, with the least squared weight error. With a Hessian the rows' scales stay fixed and the columns are
rounded by the GPTQ loop, which spreads each column's rounding error over the columns not yet rounded.
"""

from __future__ import annotations

import numpy as np

from bitfold.quant.gptq import gptq_loop

_SCALE_STEPS = 2.0 ** (np.arange(-4, 16) / -8.0)


def exponent_range(bits: int, zero: bool) -> int:
    """The largest exponent e_max of a non-zero level for b-bit codes (one code goes to 0 when ``zero``)."""
    top = (1 << (bits - 1)) - 1
    return top - 1 if zero else top


def pow2_round(u: np.ndarray, bits: int, zero: bool) -> np.ndarray:
    """Round u to the nearest (in log2) of ±2^0 … ±2^(−e_max), or 0 below half the smallest level."""
    e_max = exponent_range(bits, zero)
    a = np.abs(u)
    with np.errstate(divide="ignore"):
        e = np.clip(np.round(-np.log2(a)), 0, e_max)
    mag = 2.0**-e
    if zero:
        mag = np.where(a < 2.0 ** (-e_max - 1), 0.0, mag)
    return np.where(u < 0, -mag, mag)


def row_scales(W: np.ndarray, bits: int, zero: bool) -> np.ndarray:
    """Per-row scale s minimizing ||W − s · pow2_round(W / s)||² over a grid around max|W| (N,)."""
    top = np.abs(W).max(axis=1)
    top = np.where(top > 0, top, 1.0)
    candidates = top[:, None] * _SCALE_STEPS[None, :]  # (N, T)
    errors = [((W - c[:, None] * pow2_round(W / c[:, None], bits, zero)) ** 2).sum(axis=1) for c in candidates.T]
    return candidates[np.arange(len(W)), np.argmin(np.stack(errors, axis=1), axis=1)]


class ShiftGrid:
    """Fixed per-row scales; ``round`` records the unit weights of every column."""

    def __init__(self, scale: np.ndarray, k: int, bits: int, zero: bool) -> None:
        self.s, self.bits, self.zero = scale, bits, zero
        self.U = np.zeros((len(scale), k))

    def round(self, w: np.ndarray, col: int) -> np.ndarray:
        self.U[:, col] = pow2_round(w / self.s, self.bits, self.zero)
        return self.s * self.U[:, col]


def shift(W: np.ndarray, H: np.ndarray | None, bits: int, zero: bool, **gptq: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantize W (N, K) to s · U; returns U (N, K) signed powers of two (or 0) and s (N,).

    Without H every weight is rounded on its own; with H (K, K) columns are rounded by the GPTQ loop."""
    W = np.asarray(W, np.float64)
    s = row_scales(W, bits, zero)
    if H is None:
        return pow2_round(W / s[:, None], bits, zero), s
    grid = ShiftGrid(s, W.shape[1], bits, zero)
    gptq_loop(W, H, grid, **gptq)
    return grid.U, s
