"""``bitfold.TernaryMatMul`` kernel (BitNet b1.58): add, subtract or skip each activation, one scale per output.

Layout: the op's two bit planes with the negative plane masked by the non-zero one (so the never-written code 2
reads as 0, as the schema says), coefficients C = (G, −2G) as float [2, 1, N] and a zero vector [N], planes and coefficients ``lut.tiled``::

    sel_i[m, n] = Σ_k x[m, k] · plane_i[k, n]          (a select and an add per weight bit)
    Y[m, n]     = G[n] · sel_nonzero − 2 · G[n] · sel_negative

Eight weights per pair of byte loads, no multiplications in the loop; on AVX-512 CPUs ``lut``'s lookup microkernel
computes both selected sums.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitfold.kernels import Prepared, kernel, lut
from bitfold.kernels.common import bit, padded, total

OP_TYPE = "TernaryMatMul"
DOMAIN = "bitfold"


def prepare(weights, attrs) -> Prepared:
    _, p, gamma = weights
    planes = np.stack([p[0], p[1] & p[0]])
    gamma = gamma.astype(np.float32)
    coefficients = np.stack([gamma, -2.0 * gamma])[:, None, :]
    n = p.shape[2]
    return Prepared((lut.tiled(planes), lut.tiled(coefficients), lut.padded(np.zeros_like(gamma))), {"columns": n}, int(attrs["K"]), n)


def lowering(prepared: Prepared, m: int, target):
    if not lut.available(target):
        return None
    return lut.plane_kernel(m, prepared.k, prepared.n, 2, 1, prepared.arrays[0].shape[1], "float32", signs=False)


def compute(x: te.Tensor, arrays, columns: int) -> te.Tensor:
    p, coefficients, _ = arrays
    chunks, n = int(p.shape[1]), columns
    xp = padded(x, chunks * 8)
    zero = tirx.const(0.0, "float32")
    g = te.reduce_axis((0, chunks), "g")
    sel = te.compute(
        (x.shape[0], 2, n),
        lambda m, i, cols: te.sum(total([te.if_then_else(bit(lut.at(p, i, g, cols), j) > 0, xp(m, 8 * g + j), zero) for j in range(8)]), axis=g),
        name="gemv",
    )  # fmt: skip
    return te.compute((x.shape[0], n), lambda m, cols: lut.at(coefficients, 0, 0, cols) * sel[m, 0, cols] + lut.at(coefficients, 1, 0, cols) * sel[m, 1, cols], name="out")


KERNEL = kernel(DOMAIN, OP_TYPE, (1, 2), prepare, compute, lowering=lowering)
