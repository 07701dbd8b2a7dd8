"""TE building blocks the kernels share: zero-padded activations, bit-plane reads and ELL sparse products."""

from __future__ import annotations

import numpy as np
from tvm import te, tirx


def padded(x: te.Tensor, length: int):
    """x[m, k] for k < K and 0 beyond, as a function of (m, k): inputs padded up to whole groups."""
    k = int(x.shape[1])
    if k >= length:
        return lambda m, i: x[m, i]
    return lambda m, i: te.if_then_else(i < k, x[m, tirx.min(i, k - 1)], tirx.const(0.0, "float32"))


def bit(byte, j: int):
    """Bit j of a uint8 expression, as int32 0/1 (``bitfold.ops.bitplanes``: bit j is input 8g + j)."""
    return ((byte >> tirx.const(j, "uint8")) & tirx.const(1, "uint8")).astype("int32")


def total(terms):
    result = terms[0]
    for term in terms[1:]:
        result = result + term
    return result


def ell(rows: list[np.ndarray], cols: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """ELL layout of per-output sparse rows: values float32[L, N] and input indices int32[L, N], L the longest
    row, shorter rows padded with value 0 at input 0 (so a kernel reads L values per output, outputs innermost)."""
    length = max([len(r) for r in rows] + [1])
    values = np.zeros((length, n), np.float32)
    index = np.zeros((length, n), np.int32)
    for out, (v, c) in enumerate(zip(rows, cols, strict=True)):
        values[: len(v), out] = v
        index[: len(c), out] = c
    return values, index


def csr_rows(values: np.ndarray, cols: np.ndarray, pointers: np.ndarray) -> tuple[list, list]:
    starts, ends = pointers[:-1], pointers[1:]
    return [values[s:e] for s, e in zip(starts, ends, strict=True)], [cols[s:e] for s, e in zip(starts, ends, strict=True)]


def ell_product(xget, m: int, values: te.Tensor, index: te.Tensor, name: str = "gemv_sparse") -> te.Tensor:
    """Y[m, n] = Σ_t values[t, n] · x[m, index[t, n]], with ``xget(m, k)`` reading the activations."""
    t = te.reduce_axis((0, int(values.shape[0])), "t")
    return te.compute((m, values.shape[1]), lambda r, n: te.sum(values[t, n] * xget(r, index[t, n]), axis=t), name=name)
