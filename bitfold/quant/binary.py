"""Binary and ternary weights as pure array functions: XNOR/BiViT scaling, residual binarization (DB-LLM,
BiLLM), PB-LLM's salient weights, BitNet b1.58's absmean ternary.

Binary: W (N, K) ≈ μ + Σ_{i<r} α_i ⊙ B_i per row, B_i ∈ {−1, +1}: r = 1 is XNOR-Net/BiViT scaling, α = mean|W − μ|
(the least-squares α for B = sign(W − μ)); r = 2 is residual binarization, fitted by the same alternating least
squares as BCQ with one group per row. μ is the row mean with ``center``, else 0.

PB-LLM: a fraction ρ of the weights, the most salient, is kept as int8 (one scale per row, max|salient| / 127)
and the rest binarized with α from the non-salient weights only. Salience is |W| (``magnitude``), |W| · ‖X_k‖
(``activation``, ‖X_k‖² = H_kk) or W² / [H⁻¹]²_kk (``hessian``, the weight's GPTQ error term).

Ternary (BitNet b1.58): W ≈ γ · clip(round(W / γ), −1, 1) with γ = mean|W| per tensor (or per row).

With a Hessian every grid is fixed beforehand and the columns are rounded by the GPTQ loop, which spreads each
column's rounding error over the columns not yet rounded.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from bitfold.quant import bcq
from bitfold.quant.gptq import gptq_loop

Salience = Literal["magnitude", "activation", "hessian"]


@dataclasses.dataclass
class Binary:
    """A binarized weight: signs (r, N, K), alpha (r, N), mean (N,), salient mask (N, K) with int8 codes (N, K)
    and their scale (N,) (None without salient weights), and the dequantized weight (N, K)."""

    signs: np.ndarray
    alpha: np.ndarray
    mean: np.ndarray
    salient: np.ndarray | None
    codes: np.ndarray | None
    salient_scale: np.ndarray | None
    dequantized: np.ndarray


def salient_mask(W: np.ndarray, H: np.ndarray | None, ratio: float, salience: Salience) -> np.ndarray:
    """The top ``ratio`` of W's weights by salience, (N, K) bool."""
    if salience == "magnitude":
        score = np.abs(W)
    elif H is None:
        raise ValueError(f"salience '{salience}' needs calibration data")
    elif salience == "activation":
        score = np.abs(W) * np.sqrt(np.maximum(np.diag(H), 0.0))[None, :]
    else:
        diag = np.diag(np.linalg.inv(H + np.eye(len(H)) * 0.01 * np.mean(np.diag(H))))
        score = W**2 / diag[None, :] ** 2
    count = round(ratio * W.size)
    mask = np.zeros(W.size, bool)
    if count:
        mask[np.argpartition(score.ravel(), -count)[-count:]] = True
    return mask.reshape(W.shape)


class _BinaryGrid:
    def __init__(self, alpha: np.ndarray, mean: np.ndarray, salient: np.ndarray | None, scale: np.ndarray | None, k: int):
        self.alpha, self.mean, self.salient, self.scale = alpha, mean, salient, scale
        self.signs = np.zeros((len(alpha), len(mean), k))
        self.codes = np.zeros((len(mean), k))

    def round(self, w: np.ndarray, col: int) -> np.ndarray:
        values, signs = bcq.nearest((w - self.mean)[:, None], self.alpha.T)
        self.signs[:, :, col] = signs[:, 0, :].T
        out = values[:, 0] + self.mean
        if self.salient is not None:
            self.codes[:, col] = np.clip(np.round(w / self.scale), -127, 127)
            out = np.where(self.salient[:, col], self.codes[:, col] * self.scale, out)
        return out


def binarize(
    W: np.ndarray, H: np.ndarray | None, *, planes: int = 1, center: bool = False, salient_ratio: float = 0.0,
    salience: Salience = "magnitude", gptq: bool = False, **loop: float,
) -> Binary:  # fmt: skip
    """Binarize W (N, K): one plane (α), two residual planes, optionally salient int8 weights and GPTQ rounding."""
    W = np.asarray(W, np.float64)
    mean = W.mean(axis=1) if center else np.zeros(len(W))
    centred = W - mean[:, None]
    salient = salient_mask(W, H, salient_ratio, salience) if salient_ratio > 0 else None
    if salient is not None:
        if planes != 1:
            raise ValueError("salient weights combine with one binary plane (PB-LLM)")
        rest = ~salient
        alpha = ((np.abs(centred) * rest).sum(axis=1) / np.maximum(rest.sum(axis=1), 1))[None, :]
        top = np.abs(np.where(salient, W, 0.0)).max(axis=1)
        scale = np.where(top > 0, top / 127.0, 1.0)
    else:
        alpha, scale = bcq.fit(centred, planes).T, None
    grid = _BinaryGrid(alpha, mean, salient, scale, W.shape[1])
    if gptq:
        if H is None:
            raise ValueError("GPTQ rounding needs calibration data")
        q = gptq_loop(W, H, grid, **loop)
    else:
        q = np.stack([grid.round(W[:, col], col) for col in range(W.shape[1])], axis=1)
    codes = grid.codes if salient is not None else None
    return Binary(grid.signs, alpha, mean, salient, codes, scale, q)


class _TernaryGrid:
    def __init__(self, gamma: np.ndarray, k: int) -> None:
        self.gamma = gamma
        self.trits = np.zeros((len(gamma), k))

    def round(self, w: np.ndarray, col: int) -> np.ndarray:
        self.trits[:, col] = np.clip(np.round(w / self.gamma), -1, 1)
        return self.trits[:, col] * self.gamma


def ternarize(W: np.ndarray, H: np.ndarray | None, *, per_channel: bool = False, **loop: float) -> tuple[np.ndarray, np.ndarray]:
    """BitNet b1.58 absmean ternary of W (N, K); returns trits (N, K) in {−1, 0, 1} and γ (N,).

    With H (K, K) the columns are rounded by the GPTQ loop."""
    W = np.asarray(W, np.float64)
    gamma = np.abs(W).mean(axis=1) if per_channel else np.full(len(W), np.abs(W).mean())
    gamma = np.where(gamma > 0, gamma, 1.0)
    grid = _TernaryGrid(gamma, W.shape[1])
    if H is None:
        for col in range(W.shape[1]):
            grid.round(W[:, col], col)
    else:
        gptq_loop(W, H, grid, **loop)
    return grid.trits, gamma
