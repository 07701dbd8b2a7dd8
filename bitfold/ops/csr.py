"""``bitfold.CSRMatMul``: a MatMul over an unstructured-sparse weight in compressed sparse rows (per output).

Schema (domain ``bitfold``, version 1)::

    Y = CSRMatMul(X, V, C, R)     X: float[..., K]   V: float[nnz]   C: int32[nnz]   R: int32[N + 1]
                                  Y: float[..., N]

Rows are outputs: the non-zeros of output n are V[R[n] : R[n+1]] at inputs C[R[n] : R[n+1]] (ascending)::

    W[C[i], n] = V[i]   for R[n] <= i < R[n + 1]        (every other weight 0)

so a kernel computes y[n] = Σ_i V[i] · x[C[i]] over the row's range, touching only the non-zeros. The ONNX function
re-materializes W densely (helper functions ``bitfold.CSRDense``, shared with ``DenseSparseMatMul``, and
``bitfold.RowIds``, shared with ``BlockCSRMatMul``): each entry's row comes from a cumulative count of the row
starts (ScatterElements with add, so empty rows cost nothing) and ScatterND places the values. Cost: nnz · (32 + 32) + 32 · (N + 1) bits.
"""

from __future__ import annotations

import numpy as np
from onnxscript import FLOAT, INT32, INT64, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from bitfold.ops.functions import DOMAIN, install

OP_TYPE = "CSRMatMul"
_bitfold = Opset(DOMAIN, 1)


def pack(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(V, C, R) of a dense [K, N] weight."""
    rows = np.asarray(w).T  # [N, K]
    n_idx, k_idx = np.nonzero(rows)
    counts = np.bincount(n_idx, minlength=rows.shape[0])
    pointers = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return rows[n_idx, k_idx], k_idx.astype(np.int32), pointers


def unpack(values: np.ndarray, cols: np.ndarray, pointers: np.ndarray, k: int) -> np.ndarray:
    """The dense weight W [K, N]."""
    n = len(pointers) - 1
    rows = np.repeat(np.arange(n), np.diff(pointers))
    w = np.zeros((k, n), values.dtype)
    w[cols, rows] = values
    return w


def evaluate(x: np.ndarray, values: np.ndarray, cols: np.ndarray, pointers: np.ndarray) -> np.ndarray:
    """Numpy reference: per output, the sum of its values times the inputs they sit on."""
    w = unpack(values, cols, pointers, x.shape[-1])
    return (x.astype(np.float64) @ w.astype(np.float64)).astype(x.dtype)


@script(_bitfold, default_opset=op)
def RowIds(R: INT32, V: FLOAT) -> INT64:
    nnz = op.Shape(V, start=0, end=1)
    n = op.Sub(op.Shape(R), op.Constant(value_ints=[1]))
    starts = op.Cast(op.Slice(R, op.Constant(value_ints=[1]), n, op.Constant(value_ints=[0])), to=INT64.dtype)
    marks = op.ScatterElements(
        op.Cast(op.ConstantOfShape(op.Add(nnz, op.Constant(value_ints=[1]))), to=INT64.dtype),
        starts,
        op.Expand(op.Constant(value_ints=[1]), op.Shape(starts)),
        axis=0,
        reduction="add",
    )
    return op.CumSum(op.Slice(marks, op.Constant(value_ints=[0]), nnz, op.Constant(value_ints=[0])), op.Constant(value_int=0))


@script(_bitfold, default_opset=op)
def CSRDense(V: FLOAT, C: INT32, R: INT32, X: FLOAT) -> FLOAT:
    n = op.Sub(op.Shape(R), op.Constant(value_ints=[1]))
    index = op.Concat(op.Unsqueeze(RowIds(R, V), [1]), op.Unsqueeze(op.Cast(C, to=INT64.dtype), [1]), axis=1)
    dense = op.ScatterND(op.ConstantOfShape(op.Concat(n, op.Shape(X, start=-1), axis=0)), index, V)
    return op.Transpose(dense, perm=[1, 0])


@script(_bitfold, default_opset=op)
def CSRMatMul(X: FLOAT, V: FLOAT, C: INT32, R: INT32) -> FLOAT:
    return op.MatMul(X, CSRDense(V, C, R, X))


ROWS_FUNCTION = RowIds.to_function_proto()
DENSE_FUNCTION = CSRDense.to_function_proto()
FUNCTION = CSRMatMul.to_function_proto()


def ensure_function(model) -> None:
    """Add the op's ONNX function and opset import to ``model`` (idempotent)."""
    install(model, [ROWS_FUNCTION, DENSE_FUNCTION, FUNCTION])
