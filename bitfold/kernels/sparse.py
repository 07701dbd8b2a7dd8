"""``bitfold.SparseMatMul`` kernel (N:M, e.g. 2:4): reads only the kept values and their b-bit slot indices.

Layout: V [G·n, N] float rows padded with zeros to a multiple of eight (so slot s's index bits sit at bit s % 8
of byte s // 8 of each index plane), I the op's index planes uint8[b, ceil(G·n/8), N]; outputs innermost::

    part[m, c, o] = Σ_{j<8} V[8c + j, o] · x[m, ((8c + j) // n) · M + idx(8c + j, o)]     (a gather per value)
    Y[m, o]       = Σ_c part[m, c, o]

Per weight kept: one float load, b index bits and one multiply-add; nothing is read for the zeros.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitfold.kernels import Prepared, kernel
from bitfold.kernels.common import bit, total

OP_TYPE = "SparseMatMul"
DOMAIN = "bitfold"


def prepare(weights, attrs) -> Prepared:
    _, values, index = weights
    chunks = index.shape[1]
    padded = np.zeros((chunks * 8, values.shape[1]), np.float32)
    padded[: values.shape[0]] = values
    return Prepared((padded, np.ascontiguousarray(index)), {"n": int(attrs["n"]), "m": int(attrs["m"])}, int(attrs["K"]), values.shape[1])


def compute(x: te.Tensor, arrays, n: int, m: int) -> te.Tensor:
    values, index = arrays
    bits, chunks, outputs = (int(d) for d in index.shape)
    k = int(x.shape[1])
    j = te.reduce_axis((0, 8), "j")

    def term(r, c, o):
        slot = 8 * c + j
        idx = total([bit(index[b, c, o] >> j.var.astype("uint8"), 0) << b for b in range(bits)])
        return values[slot, o] * x[r, tirx.min((slot // n) * m + idx, k - 1)]

    part = te.compute((x.shape[0], chunks, outputs), lambda r, c, o: te.sum(term(r, c, o), axis=j), name="part")
    c = te.reduce_axis((0, chunks), "c")
    return te.compute((x.shape[0], outputs), lambda r, o: te.sum(part[r, c, o], axis=c), name="gemv")


KERNEL = kernel(DOMAIN, OP_TYPE, (1, 2), prepare, compute)
