"""``bitfold.BlockCSRMatMul``: a MatMul over a block-sparse weight in block compressed sparse rows.

Schema (domain ``bitfold``, version 1)::

    Y = BlockCSRMatMul(X, V, C, R, n)   X: float[..., K]   V: float[nb, r, c]   C: int32[nb]   R: int32[ceil(N/r) + 1]
                                        Y: float[..., N]

W is seen as (N outputs × K inputs) tiled by r × c blocks. Block row b (outputs b·r … b·r + r − 1) stores its
non-zero tiles V[R[b] : R[b+1]] at block columns C[R[b] : R[b+1]] (ascending)::

    Wᵀ[b·r + i, C[t]·c + j] = V[t, i, j]        for R[b] <= t < R[b + 1]

Tiles hanging over N or K are zero-padded. A kernel runs one small dense product per stored tile. The ONNX function
finds each tile's block row with ``bitfold.RowIds`` (shared with ``CSRMatMul``), scatters the tiles into a padded
dense weight, crops it and multiplies. Cost: 32 bits per stored weight, 32 per tile and per block row.
"""

from __future__ import annotations

import numpy as np
from onnxscript import FLOAT, INT32, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from bitfold.ops import csr
from bitfold.ops.csr import RowIds
from bitfold.ops.functions import DOMAIN, install

OP_TYPE = "BlockCSRMatMul"
_bitfold = Opset(DOMAIN, 1)


def pack(w: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(V, C, R) of a dense [K, N] weight tiled by rows × cols blocks of Wᵀ."""
    wt = np.asarray(w).T
    n, k = wt.shape
    padded = np.zeros((-(-n // rows) * rows, -(-k // cols) * cols), wt.dtype)
    padded[:n, :k] = wt
    tiles = padded.reshape(padded.shape[0] // rows, rows, -1, cols).transpose(0, 2, 1, 3)  # [NB, KB, r, c]
    nonzero = (tiles != 0).any(axis=(2, 3))
    b, c = np.nonzero(nonzero)
    pointers = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int32)
    return tiles[b, c], c.astype(np.int32), pointers


def unpack(values: np.ndarray, cols: np.ndarray, pointers: np.ndarray, k: int, n: int) -> np.ndarray:
    """The dense weight W [K, N]."""
    _, r, c = values.shape
    blocks = len(pointers) - 1
    rows = np.repeat(np.arange(blocks), np.diff(pointers))
    tiles = np.zeros((blocks, -(-k // c), r, c), values.dtype)
    tiles[rows, cols] = values
    return tiles.transpose(0, 2, 1, 3).reshape(blocks * r, -1)[:n, :k].T


def evaluate(x: np.ndarray, values: np.ndarray, cols: np.ndarray, pointers: np.ndarray, n: int) -> np.ndarray:
    """Numpy reference: the product with the re-materialized weight."""
    w = unpack(values, cols, pointers, x.shape[-1], n)
    return (x.astype(np.float64) @ w.astype(np.float64)).astype(x.dtype)


@script(_bitfold, default_opset=op)
def BlockCSRMatMul(X: FLOAT, V: FLOAT, C: INT32, R: INT32, n: int) -> FLOAT:
    r = op.Shape(V, start=1, end=2)
    c = op.Shape(V, start=2, end=3)
    blocks = op.Sub(op.Shape(R), op.Constant(value_ints=[1]))
    k = op.Shape(X, start=-1)
    kb = op.Div(op.Sub(op.Add(k, c), op.Constant(value_ints=[1])), c)
    index = op.Concat(op.Unsqueeze(RowIds(R, V), [1]), op.Unsqueeze(op.Cast(C, to=INT64.dtype), [1]), axis=1)
    tiles = op.ScatterND(op.ConstantOfShape(op.Concat(blocks, kb, r, c, axis=0)), index, V)
    padded = op.Reshape(op.Transpose(tiles, perm=[0, 2, 1, 3]), op.Concat(op.Mul(blocks, r), op.Mul(kb, c), axis=0))
    nn = op.Reshape(op.Constant(value_int=n), op.Constant(value_ints=[1]))
    wt = op.Slice(padded, op.Constant(value_ints=[0, 0]), op.Concat(nn, k, axis=0), op.Constant(value_ints=[0, 1]))
    return op.MatMul(X, op.Transpose(wt, perm=[1, 0]))


FUNCTION = BlockCSRMatMul.to_function_proto()


def ensure_function(model) -> None:
    """Add the op's ONNX functions and opset import to ``model`` (idempotent)."""
    install(model, [csr.ROWS_FUNCTION, FUNCTION])
