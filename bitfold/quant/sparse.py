"""Sparsity patterns and pruning solvers (magnitude, Wanda, SparseGPT) as pure array functions.

Weights are (N outputs, K inputs); a mask is True where a weight is kept. Patterns are types:

- ``Unstructured(ratio)``: that fraction of the weights is zero (per row for Wanda, per layer otherwise);
- ``NM(n, m)``: at most n non-zeros in every group of m consecutive inputs of a row (2:4 for sparse tensor cores);
- ``Block(rows, cols, ratio)``: whole rows×cols tiles are zero, that fraction of the tiles.

Counts are exact: ``round(ratio · size)`` weights (or tiles) go, never more or fewer.

Scores: magnitude |W|; Wanda |W_ij| · ‖X_j‖₂ (‖X_j‖² = H_jj from calibration), compared within each output row.
SparseGPT (Frantar & Alistarh, 2023) runs the GPTQ loop (``bitfold.quant.gptq.gptq_loop``) with a pruning grid:
at every column block it picks the mask by the OBS saliency w² / U_jj² (U the upper Cholesky factor of H⁻¹) on
the current, error-updated weights, zeroes the pruned weights and spreads their error over the columns not yet
visited; kept weights may be quantized in the same pass (sparse + W4).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from bitfold.quant.clip import group_params
from bitfold.quant.formats import Format, Granularity
from bitfold.quant.gptq import FormatGrid, gptq_loop


@dataclasses.dataclass(frozen=True)
class Unstructured:
    ratio: float

    def __str__(self) -> str:
        return f"unstructured:{self.ratio:g}"


@dataclasses.dataclass(frozen=True)
class NM:
    n: int
    m: int

    def __str__(self) -> str:
        return f"nm:{self.n}:{self.m}"


@dataclasses.dataclass(frozen=True)
class Block:
    rows: int
    cols: int
    ratio: float

    def __str__(self) -> str:
        return f"block:{self.rows}x{self.cols}:{self.ratio:g}"


Pattern = Unstructured | NM | Block


def parse_pattern(text: str) -> Pattern:
    """``unstructured:<ratio>``, ``nm:<N>:<M>`` or ``block:<rows>x<cols>:<ratio>``; ValueError naming the fix."""
    text = text.strip()
    if m := re.fullmatch(r"unstructured:([0-9.]+)", text):
        pattern: Pattern = Unstructured(float(m[1]))
    elif m := re.fullmatch(r"nm:(\d+):(\d+)", text):
        pattern = NM(int(m[1]), int(m[2]))
        if not 0 < pattern.n < pattern.m:
            raise ValueError(f"pattern '{text}': need 0 < N < M (e.g. nm:2:4)")
        return pattern
    elif m := re.fullmatch(r"block:(\d+)x(\d+):([0-9.]+)", text):
        pattern = Block(int(m[1]), int(m[2]), float(m[3]))
        if pattern.rows < 1 or pattern.cols < 1:
            raise ValueError(f"pattern '{text}': block sides must be >= 1")
    else:
        raise ValueError(f"pattern '{text}' is not unstructured:<ratio>, nm:<N>:<M> or block:<rows>x<cols>:<ratio>")
    if not 0.0 <= pattern.ratio < 1.0:
        raise ValueError(f"pattern '{text}': the ratio must be in [0, 1)")
    return pattern


def _drop_lowest(score: np.ndarray, count: int) -> np.ndarray:
    """Mask keeping all but the ``count`` lowest scores of a flat array (ties broken by position)."""
    keep = np.ones(score.size, bool)
    if count > 0:
        keep[np.argsort(score.ravel(), kind="stable")[:count]] = False
    return keep.reshape(score.shape)


def select(score: np.ndarray, pattern: Pattern, *, per_row: bool, drop: int | None = None) -> np.ndarray:
    """The mask (N, K) keeping the highest scores under ``pattern``. ``drop`` overrides the unstructured count."""
    n, k = score.shape
    if isinstance(pattern, NM):
        pad = -k % pattern.m
        groups = np.pad(score, ((0, 0), (0, pad)), constant_values=np.inf).reshape(n, -1, pattern.m)
        order = np.argsort(groups, axis=2, kind="stable")
        keep = np.ones_like(groups, bool)
        np.put_along_axis(keep, order[:, :, : pattern.m - pattern.n], False, axis=2)
        return keep.reshape(n, -1)[:, :k]
    if isinstance(pattern, Block):
        r, c = pattern.rows, pattern.cols
        tiles = np.pad(score, ((0, -n % r), (0, -k % c))).reshape(-(-n // r), r, -(-k // c), c).sum(axis=(1, 3))
        keep = _drop_lowest(tiles, round(pattern.ratio * tiles.size))
        return np.repeat(np.repeat(keep, r, axis=0), c, axis=1)[:n, :k]
    if per_row:
        return np.stack([_drop_lowest(row, round(pattern.ratio * k)) for row in score])
    return _drop_lowest(score, round(pattern.ratio * score.size) if drop is None else drop)


def scores(W: np.ndarray, H: np.ndarray | None, method: str) -> np.ndarray:
    """Magnitude |W| or Wanda |W| · ‖X_j‖₂ (needs H)."""
    if method == "magnitude":
        return np.abs(W)
    if H is None:
        raise ValueError(f"method '{method}' needs calibration data")
    return np.abs(W) * np.sqrt(np.maximum(np.diag(H), 0.0))[None, :]


class PruneGrid:
    """SparseGPT's grid: a mask per column group chosen by w² / U_jj², kept weights optionally quantized."""

    def __init__(self, shape: tuple[int, int], pattern: Pattern, quant: FormatGrid | None) -> None:
        self.pattern, self.quant = pattern, quant
        self.mask = np.ones(shape, bool)
        self.pruned = 0

    def fit(self, w: np.ndarray, start: int, u_diag: np.ndarray) -> None:
        score = w**2 / u_diag[None, :] ** 2
        end = start + w.shape[1]
        if isinstance(self.pattern, Unstructured):  # carry the rounding so the layer's count is exact
            drop = round(self.pattern.ratio * len(w) * end) - self.pruned
            self.mask[:, start:end] = select(score, self.pattern, per_row=False, drop=drop)
        else:
            self.mask[:, start:end] = select(score, self.pattern, per_row=False)
        self.pruned += int((~self.mask[:, start:end]).sum())

    def round(self, w: np.ndarray, col: int) -> np.ndarray:
        kept = self.quant.round(w, col) if self.quant is not None else w
        return np.where(self.mask[:, col], kept, 0.0)


def group_of(pattern: Pattern, block: int) -> int:
    """Columns per mask decision in SparseGPT: m for N:M, the tile width for blocks, ``block`` otherwise."""
    if isinstance(pattern, NM):
        return pattern.m
    if isinstance(pattern, Block):
        return pattern.cols
    return block


def sparsegpt(
    W: np.ndarray, H: np.ndarray, pattern: Pattern, *, fmt: Format | None = None, granularity: Granularity | None = None,
    block: int = 128, damp: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Prune (and optionally quantize) W (N, K) given H (K, K); returns (weights (N, K), mask (N, K)).

    Block patterns keep whole tiles of rows; SparseGPT picks the tiles of each column strip on that strip alone,
    so the tile ratio holds per strip (hence exactly per layer)."""
    W = np.asarray(W, np.float64)
    quant = None
    if fmt is not None:
        quant = FormatGrid(fmt, W.shape)
        quant.set(*group_params(W, fmt, granularity))
    grid = PruneGrid(W.shape, pattern, quant)
    q = gptq_loop(W, H, grid, group=group_of(pattern, block), block_size=max(block, group_of(pattern, block)), damp=damp)
    return q, grid.mask


class _OutlierGrid:
    """Outliers stay exact (float16); everything else rounds onto a number format's grid."""

    def __init__(self, mask: np.ndarray, quant: FormatGrid) -> None:
        self.mask, self.quant = mask, quant

    def round(self, w: np.ndarray, col: int) -> np.ndarray:
        exact = w.astype(np.float16).astype(np.float64)
        return np.where(self.mask[:, col], exact, self.quant.round(w, col))


def dense_and_sparse(
    W: np.ndarray, H: np.ndarray | None, fmt: Format, granularity: Granularity, ratio: float, **loop: float
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """SqueezeLLM's dense-and-sparse split of W (N, K): the top ``ratio`` of weights by magnitude stay float16 (a
    sparse side matrix), the rest is quantized on a grid fitted without them, so outliers no longer stretch the
    ranges; with H the columns are rounded by the GPTQ loop. Returns (weights (N, K), outlier mask (N, K), the dense
part's scale per element (N, K))."""
    W = np.asarray(W, np.float64)
    mask = ~_drop_lowest(-np.abs(W), round(ratio * W.size))
    quant = FormatGrid(fmt, W.shape)
    quant.set(*group_params(np.where(mask, 0.0, W), fmt, granularity))
    grid = _OutlierGrid(mask, quant)
    if H is None:
        return np.stack([grid.round(W[:, col], col) for col in range(W.shape[1])], axis=1), mask, quant.scale
    return gptq_loop(W, H, grid, **loop), mask, quant.scale


def refine(W: np.ndarray, keep: np.ndarray, H: np.ndarray, cycles: int) -> np.ndarray:
    """Training-free mask swaps (in the spirit of DSnoT) for unstructured masks; each row keeps its count.

    The layer's squared output error is dᵀ H d per row, d = W − W̃ the pruned part. One cycle per row revives the
    pruned weight j that lowers it most (−2 w_j g_j + w_j² H_jj, g = H d) and prunes the kept weight k that raises
    it least given that revival (2 w_k g'_k + w_k² H_kk, g' = g − w_j H_j); the swap is taken only if the sum is
    negative, so the error never grows. Rows without such a swap stop. Returns the mask.
    """
    keep = keep.copy()
    rows = np.arange(len(W))
    diag = np.diag(H)
    g = (W * ~keep) @ H  # (N, K)
    active = np.ones(len(W), bool)
    for _ in range(cycles):
        gain = np.where(~keep, -2 * W * g + W**2 * diag, np.inf)
        j = gain.argmin(axis=1)
        wj = W[rows, j]
        g_after = g - wj[:, None] * H[j]
        cost = np.where(keep, 2 * W * g_after + W**2 * diag, np.inf)
        k = cost.argmin(axis=1)
        ok = active & (gain[rows, j] + cost[rows, k] < -1e-12 * np.abs(g).max())
        if not ok.any():
            break
        r, jr, kr = rows[ok], j[ok], k[ok]
        keep[r, jr], keep[r, kr] = True, False
        g[ok] = g_after[ok] + W[r, kr][:, None] * H[kr]
        active = ok
    return keep
