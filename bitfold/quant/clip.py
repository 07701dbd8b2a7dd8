"""Range clipping of scale groups, and output-error clipping: per group, the range shrink that minimises the layer's output error.: per scale group, the range shrink that minimises the layer's output error.

For a weight w (N, K) read by inputs X with Gram matrix H = XᵀX, rounding row n's group g (columns c_g) changes
the output by X_g δ_ng with δ_ng = Q(w_ng) - w_ng, whose energy is δ_ngᵀ H_gg δ_ng (H_gg the group's diagonal
block of H). Each (row, group) gets the shrink ratio r of its range, from a grid between 1 and ``min_ratio``,
with the least such energy, as AWQ's clipping search does with sampled activations. The weight-space MSE search
(``formats.block_params(clip=True)``) is the special case H = I; it ignores which input channels are large.

:func:`group_params` is the one entry point: ``clip`` = ``"none"`` (the full range), ``"weight"`` (weight MSE) or
``"output"`` (output error; needs H).
"""

from __future__ import annotations

import numpy as np

from typing import Literal

from bitfold.quant.formats import Format, Granularity, PerTensor, block_params, from_groups, to_groups

Clip = Literal["none", "weight", "output"]


def group_params(
    w: np.ndarray, fmt: Format, granularity: Granularity, clip: Clip = "none", H: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-element scale and zero point of (N, K) ``w``, constant within each scale group."""
    if clip == "output":
        if H is None:
            raise ValueError("output clipping needs the input Gram matrix H")
        return output_clip(w, H, fmt, granularity)
    blocks = to_groups(np.asarray(w, np.float32), granularity)
    scale, zero = block_params(blocks, fmt, clip=clip == "weight")
    return tuple(from_groups(np.broadcast_to(p, blocks.shape), w.shape) for p in (scale, zero))


def output_clip(
    w: np.ndarray, H: np.ndarray, fmt: Format, granularity: Granularity, *, min_ratio: float = 0.5, steps: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Per-element scale and zero point of (N, K) ``w`` (constant within scale groups) minimising output error."""
    if isinstance(granularity, PerTensor):
        raise ValueError("output clipping needs per-channel or per-group scales")
    n, k = w.shape
    blocks = to_groups(np.asarray(w, np.float32), granularity)  # (N, G, S)
    size = blocks.shape[2]
    h_blocks = np.zeros((blocks.shape[1], size, size))  # H's diagonal blocks, the last one zero-padded to the group size
    for g in range(blocks.shape[1]):
        part = H[g * size : (g + 1) * size, g * size : (g + 1) * size]
        h_blocks[g, : len(part), : len(part)] = part
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    best_scale, best_zero = fmt.params(lo, hi)
    best_err = np.full(lo.shape, np.inf)
    for ratio in np.linspace(1.0, min_ratio, steps):
        scale, zero = fmt.params(lo * ratio, hi * ratio)
        delta = (fmt.dequantize(fmt.quantize(blocks, scale, zero), scale, zero) - blocks).astype(np.float64)
        per_group = delta.transpose(1, 0, 2)  # (G, N, S)
        err = np.sum((per_group @ h_blocks) * per_group, axis=-1).T[..., None]
        better = err < best_err
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
        best_err = np.where(better, err, best_err)
    expand = lambda p: from_groups(np.broadcast_to(p, blocks.shape), (n, k))  # noqa: E731
    return expand(best_scale).astype(np.float32), expand(best_zero).astype(np.float32)
