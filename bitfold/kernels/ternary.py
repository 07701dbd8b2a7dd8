"""``bitfold.TernaryMatMul`` kernel (BitNet b1.58): add, subtract or skip each activation, one scale per output.

Layout: the op's two bit planes uint8[2, ceil(K/8), N] as they are (outputs innermost), G [N] float::

    acc[m, n] = Σ_k nonzero[k, n] ? (negative[k, n] ? −x[m, k] : x[m, k]) : 0
    Y[m, n]   = G[n] · acc[m, n]

Eight weights per pair of byte loads, no multiplications in the loop.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitfold.kernels import Prepared, kernel
from bitfold.kernels.common import bit, padded, total

OP_TYPE = "TernaryMatMul"
DOMAIN = "bitfold"


def prepare(weights, attrs) -> Prepared:
    _, p, gamma = weights
    return Prepared((np.ascontiguousarray(p), gamma.astype(np.float32)), {}, int(attrs["K"]), p.shape[2])


def compute(x: te.Tensor, arrays) -> te.Tensor:
    p, gamma = arrays
    _, chunks, n = (int(d) for d in p.shape)
    xp = padded(x, chunks * 8)
    zero = tirx.const(0.0, "float32")
    g = te.reduce_axis((0, chunks), "g")

    def trit(m, cols, j):
        value = xp(m, 8 * g + j)
        signed = te.if_then_else(bit(p[1, g, cols], j) > 0, -value, value)
        return te.if_then_else(bit(p[0, g, cols], j) > 0, signed, zero)

    acc = te.compute((x.shape[0], n), lambda m, cols: te.sum(total([trit(m, cols, j) for j in range(8)]), axis=g), name="gemv")
    return te.compute(acc.shape, lambda m, cols: gamma[cols] * acc[m, cols], name="out")


KERNEL = kernel(DOMAIN, OP_TYPE, (1, 2), prepare, compute)
