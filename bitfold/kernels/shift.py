"""``bitfold.ShiftMatMul`` kernel: each product is the activation with its float exponent lowered by e (an
integer subtraction on the float's bits) and its sign flipped, then added; one scale multiply per output.

Layout: the op's b bit planes uint8[b, ceil(K/8), N] (outputs innermost) and S [N] float. For code c with sign
s = c >> (b−1) and exponent e = c & (2^(b−1) − 1), with f = (bits(x) >> 23) & 0xff the exponent field of x::

    bits(x · (−1)^s · 2^(−e)) = ((bits(x) & 0x7fffffff) − (e << 23)) | ((bits(x) ^ (s << 31)) & 0x80000000)

which is exact while f − e ≥ 1. The product follows float arithmetic everywhere else, except that it never
yields a denormal:

- f − e ≤ 0 (the product, or x itself, is below the smallest normal float 2^−126): a zero of the product's sign
  (the error is below 2^−126 per term);
- x = ±inf gives ±inf with the product's sign, x = NaN gives NaN (f = 255 is left unshifted);
- with ``zero = 1`` the top exponent code is the weight ±0: a zero of the product's sign for finite x and NaN for
  x = ±inf or NaN (as ``x · 0``).

Sums of the products (inf − inf = NaN, overflow to ±inf) and the scale multiply are ordinary float32 arithmetic.
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


def _u32(value: int):
    return tirx.const(value, "uint32")


def _shifted(value, code, bits: int, zero: int):
    """x · (−1)^s · 2^(−e) (or x · ±0) on the bits of the float32 ``value``, for the uint32 ``code``."""
    top = (1 << (bits - 1)) - 1
    exponent = code & _u32(top)
    sign = code >> _u32(bits - 1)
    raw = tirx.reinterpret("uint32", value)
    magnitude = raw & _u32(0x7FFFFFFF)
    field = (raw >> _u32(23)) & _u32(0xFF)
    special = field == _u32(0xFF)
    normal = field.astype("int32") - exponent.astype("int32") >= tirx.const(1, "int32")
    kept = tirx.Select(special, magnitude, tirx.Select(normal, magnitude - (exponent << _u32(23)), _u32(0)))
    if zero:
        kept = tirx.Select(exponent == _u32(top), tirx.Select(special, magnitude | _u32(0x00400000), _u32(0)), kept)
    signed = kept | ((raw ^ (sign << _u32(31))) & _u32(0x80000000))
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
