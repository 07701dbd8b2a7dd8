"""``bitfold.BCQMatMul``: a MatMul over binary-coded weights, W = Σ_i α_i ⊙ B_i (ShiftAddLLM's format).

Schema (domain ``bitfold``, version 1)::

    Y = BCQMatMul(X, P, A, group_size)   X: float[..., K]   P: uint8[q, ceil(K/8), N]   A: float16[q, G, N]
                                         Y: float[..., N]    G = ceil(K / group_size), group_size a multiple of 8

P holds q binary planes (``bitfold.ops.bitplanes``): bit set means +1, clear means −1. A holds one scale per
plane, input group and output::

    W[k, n] = Σ_{i<q} A[i, k // group_size, n] · (2 · B_i[k, n] − 1)

Execution is multiplication-free apart from the scales: for every eight consecutive inputs a kernel builds the
256-entry table T[t] = Σ_j ±x[8g + j] (sign + where bit j of t is set), then each plane byte P[i, g, n] is one
lookup T[P[i, g, n]] added into output n with weight A[i, g·8 // group_size, n] (``evaluate_lut``). The scales
are stored in float16; the ``shiftadd`` pass rounds them to sums of powers of two, so the scaling is shifts too.
Cost: q bits per weight plus 16·q / group_size.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import FLOAT, FLOAT16, UINT8, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from bitfold.ops import bitplanes
from bitfold.ops.bitplanes import BitPlanes
from bitfold.ops.functions import DOMAIN, install

OP_TYPE = "BCQMatMul"
_bitfold = Opset(DOMAIN, 1)


def _check_group(group_size: int) -> None:
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}")


def pack(signs: np.ndarray, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, A) from signs [q, K, N] in {−1, +1} and scales alpha [q, G, N]."""
    signs = np.asarray(signs)
    if signs.ndim != 3 or not np.isin(signs, (-1, 1)).all():
        raise ValueError("signs must be [q, K, N] with values −1 and +1")
    bits = (signs > 0).astype(np.int64)
    codes = (bits << np.arange(len(bits))[:, None, None]).sum(axis=0)
    return bitplanes.pack(codes, len(bits)), np.asarray(alpha, np.float16)


def expand(alpha: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """Per-element scales [q, K, N] from per-group scales [q, G, N]."""
    _check_group(group_size)
    if alpha.shape[1] != -(-k // group_size):
        raise ValueError(f"{alpha.shape[1]} scale groups do not cover K = {k} with group_size {group_size}")
    return np.repeat(np.asarray(alpha, np.float64), group_size, axis=1)[:, :k]


def unpack(packed: np.ndarray, alpha: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """The dense weight W [K, N], float32."""
    signs = 2.0 * bitplanes.planes(packed, k) - 1.0
    return (signs * expand(alpha, k, group_size)).sum(axis=0).astype(np.float32)


def evaluate(x: np.ndarray, packed: np.ndarray, alpha: np.ndarray, group_size: int) -> np.ndarray:
    """Numpy reference: the dense product with the unpacked weight."""
    return (x.astype(np.float64) @ unpack(packed, alpha, x.shape[-1], group_size).astype(np.float64)).astype(x.dtype)


def evaluate_lut(x: np.ndarray, packed: np.ndarray, alpha: np.ndarray, group_size: int) -> np.ndarray:
    """The lookup-table execution a kernel performs: per eight inputs a 256-entry table of signed partial sums,
    then one lookup per plane byte, scaled per group. Equals :func:`evaluate` up to float summation order."""
    _check_group(group_size)
    k = x.shape[-1]
    chunks = packed.shape[1]
    xp = np.zeros((*x.shape[:-1], chunks * 8), np.float64)
    xp[..., :k] = x
    xp = xp.reshape(*x.shape[:-1], chunks, 8)
    signs = 2.0 * ((np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1) - 1.0  # [256, 8]
    table = xp @ signs.T  # [..., chunks, 256]
    scale = np.asarray(alpha, np.float64)[:, (np.arange(chunks) * 8) // group_size]  # [q, chunks, N]
    y = np.zeros((*x.shape[:-1], packed.shape[2]), np.float64)
    for i in range(packed.shape[0]):
        looked = np.take_along_axis(table, np.broadcast_to(packed[i].astype(np.intp), (*x.shape[:-1], *packed[i].shape)), axis=-1)
        y += (looked * scale[i]).sum(axis=-2)
    return y.astype(x.dtype)


@script(_bitfold, default_opset=op)
def BCQMatMul(X: FLOAT, P: UINT8, A: FLOAT16, group_size: int) -> FLOAT:
    signs = op.Sub(op.Mul(BitPlanes(P, X), op.Constant(value_float=2.0)), op.Constant(value_float=1.0))
    g = op.Reshape(op.Constant(value_int=group_size), op.Constant(value_ints=[1]))
    a = op.Cast(op.Unsqueeze(A, [2]), to=FLOAT.dtype)  # [q, G, 1, N]
    tiled = op.Expand(a, op.Concat(op.Shape(A, start=0, end=2), g, op.Shape(A, start=2), axis=0))
    rows = op.Mul(op.Shape(A, start=1, end=2), g)
    per_k = op.Reshape(tiled, op.Concat(op.Shape(A, start=0, end=1), rows, op.Shape(A, start=2), axis=0))
    scale = op.Slice(per_k, op.Constant(value_ints=[0]), op.Shape(X, start=-1), op.Constant(value_ints=[1]))
    w = op.ReduceSum(op.Mul(signs, scale), op.Constant(value_ints=[0]), keepdims=0)
    return op.MatMul(X, w)


FUNCTION = BCQMatMul.to_function_proto()


def ensure_function(model: ir.Model) -> None:
    """Add the op's ONNX functions and opset import to ``model`` (idempotent)."""
    install(model, [bitplanes.FUNCTION, FUNCTION])
