"""Kernels for ``bitfold.CSRMatMul`` (unstructured sparsity), ``bitfold.BlockCSRMatMul`` (block sparsity) and
``bitfold.DenseSparseMatMul`` (low-bit dense plus sparse outliers), all over ELL layouts.

CSR rows become ELL (``common.ell``): values float32[L, N] and input indices int32[L, N], L the longest output
row, shorter rows padded with zeros, outputs innermost so a vector of outputs loads its values together::

    Y[m, n] = Σ_{t<L} V[t, n] · x[m, C[t, n]]                            (a gather per stored value)

Block CSR becomes block-ELL: per block row of r outputs its L stored c-wide tiles, values float32[L, c, N] and the
tiles' block columns int32[L, ceil(N/r)]; within a tile the c inputs are contiguous::

    part[m, t, n] = Σ_{j<c} V[t, j, n] · x[m, C[t, n // r] · c + j]
    Y[m, n]       = Σ_t part[m, t, n]

ELL pads to the longest row: the bytes read are L · N values (reported by ``Prepared.nbytes``), which equals the
stored count when the pattern keeps the same number per output (Wanda, SparseGPT and the block pattern do).
DenseSparseMatMul runs the MatMulNBits kernel on its int4/int8 codes (re-laid out, zero point 2^(bits−1) after
an offset) and adds the outliers' ELL product.
"""

from __future__ import annotations

import numpy as np
from tvm import te

from bitfold.kernels import Prepared, kernel, nbits
from bitfold.kernels.common import csr_rows, ell, ell_product, padded

DOMAIN = "bitfold"


def prepare_csr(weights, attrs) -> Prepared:
    _, values, cols, pointers = weights
    rows, indices = csr_rows(values.astype(np.float32), cols, pointers)
    return Prepared(ell(rows, indices, len(pointers) - 1), {}, int(attrs["K"]), len(pointers) - 1)


def compute_csr(x: te.Tensor, arrays) -> te.Tensor:
    values, index = arrays
    return ell_product(lambda m, k: x[m, k], int(x.shape[0]), values, index, name="gemv")


def prepare_block(weights, attrs) -> Prepared:
    _, values, cols, pointers = weights
    n, k = int(attrs["n"]), int(attrs["K"])
    _, r, c = values.shape
    counts = np.diff(pointers)
    length = max(int(counts.max(initial=0)), 1)
    block_rows = len(pointers) - 1
    packed = np.zeros((length, c, block_rows * r), np.float32)
    columns = np.zeros((length, block_rows), np.int32)
    for b in range(block_rows):
        for slot, t in enumerate(range(pointers[b], pointers[b + 1])):
            packed[slot, :, b * r : (b + 1) * r] = values[t].T
            columns[slot, b] = cols[t]
    return Prepared((np.ascontiguousarray(packed[:, :, :n]), columns), {"rows": r}, k, n)


def compute_block(x: te.Tensor, arrays, rows: int) -> te.Tensor:
    values, columns = arrays
    length, width, n = (int(d) for d in values.shape)
    k = int(x.shape[1])
    xp = padded(x, k + width)
    j = te.reduce_axis((0, width), "j")
    part = te.compute(
        (x.shape[0], length, n),
        lambda m, t, o: te.sum(values[t, j, o] * xp(m, columns[t, o // rows] * width + j), axis=j),
        name="part",
    )  # fmt: skip
    t = te.reduce_axis((0, length), "t")
    return te.compute((x.shape[0], n), lambda m, o: te.sum(part[m, t, o], axis=t), name="gemv")


def prepare_dense_sparse(weights, attrs) -> Prepared:
    _, q, s, values, cols, pointers = weights
    block_size, k = int(attrs["block_size"]), int(attrs["K"])
    bits = 4 if q.dtype != np.int8 or int(attrs.get("storage_bits", 8)) == 4 else 8
    offset = 1 << (bits - 1)
    blocks = s.shape[0]
    codes = np.full((blocks * block_size, q.shape[1]), offset, np.int16)
    codes[:k] = np.asarray(q).astype(np.int16) + offset
    scale = s.astype(np.float32).T
    dense = nbits.layout(codes.T, scale, np.full(scale.shape, offset), bits, block_size, k)
    rows, indices = csr_rows(values.astype(np.float32), cols, pointers)
    return Prepared((*dense.arrays, *ell(rows, indices, q.shape[1])), dense.params, k, q.shape[1])


def compute_dense_sparse(x: te.Tensor, arrays, **params) -> te.Tensor:
    dense = nbits.compute(x, arrays[:-2], **params)
    outliers = ell_product(lambda m, k: x[m, k], int(x.shape[0]), arrays[-2], arrays[-1])
    return te.compute(dense.shape, lambda m, n: dense[m, n] + outliers[m, n], name="out")


CSR = kernel(DOMAIN, "CSRMatMul", (1, 2, 3), prepare_csr, compute_csr)
BLOCK_CSR = kernel(DOMAIN, "BlockCSRMatMul", (1, 2, 3), prepare_block, compute_block)
DENSE_SPARSE = kernel(DOMAIN, "DenseSparseMatMul", (1, 2, 3, 4, 5), prepare_dense_sparse, compute_dense_sparse)
