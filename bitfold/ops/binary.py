"""``bitfold.BinaryMatMul``: a MatMul over sign weights with per-output scales (XNOR/BiViT scaling, residual
binarization as in DB-LLM/BiLLM, PB-LLM's int8 salient weights), optionally over binarized activations.

Schema (domain ``bitfold``, version 1)::

    Y = BinaryMatMul(X, P, A, M, Q, V, T, binarize_input=0)

    X: float[..., K]        P: uint8[r, ceil(K/8), N]   r = 1 (binary) or 2 (residual binary)
    A: float[r, N]          M: float[N]                 per-output scale of each plane; per-output mean
    Q: uint8[s, ceil(K/8), N]  s = 1 with salient weights, 0 without
    V: int8[nnz]            T: float[N] or float[0]     salient codes and their per-output scale
    Y: float[..., N]

P and Q are bit planes (``bitfold.ops.bitplanes``); a set bit in P means +1, a clear one −1. Q marks salient
weights; V lists their int8 codes in row-major order of the set bits of Q over [K, N] (the order ONNX ``NonZero``
returns them)::

    W[k, n] = Q[k, n] ? V[·] · T[n] : Σ_{i<r} A[i, n] · (2 · P_i[k, n] − 1) + M[n]

With ``binarize_input = 1`` the activations are binarized too, X' = mean|X| (over the last axis) · (X ≥ 0 ? 1 : −1),
so a kernel computes the product with XNOR and popcount. Cost: r bits per weight (+1 bit mask and 8 bits per
salient weight with Q) plus 32 bits per output and plane.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import BOOL, FLOAT, INT8, UINT8, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from bitfold.ops import bitplanes
from bitfold.ops.bitplanes import BitPlanes
from bitfold.ops.functions import DOMAIN, install

OP_TYPE = "BinaryMatMul"
_bitfold = Opset(DOMAIN, 1)


def pack(
    signs: np.ndarray, alpha: np.ndarray, mean: np.ndarray, salient: np.ndarray | None = None,
    codes: np.ndarray | None = None, salient_scale: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:  # fmt: skip
    """(P, A, M, Q, V, T) from signs [r, K, N] in {−1, +1}, alpha [r, N], mean [N] and optionally a salient mask
    [K, N] with int8 codes [K, N] (read where the mask is set) and their scale [N]."""
    signs = np.asarray(signs)
    if signs.ndim != 3 or not np.isin(signs, (-1, 1)).all():
        raise ValueError("signs must be [r, K, N] with values −1 and +1")
    r, k, n = signs.shape
    bits = (signs > 0).astype(np.int64)
    p = bitplanes.pack((bits << np.arange(r)[:, None, None]).sum(axis=0), r)
    if salient is None:
        q, v, t = np.zeros((0, -(-k // 8), n), np.uint8), np.zeros(0, np.int8), np.zeros(0, np.float32)
    else:
        q, v, t = bitplanes.pack(salient.astype(np.int64), 1), np.asarray(codes)[salient].astype(np.int8), salient_scale
    return p, np.asarray(alpha, np.float32), np.asarray(mean, np.float32), q, v, np.asarray(t, np.float32)


def unpack(p, a, m, q, v, t, k: int) -> np.ndarray:
    """The dense weight W [K, N], float32."""
    signs = 2.0 * bitplanes.planes(p, k) - 1.0
    w = (signs * np.asarray(a, np.float64)[:, None, :]).sum(axis=0) + m
    if q.shape[0]:
        mask = bitplanes.planes(q, k)[0].astype(bool)
        side = np.zeros_like(w)
        side[mask] = v.astype(np.float64)
        w = np.where(mask, side * t, w)
    return w.astype(np.float32)


def binarize_activations(x: np.ndarray) -> np.ndarray:
    """mean|x| over the last axis times the sign of x (0 counts as +)."""
    return np.abs(x).mean(axis=-1, keepdims=True) * np.where(x >= 0, 1.0, -1.0)


def evaluate(x, p, a, m, q, v, t, binarize_input: int = 0) -> np.ndarray:
    """Numpy reference: the dense product with the unpacked weight (on binarized activations if asked)."""
    x64 = binarize_activations(x.astype(np.float64)) if binarize_input else x.astype(np.float64)
    return (x64 @ unpack(p, a, m, q, v, t, x.shape[-1]).astype(np.float64)).astype(x.dtype)


@script(_bitfold, default_opset=op)
def BinaryMatMul(
    X: FLOAT, P: UINT8, A: FLOAT, M: FLOAT, Q: UINT8, V: INT8, T: FLOAT, binarize_input: int = 0
) -> FLOAT:
    signs = op.Sub(op.Mul(BitPlanes(P, X), op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
    dense = op.Add(op.ReduceSum(op.Mul(signs, op.Unsqueeze(A, [1])), op.Constant(value_ints=[0]), keepdims=0), M)
    mask = op.Cast(op.ReduceSum(BitPlanes(Q, X), op.Constant(value_ints=[0]), keepdims=0), to=BOOL.dtype)
    where = op.Transpose(op.NonZero(mask), perm=[1, 0])
    values = op.Mul(op.Cast(V, to=FLOAT.dtype), op.Gather(T, op.Gather(where, op.Constant(value_int=1), axis=1)))
    side = op.ScatterND(op.Mul(dense, op.Constant(value_float=0.0)), where, values)
    w = op.Where(mask, side, dense)
    sign = op.Where(op.GreaterOrEqual(X, op.Constant(value_float=0.0)), op.Constant(value_float=1.0), op.Constant(value_float=-1.0))
    binarized = op.Mul(op.ReduceMean(op.Abs(X), op.Constant(value_ints=[-1]), keepdims=1), sign)
    x = op.Where(op.Cast(op.Constant(value_int=binarize_input), to=BOOL.dtype), binarized, X)
    return op.MatMul(x, w)


FUNCTION = BinaryMatMul.to_function_proto()


def ensure_function(model: ir.Model) -> None:
    """Add the op's ONNX functions and opset import to ``model`` (idempotent)."""
    install(model, [bitplanes.FUNCTION, FUNCTION])
