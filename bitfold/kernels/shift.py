"""``bitfold.ShiftMatMul`` kernel: each product is the activation with its float exponent lowered by e (an
integer subtraction on the float's bits) and its sign flipped, then added; one scale multiply per output.

Layout: the op's b bit planes uint8[b, ceil(K/8), N] (outputs innermost) and S [N] float. For code c with sign
s = c >> (b−1) and exponent e = c & (2^(b−1) − 1)::

    bits(x · (−1)^s · 2^(−e)) = ((bits(x) & 0x7fffffff) − (e << 23)) | ((bits(x) ^ (s << 31)) & 0x80000000)

exact while the exponent stays normal; a result that would fall below the smallest normal float flushes to 0
(relative error below 2^−126 of the row's largest term). With ``zero = 1`` the top exponent code is the weight 0.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitfold.kernels import Prepared, kernel
from bitfold.kernels.common import bit, padded, total

OP_TYPE = "ShiftMatMul"
DOMAIN = "bitfold"


def prepare(weights, attrs) -> Prepared:
    _, p, scale = weights
    return Prepared((np.ascontiguousarray(p), scale.astype(np.float32)), {"zero": int(attrs.get("zero", 1))}, int(attrs["K"]), p.shape[2])


def _shifted(value, code, bits: int, zero: int):
    top = (1 << (bits - 1)) - 1
    exponent = code & tirx.const(top, "uint32")
    sign = code >> tirx.const(bits - 1, "uint32")
    raw = tirx.reinterpret("uint32", value)
    magnitude = (raw & tirx.const(0x7FFFFFFF, "uint32")).astype("int32") - (exponent << tirx.const(23, "uint32")).astype("int32")
    kept = tirx.Select(magnitude > 0, magnitude, tirx.const(0, "int32")).astype("uint32")
    if zero:
        kept = tirx.Select(exponent == tirx.const(top, "uint32"), tirx.const(0, "uint32"), kept)
    signed = kept | ((raw ^ (sign << tirx.const(31, "uint32"))) & tirx.const(0x80000000, "uint32"))
    return tirx.reinterpret("float32", signed)


def compute(x: te.Tensor, arrays, zero: int) -> te.Tensor:
    p, scale = arrays
    bits, chunks, n = (int(d) for d in p.shape)
    xp = padded(x, chunks * 8)
    g = te.reduce_axis((0, chunks), "g")

    def product(m, cols, j):
        code = total([bit(p[i, g, cols], j).astype("uint32") << tirx.const(i, "uint32") for i in range(bits)])
        return _shifted(xp(m, 8 * g + j), code, bits, zero)

    acc = te.compute((x.shape[0], n), lambda m, cols: te.sum(total([product(m, cols, j) for j in range(8)]), axis=g), name="gemv")
    return te.compute(acc.shape, lambda m, cols: scale[cols] * acc[m, cols], name="out")


KERNEL = kernel(DOMAIN, OP_TYPE, (1, 2), prepare, compute)
