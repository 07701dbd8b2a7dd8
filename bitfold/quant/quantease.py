"""QuantEase (Behdin et al., 2023): cyclic coordinate descent on the layer objective, as a pure array function.

For W (N, K) and the layer input's Gram matrix H (K, K) (H = XᵀX plus ``damp`` · mean diag H on the diagonal,
the same dampening as GPTQ: a ridge that keeps Q near W along directions the calibration data does not excite),
find grid values Q minimising

    f(Q) = tr((W − Q) H (W − Q)ᵀ).

With every column but j fixed, f is, row by row, a parabola in Q_j with curvature H_jj and vertex

    u_j = Q_j + R_j / H_jj,        R = (W − Q) H,

so rounding u_j to the nearest point of column j's grid is an exact coordinate minimisation: f never increases.
A sweep visits every column once; columns go in blocks of ``block_size`` and R is updated for the block's own
columns after each step and for the others once per block (a rank-``block_size`` product), as GPTQ's lazy
updates. No matrix is inverted or factorised. Sweeps stop after ``sweeps`` or when one lowers f by less than
``tol`` of its value. The change of f is tracked exactly per step (H_jj δ² − 2 δ·R_j per row), not recomputed.

The grid (scale and zero point of every element) is fixed before the descent: by default the GPTQ solution's
(``start = "gptq"``), so the result is never worse than GPTQ's on the damped layer objective; ``start = "rtn"``
starts from round-to-nearest on the same grid. Dead inputs (diag H = 0) get weight 0, as in GPTQ.

The outlier-aware variant (``free``): weights kept in full precision beside the grid (split-outliers' float16 side
matrix) are coordinates too, whose exact minimiser is the vertex itself (rounded to float16), so the descent moves
the outliers to absorb the grid's error instead of keeping them at their original values.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from bitfold.errors import BitfoldError
from bitfold.quant.clip import Clip, group_params
from bitfold.quant.formats import Format, Granularity
from bitfold.quant.gptq import check_damp, gptq

Start = Literal["gptq", "rtn"]


def objective(W: np.ndarray, Q: np.ndarray, H: np.ndarray) -> float:
    """f(Q) = tr((W − Q) H (W − Q)ᵀ)."""
    E = np.asarray(W, np.float64) - np.asarray(Q, np.float64)
    return float(np.sum((E @ H) * E))


def coordinate_descent(
    W: np.ndarray, H: np.ndarray, Q: np.ndarray, fmt: Format, scale: np.ndarray, zero: np.ndarray, *,
    sweeps: int = 20, tol: float = 1e-4, block_size: int = 128, free: np.ndarray | None = None,
) -> tuple[np.ndarray, list[float]]:  # fmt: skip
    """Improve grid values Q (N, K) of W by cyclic coordinate descent on f with H (already damped); the grid is
    ``fmt`` with per-element ``scale`` and ``zero``. Elements marked in ``free`` (N, K) are not on the grid: they
    take their vertex rounded to float16 (the outlier-aware variant's full-precision weights). Returns (Q, f after
    each sweep, f(Q) first)."""
    W64, Q64 = np.asarray(W, np.float64), np.asarray(Q, np.float64).copy()
    k = W64.shape[1]
    diag = np.diag(H).copy()
    R = (W64 - Q64) @ H
    f = float(np.sum(R * (W64 - Q64)))
    history = [f]
    for _ in range(sweeps):
        start = f
        for b1 in range(0, k, block_size):
            b2 = min(b1 + block_size, k)
            Hb = H[b1:b2, b1:b2]
            Rb = R[:, b1:b2].copy()
            delta = np.zeros((len(W64), b2 - b1))
            for i in range(b2 - b1):
                j = b1 + i
                if diag[j] <= 0:
                    continue
                old = Q64[:, j]
                target = (old + Rb[:, i] / diag[j]).astype(np.float32)
                s, z = scale[:, j], zero[:, j]
                new = fmt.dequantize(fmt.quantize(target, s, z), s, z).astype(np.float64)
                if free is not None and free[:, j].any():
                    new = np.where(free[:, j], target.astype(np.float16), new).astype(np.float64)
                d = new - old
                if not d.any():
                    continue
                f += float(diag[j] * (d @ d) - 2.0 * (d @ Rb[:, i]))
                Rb -= np.outer(d, Hb[i])
                Q64[:, j] = new
                delta[:, i] += d
            R[:, b1:b2] = Rb
            if b1 > 0:
                R[:, :b1] -= delta @ H[b1:b2, :b1]
            if b2 < k:
                R[:, b2:] -= delta @ H[b1:b2, b2:]
        history.append(f)
        if start - f <= tol * abs(start):
            break
    return Q64.astype(np.float32), history


def quantease(
    W: np.ndarray, H: np.ndarray, fmt: Format, granularity: Granularity, *, sweeps: int = 20, tol: float = 1e-4,
    start: Start = "gptq", damp: float = 0.01, block_size: int = 128, act_order: bool = False, clip: Clip = "none",
    notes: list[str] | None = None, history: list[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Quantize W (N, K) given H (K, K). Returns (Q dequantized (N, K), scale (N, K), zero (N, K)), like
    :func:`bitfold.quant.gptq.gptq`; ``act_order``, ``clip`` and ``notes`` shape the GPTQ start. ``history``
    receives f at the start and after each sweep."""
    check_damp(damp)
    if sweeps < 0:
        raise ValueError("sweeps must be >= 0")
    H = np.asarray(H, np.float64)
    if not np.isfinite(H).all():
        raise BitfoldError(
            "the layer's Hessian (the Gram matrix of its calibration inputs) has inf or NaN entries; "
            "use calibration data whose activations stay finite at this layer."
        )
    W = np.asarray(W, np.float32).copy()
    dead = np.diag(H) == 0
    W[:, dead] = 0.0
    if start == "gptq":
        Q, scale, zero = gptq(W, H, fmt, granularity, block_size=block_size, damp=damp, act_order=act_order, clip=clip, notes=notes)
    elif start == "rtn":
        scale, zero = group_params(W, fmt, granularity, clip, H)
        Q = fmt.dequantize(fmt.quantize(W, scale, zero), scale, zero)
    else:
        raise ValueError("start must be 'gptq' or 'rtn'")
    Hd = H + np.eye(len(H)) * damp * np.mean(np.abs(np.diag(H)))
    Hd[dead, dead] = 0.0  # a dead column keeps weight 0: its coordinate is skipped
    Q, trace = coordinate_descent(W, Hd, Q, fmt, scale, zero, sweeps=sweeps, tol=tol, block_size=block_size)
    if history is not None:
        history.extend(trace)
    return Q, scale, zero
