"""``bitfold.BinaryMatMul`` kernels: sign-select-add over bit-packed weights with float activations, and
XNOR-popcount when the activations are binarized too.

Layout: P's bit planes uint8[r, ceil(K/8), N] and A as float [r, 1, N] ``lut.tiled`` (64 outputs of all planes in one
contiguous stream), M [N] ``lut.padded`` (the layout of ``lut``'s AVX-512 microkernel, which runs the
float-activation case without salient weights).
PB-LLM's salient weights become a sparse correction in ELL layout (``common.ell``): at each salient position the
correction is (its int8 code · T[n]) minus the binary value it replaces, so the dense part never branches.

Float activations (``binarize_input = 0``)::

    sel[m, i, n] = Σ_k x[m, k] · bit_i[k, n]                    (a select and an add per weight bit)
    Y[m, n]      = Σ_i A[i, n] · (2 · sel[m, i, n] − Σ_k x[m, k]) + M[n] · Σ_k x[m, k]

Binarized activations: with s = sign bits of x packed eight per byte, a = mean|x| and c the count of x ≥ 0::

    pop[m, i, n] = Σ_g popcount(s[m, g] XOR P[i, g, n])         (one XOR and byte popcount per 8 weights)
    Y[m, n]      = a · Σ_i A[i, n] · (K − 2 · pop[m, i, n]) + M[n] · a · (2c − K)

Padded inputs carry a 0 bit in both s and P, so they agree and each adds one; K − 2·pop already discounts them
because pop counts disagreements only among real inputs.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitfold.kernels import Prepared, kernel, lut
from bitfold.kernels.common import bit, ell, ell_product, padded, total
from bitfold.ops import binary, bitplanes

OP_TYPE = "BinaryMatMul"
DOMAIN = "bitfold"


def prepare(weights, attrs) -> Prepared:
    _, p, a, mean, q, v, t = weights
    k = int(attrs["K"])
    n = p.shape[2]
    params = {"binarize_input": int(attrs.get("binarize_input", 0)), "salient": int(q.shape[0] > 0), "columns": n}
    arrays = [lut.tiled(p), lut.tiled(a.astype(np.float32)[:, None, :]), lut.padded(mean.astype(np.float32))]
    if q.shape[0]:
        mask = bitplanes.planes(q, k)[0].astype(bool)  # [K, N]
        dense = binary.unpack(p, a, mean, q[:0], v[:0], t[:0], k)
        exact = binary.unpack(p, a, mean, q, v, t, k)
        rows, cols = [], []
        for out in range(n):
            ks = np.flatnonzero(mask[:, out])
            rows.append((exact[ks, out] - dense[ks, out]).astype(np.float32))
            cols.append(ks)
        arrays += list(ell(rows, cols, n))
    return Prepared(tuple(arrays), params, k, n)


def lowering(prepared: Prepared, m: int, target):
    if prepared.params["binarize_input"] or prepared.params["salient"] or not lut.available(target):
        return None
    _, chunks, planes, _ = prepared.arrays[0].shape
    return lut.plane_kernel(m, prepared.k, prepared.n, planes, 1, chunks, "float32", signs=True)


def compute(x: te.Tensor, arrays, binarize_input: int, salient: int, columns: int) -> te.Tensor:
    p, a, mean = arrays[:3]
    _, chunks, planes, _ = (int(d) for d in p.shape)
    n = columns
    rows_m, k = int(x.shape[0]), int(x.shape[1])
    i_k = te.reduce_axis((0, k), "i")
    if binarize_input:
        scale = te.compute((rows_m,), lambda m: te.sum(te.abs(x[m, i_k]) * tirx.const(1.0 / k, "float32"), axis=i_k), name="rows_mean")
        y = _xnor(x, p, a, mean, scale, n)
        xget = lambda m, i: te.if_then_else(x[m, i] >= 0, scale[m], -scale[m])
    else:
        xp = padded(x, chunks * 8)
        sums = te.compute((rows_m,), lambda m: te.sum(x[m, i_k], axis=i_k), name="rows")
        g = te.reduce_axis((0, chunks), "g")
        sel = te.compute(
            (rows_m, planes, n),
            lambda m, i, cols: te.sum(total([te.if_then_else(bit(lut.at(p, i, g, cols), j) > 0, xp(m, 8 * g + j), tirx.const(0.0, "float32")) for j in range(8)]), axis=g),
            name="gemv",
        )  # fmt: skip
        y = te.compute(
            (rows_m, n),
            lambda m, cols: total([lut.at(a, i, 0, cols) * (2.0 * sel[m, i, cols] - sums[m]) for i in range(planes)]) + mean[cols] * sums[m],
            name="out_dense",
        )  # fmt: skip
        xget = lambda m, i: x[m, i]
    if not salient:
        return y
    correction = ell_product(xget, rows_m, arrays[3], arrays[4])
    return te.compute((rows_m, n), lambda m, cols: y[m, cols] + correction[m, cols], name="out")


def _xnor(x, p, a, mean, scale, n: int):
    _, chunks, planes, _ = (int(d) for d in p.shape)
    rows_m, k = int(x.shape[0]), int(x.shape[1])
    xp = padded(x, chunks * 8)
    signs = te.compute(
        (rows_m, chunks),
        lambda m, g: total([te.if_then_else(tirx.all(8 * g + j < k, xp(m, 8 * g + j) >= 0), tirx.const(1 << j, "uint8"), tirx.const(0, "uint8")) for j in range(8)]),
        name="row_signs",
    )  # fmt: skip
    i_k = te.reduce_axis((0, k), "i")
    positive = te.compute((rows_m,), lambda m: te.sum(te.if_then_else(x[m, i_k] >= 0, 1.0, 0.0), axis=i_k), name="rows_pos")
    g = te.reduce_axis((0, chunks), "g")
    pop = te.compute(
        (rows_m, planes, n),
        lambda m, i, cols: te.sum(tirx.popcount((signs[m, g] ^ lut.at(p, i, g, cols)).astype("uint32")).astype("int32"), axis=g),
        name="gemv",
    )  # fmt: skip
    kf = tirx.const(float(k), "float32")
    return te.compute(
        (rows_m, n),
        lambda m, cols: scale[m] * (total([lut.at(a, i, 0, cols) * (kf - 2.0 * pop[m, i, cols].astype("float32")) for i in range(planes)]) + mean[cols] * (2.0 * positive[m] - kf)),
        name="out_dense",
    )  # fmt: skip


KERNEL = kernel(DOMAIN, OP_TYPE, (1, 2, 3, 4, 5, 6), prepare, compute, lowering=lowering)
