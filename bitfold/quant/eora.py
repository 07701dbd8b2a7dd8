"""EoRA: a low-rank compensation of a compression error, fitted in the activations' eigenspace.

For a weight error ΔW ([K, N], y = x·W convention) and the input Gram H = XᵀX = V Λ Vᵀ, the rank-r L1·L2
minimising ‖X (ΔW - L1 L2)‖_F is, with P = Λ^½ Vᵀ (eigenvalues floored at ``floor`` · max λ),

    P ΔW ≈ U_r Σ_r V_rᵀ (truncated SVD),   L1 = P⁻¹ U_r Σ_r^½,   L2 = Σ_r^½ V_rᵀ

so the branch spends its rank where the inputs have energy, not where ΔW is largest. With H = I it is the plain
truncated SVD of ΔW. An H with no energy (largest eigenvalue not above float32's smallest normal, e.g. an input
that is always zero) gives zero factors: there is nothing the branch could correct.
"""

from __future__ import annotations

import numpy as np


def eora(delta: np.ndarray, H: np.ndarray, rank: int, *, floor: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(L1 [K, r], L2 [r, N]) with X·L1·L2 the best rank-r fit of X·ΔW."""
    lam, v = np.linalg.eigh(np.asarray(H, np.float64))
    top = float(lam.max())
    if not top > np.finfo(np.float32).tiny:
        k, n = np.shape(delta)
        r = min(rank, k, n)
        return np.zeros((k, r)), np.zeros((r, n))
    lam = np.maximum(lam, floor * top)
    root = np.sqrt(lam)
    u, sigma, vt = np.linalg.svd((root[:, None] * v.T) @ np.asarray(delta, np.float64), full_matrices=False)
    r = min(rank, len(sigma))
    half = np.sqrt(sigma[:r])
    return (v / root[None, :]) @ (u[:, :r] * half), half[:, None] * vt[:r]
