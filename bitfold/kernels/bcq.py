"""``bitfold.BCQMatMul`` kernel (ShiftAddLLM): per eight activations a 256-entry table of signed partial sums,
then one table lookup per plane byte, accumulated per scale group and scaled once per group.

Layout: the op's planes uint8[q, ceil(K/8), N] (outputs innermost), scales float16 [q, G, N] as stored, and a zero
vector E [N] (the mean term of ``lut``'s microkernel, which runs this op on AVX-512 CPUs). The TE kernel::

    T[m, c, t]    = Σ_{j<8} (bit j of t ? +1 : −1) · x[m, 8c + j]                  (row stage, 256 · K/8 entries)
    part[m, i, h, n] = Σ_{c in group h} T[m, c, P[i, c, n]]                       (a gather per byte and lane)
    Y[m, n]       = Σ_{i, h} A[i, h, n] · part[m, i, h, n]

The table costs 256 additions per eight inputs per row, shared by every output and plane; the weights cost one
byte load and one lookup-add per eight weights per plane, and one multiply per group.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitfold.kernels import Prepared, kernel, lut
from bitfold.kernels.common import padded, total

OP_TYPE = "BCQMatMul"
DOMAIN = "bitfold"


def prepare(weights, attrs) -> Prepared:
    _, p, alpha = weights
    n = p.shape[2]
    arrays = (lut.tiled(p), lut.tiled(alpha.astype(np.float16)), lut.padded(np.zeros(n, np.float32)))
    return Prepared(arrays, {"group_size": int(attrs["group_size"]), "columns": n}, int(attrs["K"]), n)


def lowering(prepared: Prepared, m: int, target):
    p, alpha, _ = prepared.arrays
    if not lut.available(target):
        return None
    return lut.plane_kernel(m, prepared.k, prepared.n, p.shape[2], alpha.shape[1], prepared.params["group_size"] // 8, "float16", signs=True)


def compute(x: te.Tensor, arrays, group_size: int, columns: int) -> te.Tensor:
    p, alpha, _ = arrays
    _, chunks, planes, _ = (int(d) for d in p.shape)
    n = columns
    groups = int(alpha.shape[1])
    per_group = group_size // 8
    xp = padded(x, chunks * 8)
    rows = int(x.shape[0])

    def entry(m, c, t):
        return total([te.if_then_else(((t >> j) & 1) > 0, xp(m, 8 * c + j), -xp(m, 8 * c + j)) for j in range(8)])

    table = te.compute((rows, chunks, 256), entry, name="row_table")
    u = te.reduce_axis((0, per_group), "u")

    def lookup(m, i, h, cols):
        c = tirx.min(h * per_group + u, chunks - 1)
        inside = h * per_group + u < chunks
        return te.if_then_else(inside, table[m, c, lut.at(p, i, c, cols).astype("int32")], tirx.const(0.0, "float32"))

    part = te.compute((rows, planes, groups, n), lambda m, i, h, cols: te.sum(lookup(m, i, h, cols), axis=u), name="part")
    i = te.reduce_axis((0, planes), "i")
    h = te.reduce_axis((0, groups), "h")
    return te.compute((rows, n), lambda m, cols: te.sum(lut.at(alpha, i, h, cols).astype("float32") * part[m, i, h, cols], axis=[i, h]), name="gemv")


KERNEL = kernel(DOMAIN, OP_TYPE, (1, 2), prepare, compute, lowering=lowering)
