"""GPTQ (Frantar et al., 2022) as a pure array function in the paper's symbols.

Minimises ||W X - Q X||² row by row, quantizing one column of W (N, K) at a time and spreading its rounding error
over the not-yet-quantized columns with the inverse Hessian H⁻¹ of the layer input (H = 2 XᵀX, the factor 2
cancels). The inverse is used through its upper Cholesky factor U (H⁻¹ = UᵀU), whose rows give every column's
update; columns are processed in blocks of ``block_size`` with the updates to later blocks applied lazily, once
per block. ``damp`` adds damp · mean(diag H) to the diagonal. With ``act_order`` columns are visited by
decreasing diag(H); scale groups then keep their original column membership, with parameters fixed from the
unquantized weights ("static groups"). Dead inputs (diag H = 0) get weight 0.

The quantization grid is an argument: any :class:`~bitfold.quant.formats.Format` with a granularity.
"""

from __future__ import annotations

import numpy as np
import torch

from bitfold.quant.formats import Format, Granularity, PerChannel, PerGroup, block_params, from_groups, to_groups


def _column_params(w: np.ndarray, fmt: Format, granularity: Granularity, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point for every element of w (N, K), constant within each scale group."""
    blocks = to_groups(w, granularity)
    scale, zero = block_params(blocks, fmt, clip=clip)
    return tuple(from_groups(np.broadcast_to(p, blocks.shape), w.shape).copy() for p in (scale, zero))


def gptq(
    W: np.ndarray,
    H: np.ndarray,
    fmt: Format,
    granularity: Granularity,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize W (N, K) given H (K, K). Returns (Q dequantized (N, K), scale (N, K), zero (N, K)).

    ``scale``/``zero`` are per element (constant within each scale group) so any emitter can re-derive codes.
    """
    W = torch.tensor(W, dtype=torch.float64)
    H = torch.tensor(H, dtype=torch.float64).clone()
    n, k = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += torch.eye(k, dtype=H.dtype) * damp * torch.mean(torch.diag(H))

    static = act_order or not isinstance(granularity, PerGroup)
    if static:
        scale, zero = (torch.tensor(p, dtype=torch.float64) for p in _column_params(W.numpy(), fmt, granularity, clip))
    else:
        scale, zero = torch.zeros_like(W), torch.zeros_like(W)
        block_size = max(block_size // granularity.size, 1) * granularity.size  # a group never spans two blocks
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H, scale, zero = W[:, perm], H[perm][:, perm], scale[:, perm], zero[:, perm]

    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if not static and col % granularity.size == 0:
                end = min(col + granularity.size, k)
                s, z = _column_params(W1[:, i : i + end - col].numpy(), fmt, PerChannel(), clip)
                scale[:, col:end], zero[:, col:end] = torch.tensor(s), torch.tensor(z)
            w = W1[:, i]
            q = _round(w, scale[:, col], zero[:, col], fmt)
            Q[:, col] = q
            e = (w - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return (
        Q[:, inverse].float().numpy(),
        scale[:, inverse].float().numpy(),
        zero[:, inverse].float().numpy(),
    )


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: Format) -> torch.Tensor:
    x, s, z = w.float().numpy(), scale.float().numpy(), zero.float().numpy()
    return torch.tensor(fmt.dequantize(fmt.quantize(x, s, z), s, z), dtype=torch.float64)
