"""Binary-coding quantization (BCQ) as in ShiftAddLLM, as pure array functions.

W (N, K) ≈ Σ_{i<q} α_i ⊙ B_i with B_i ∈ {−1, +1} and α_i one value per row and group of ``group`` columns.
``fit`` finds α for a block of weights by alternating least squares (Xu et al., 2018): a greedy residual start
(B_i = sign(r), α_i = mean|r|, r −= α_i B_i), then ``iters`` rounds of α = (BᵀDB)⁻¹BᵀDw per row and B = the
nearest of the 2^q level combinations Σ ±α_i. D weights each column's error by its input energy diag(H) when a
Hessian is given (ShiftAddLLM's activation-aware objective; without it, outlier columns that dominate the
output would get the same weight as idle ones). α is then rounded to a sum of ``alpha_terms`` signed powers of
two (so scaling is shifts too; 0 keeps float16). Inside the GPTQ loop every group is fitted on its current,
error-updated columns and each column is then rounded to the nearest combination of its group's α, its error
spread over the columns not yet rounded. Without a Hessian the same fit and rounding run with no compensation.
"""

from __future__ import annotations

import itertools

import numpy as np

from bitfold.quant.gptq import gptq_loop


def combinations(q: int) -> np.ndarray:
    """All 2^q sign vectors, (2^q, q)."""
    return np.array(list(itertools.product((-1.0, 1.0), repeat=q)))


def nearest(w: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For w (N, g) and alpha (N, q): the nearest level Σ ±α_i of every weight (N, g) and its signs (N, g, q)."""
    signs = combinations(alpha.shape[1])
    levels = alpha @ signs.T  # (N, 2^q)
    best = np.abs(w[:, :, None] - levels[:, None, :]).argmin(axis=2)
    return np.take_along_axis(levels, best, axis=1), signs[best]


def fit(w: np.ndarray, q: int, iters: int = 10, importance: np.ndarray | None = None) -> np.ndarray:
    """Alternating least squares for alpha (N, q) given w (N, g), each column's squared error weighted by
    ``importance`` (g,) (default 1; the GPTQ loop passes diag H, the input's energy per column). ALS starts twice,
    from the greedy residual split and from the uniform grid α = max|w| · (2^(q−1), …, 1) / (2^q − 1); each row
    keeps the better result."""
    d = np.ones(w.shape[1]) if importance is None else np.asarray(importance, np.float64)
    d = d / d.mean() if d.mean() > 0 else np.ones_like(d)
    r = np.array(w, np.float64)
    greedy = np.zeros((len(w), q))
    for i in range(q):
        greedy[:, i] = (np.abs(r) * d).mean(axis=1)
        r -= greedy[:, i : i + 1] * np.where(r >= 0, 1.0, -1.0)
    uniform = np.abs(w).max(axis=1, keepdims=True) * (2.0 ** np.arange(q - 1, -1, -1) / (2**q - 1))
    best, best_err = None, None
    for alpha in (greedy, uniform):
        for _ in range(iters):
            B = nearest(w, alpha)[1]
            gram = np.einsum("ngi,g,ngj->nij", B, d, B) + 1e-9 * np.eye(q)
            alpha = np.linalg.solve(gram, np.einsum("ngi,g,ng->ni", B, d, w)[..., None])[..., 0]
        err = (((w - nearest(w, alpha)[0]) ** 2) * d).sum(axis=1)
        if best is None:
            best, best_err = alpha, err
        else:
            better = err < best_err
            best[better], best_err[better] = alpha[better], err[better]
    return best


def pow2_sum(a: np.ndarray, terms: int) -> np.ndarray:
    """a rounded greedily to a sum of ``terms`` signed powers of two (each term rounded in log2); 0: float16."""
    if terms == 0:
        return np.asarray(a, np.float16).astype(np.float64)
    out = np.zeros_like(a, dtype=np.float64)
    for _ in range(terms):
        r = a - out
        with np.errstate(divide="ignore"):
            p = np.where(r != 0, np.sign(r) * 2.0 ** np.clip(np.round(np.log2(np.abs(r))), -24, 15), 0.0)
        out += p
    return out


class BCQGrid:
    """Per-group α fitted on the current columns; ``round`` records the signs of every column."""

    def __init__(self, shape: tuple[int, int], q: int, group: int, iters: int, alpha_terms: int, importance: np.ndarray | None) -> None:
        n, k = shape
        self.q, self.group, self.iters, self.terms, self.importance = q, group, iters, alpha_terms, importance
        self.alpha = np.zeros((q, n, -(-k // group)))
        self.signs = np.zeros((q, n, k))

    def fit(self, w: np.ndarray, start: int, u_diag: np.ndarray | None = None) -> None:
        d = None if self.importance is None else self.importance[start : start + w.shape[1]]
        self.alpha[:, :, start // self.group] = pow2_sum(fit(w, self.q, self.iters, d), self.terms).T

    def round(self, w: np.ndarray, col: int) -> np.ndarray:
        values, signs = nearest(w[:, None], self.alpha[:, :, col // self.group].T)
        self.signs[:, :, col] = signs[:, 0, :].T
        return values[:, 0]


def bcq(
    W: np.ndarray, H: np.ndarray | None, q: int, group: int, *, iters: int = 10, alpha_terms: int = 2,
    act_order: bool = False, **gptq: float,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Binary-code W (N, K); returns signs (q, N, K) in {−1, +1} and alpha (q, N, G), G = ceil(K / group).

    With ``act_order`` the GPTQ loop visits columns by decreasing diag(H) and every group's α is fitted on the
    unquantized weights first (static groups); otherwise each group is fitted on its error-updated columns."""
    W = np.asarray(W, np.float64)
    grid = BCQGrid(W.shape, q, group, iters, alpha_terms, None if H is None else np.diag(H).copy())
    static = H is None or act_order
    if static:
        for start in range(0, W.shape[1], group):
            grid.fit(W[:, start : start + group], start)
    if H is None:
        for col in range(W.shape[1]):
            grid.round(W[:, col], col)
    else:
        gptq_loop(W, H, grid, group=0 if static else group, act_order=act_order, **gptq)
    return grid.signs, grid.alpha
