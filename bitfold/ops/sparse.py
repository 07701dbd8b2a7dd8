"""``bitfold.SparseMatMul``: a MatMul over N:M-sparse weights in the compressed layout of sparse tensor cores.

Schema (domain ``bitfold``, version 1)::

    Y = SparseMatMul(X, V, I, n, m)    X: float[..., K]   V: float[G·n, N]   I: uint8[b, ceil(G·n/8), N]
                                       Y: float[..., N]    G = ceil(K / m), b = bits of m − 1 (2 for m = 4)

W [K, N] keeps at most ``n`` of every ``m`` consecutive inputs k = g·m … g·m + m − 1 of an output. V holds the
kept values group by group (row g·n + s is slot s of group g) and I their positions inside the group as b-bit
codes in bit planes (``bitfold.ops.bitplanes``; for 2:4, 2-bit indices: half the values plus 2 bits per kept
weight, the layout GPU sparse tensor cores read)::

    W[g·m + I[g·n + s, n], n] = V[g·n + s, n]        (every other weight 0)

Slot indices inside a group are distinct; a group with fewer than n non-zeros stores zeros at unused positions.
The ONNX function re-materializes W densely (ScatterElements) and multiplies; a kernel skips the zeros.
"""

from __future__ import annotations

import numpy as np
from onnxscript import FLOAT, INT64, UINT8, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from bitfold.ops import bitplanes
from bitfold.ops.bitplanes import BitPlanes
from bitfold.ops.functions import DOMAIN, install

OP_TYPE = "SparseMatMul"
_bitfold = Opset(DOMAIN, 1)


def index_bits(m: int) -> int:
    return max(1, int(m - 1).bit_length())


def pack(w: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(V, I) from a dense [K, N] weight with at most n non-zeros in every group of m rows; ValueError otherwise."""
    k, cols = w.shape
    groups = np.zeros((-(-k // m) * m, cols), w.dtype)
    groups[:k] = w
    groups = groups.reshape(-1, m, cols)
    if ((groups != 0).sum(axis=1) > n).any():
        raise ValueError(f"the weight is not {n}:{m} sparse along K")
    slots = np.sort(np.argsort(groups == 0, axis=1, kind="stable")[:, :n, :], axis=1)  # non-zeros first, distinct
    values = np.take_along_axis(groups, slots, axis=1).reshape(-1, cols)
    return values, bitplanes.pack(slots.reshape(-1, cols), index_bits(m))


def unpack(values: np.ndarray, index: np.ndarray, k: int, n: int, m: int) -> np.ndarray:
    """The dense weight W [K, N]."""
    rows, cols = values.shape
    slots = bitplanes.unpack(index, rows)
    w = np.zeros((rows // n * m, cols), values.dtype)
    base = (np.arange(rows) // n * m)[:, None]
    np.put_along_axis(w, base + slots, values, axis=0)
    return w[:k]


def evaluate(x: np.ndarray, values: np.ndarray, index: np.ndarray, n: int, m: int) -> np.ndarray:
    """Numpy reference: the product with the re-materialized weight."""
    return (x.astype(np.float64) @ unpack(values, index, x.shape[-1], n, m).astype(np.float64)).astype(x.dtype)


@script(_bitfold, default_opset=op)
def SparseMatMul(X: FLOAT, V: FLOAT, I: UINT8, n: int, m: int) -> FLOAT:
    b = op.Shape(I, start=0, end=1)
    place = op.Pow(op.Constant(value_float=2.0), op.Cast(op.Range(op.Constant(value_int=0), op.Squeeze(b), op.Constant(value_int=1)), to=FLOAT.dtype))
    slot = op.ReduceSum(op.Mul(BitPlanes(I, op.Transpose(V, perm=[1, 0])), op.Unsqueeze(place, [1, 2])), op.Constant(value_ints=[0]), keepdims=0)
    rows = op.Shape(V, start=0, end=1)
    nn = op.Constant(value_int=n)
    mm = op.Constant(value_int=m)
    group = op.Div(op.Range(op.Constant(value_int=0), op.Squeeze(rows), op.Constant(value_int=1)), nn)
    target = op.Add(op.Unsqueeze(op.Mul(group, mm), [1]), op.Cast(slot, to=INT64.dtype))
    dense_rows = op.Mul(op.Div(rows, op.Reshape(nn, op.Constant(value_ints=[1]))), op.Reshape(mm, op.Constant(value_ints=[1])))
    zeros = op.ConstantOfShape(op.Concat(dense_rows, op.Shape(V, start=1), axis=0))
    w = op.ScatterElements(zeros, target, V, axis=0)
    w = op.Slice(w, op.Constant(value_ints=[0]), op.Shape(X, start=-1), op.Constant(value_ints=[0]))
    return op.MatMul(X, w)


FUNCTION = SparseMatMul.to_function_proto()


def ensure_function(model) -> None:
    """Add the op's ONNX functions and opset import to ``model`` (idempotent)."""
    install(model, [bitplanes.FUNCTION, FUNCTION])
