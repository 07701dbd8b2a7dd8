"""``bitfold.Hadamard``: multiplication by a structured orthogonal matrix along the last axis.

Schema (domain ``bitfold``, version 1)::

    Y = Hadamard(X, B)        X: float[..., n]   B: float[m, m]   Y: float[..., n]

    n = m · p with p a power of two;  R = kron(B, H_p / √p);  Y = X · R

H_p is the Sylvester Walsh–Hadamard matrix, H_p[i, j] = (-1)^popcount(i & j). B is orthogonal (the pass that
emits the op guarantees it; ``B = [[1]]`` for a pure Walsh–Hadamard transform), so R is orthogonal and
``Hadamard(Hadamard(X, B), B)`` with R's transpose undoes it. Index i of the last axis is (a, b) = (i // p, i % p):
with X viewed as [..., m, p], Y = Bᵀ · X · H_p / √p. Nothing is packed: B is a float initializer of m² values.

Execution: the numpy reference ``evaluate`` below; the ONNX function ``FUNCTION`` (standard opset-18 ops, builds
H_p from bit parities at run time: exact and O(n·p), for runtimes without a kernel); the fast O(n log p)
Walsh–Hadamard kernel is a backend lowering.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import scipy.linalg
from onnxscript import FLOAT, INT64, UINT32, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from bitfold.ops.functions import DOMAIN, install

OP_TYPE = "Hadamard"
_bitfold = Opset(DOMAIN, 1)


def split(n: int) -> tuple[int, int]:
    """(m, p) for a size n = m · p with p the largest power of two dividing n."""
    if n <= 0:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    p = n & -n
    return n // p, p


def matrix(block: np.ndarray, p: int) -> np.ndarray:
    """The dense orthogonal R = kron(B, H_p / √p), float64."""
    return np.kron(np.asarray(block, np.float64), scipy.linalg.hadamard(p) / np.sqrt(p))


def random_block(m: int, rng: np.random.Generator) -> np.ndarray:
    """A seeded random orthogonal m×m block (QR of a Gaussian matrix, signs fixed); [[1]] for m = 1."""
    if m == 1:
        return np.ones((1, 1))
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    return q * np.sign(np.diag(r))


def evaluate(x: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Numpy reference: x · kron(B, H_p / √p) over the last axis."""
    m = block.shape[0]
    n = x.shape[-1]
    p = n // m
    if m * p != n or p & (p - 1):
        raise ValueError(f"last axis {n} is not {m} times a power of two")
    x2 = x.astype(np.float64).reshape(*x.shape[:-1], m, p)
    y2 = np.einsum("ac,...ab,bd->...cd", block.astype(np.float64), x2, scipy.linalg.hadamard(p) / np.sqrt(p))
    return y2.reshape(x.shape).astype(x.dtype)


@script(_bitfold, default_opset=op)
def Hadamard(X: FLOAT, B: FLOAT) -> FLOAT:
    shape = op.Shape(X)
    n = op.Shape(X, start=-1)
    m = op.Shape(B, start=0, end=1)
    p = op.Div(n, m)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    idx = op.Cast(op.Range(zero, op.Squeeze(p), one), to=UINT32.dtype)
    both = op.BitwiseAnd(op.Unsqueeze(idx, [1]), op.Unsqueeze(idx, [0]))
    bits = op.Cast(op.Range(zero, op.Constant(value_int=32), one), to=UINT32.dtype)
    low = op.BitwiseAnd(op.BitShift(op.Unsqueeze(both, [2]), bits, direction="RIGHT"), op.CastLike(one, idx))
    parity = op.Mod(op.ReduceSum(op.Cast(low, to=INT64.dtype), [2], keepdims=0), op.Constant(value_int=2))
    sign = op.Cast(op.Sub(one, op.Mul(parity, op.Constant(value_int=2))), to=FLOAT.dtype)
    walsh = op.Div(sign, op.Sqrt(op.Cast(p, to=FLOAT.dtype)))
    x2 = op.Reshape(X, op.Concat(op.Shape(X, end=-1), m, p, axis=0))
    y2 = op.MatMul(op.Transpose(B, perm=[1, 0]), op.MatMul(x2, walsh))
    return op.Reshape(y2, shape)


FUNCTION = Hadamard.to_function_proto()


def make_node(x: ir.Value, block: ir.Value, name: str) -> ir.Node:
    """A ``bitfold.Hadamard`` node reading ``x`` and the initializer ``block``."""
    return ir.node(OP_TYPE, [x, block], domain=DOMAIN, name=name)


def ensure_function(model: ir.Model) -> None:
    """Add the op's ONNX function and opset import to ``model`` (idempotent); raises the model to opset 18 if older."""
    install(model, [FUNCTION])
