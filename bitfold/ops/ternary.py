"""``bitfold.TernaryMatMul``: a MatMul over weights in {−γ, 0, +γ} (BitNet b1.58).

Schema (domain ``bitfold``, version 1)::

    Y = TernaryMatMul(X, P, G)     X: float[..., K]   P: uint8[2, ceil(K/8), N]   G: float[N]   Y: float[..., N]

P is two bit planes (``bitfold.ops.bitplanes``) of a 2-bit code: plane 0 says the weight is non-zero, plane 1
that it is negative (codes 0 → 0, 1 → +1, 3 → −1; code 2 is never written and reads as 0)::

    W[k, n] = G[n] · nonzero[k, n] · (1 − 2 · negative[k, n])

A kernel adds, subtracts or skips each activation and scales each output once. Cost: 2 bits per weight plus 32
bits per output (G repeats one value when the scale is per tensor, as in BitNet).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript import FLOAT, UINT8, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from bitfold.ops import bitplanes
from bitfold.ops.bitplanes import BitPlanes
from bitfold.ops.functions import DOMAIN, install

OP_TYPE = "TernaryMatMul"
_bitfold = Opset(DOMAIN, 1)


def pack(trits: np.ndarray, gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, G) from trits [K, N] in {−1, 0, +1} and scales gamma [N]."""
    trits = np.asarray(trits)
    if not np.isin(trits, (-1, 0, 1)).all():
        raise ValueError("ternary weights must be −1, 0 or +1")
    codes = (trits != 0).astype(np.int64) | ((trits < 0).astype(np.int64) << 1)
    return bitplanes.pack(codes, 2), np.asarray(gamma, np.float32)


def trits(packed: np.ndarray, k: int) -> np.ndarray:
    """The trits [K, N] in {−1, 0, +1}, float64."""
    nonzero, negative = bitplanes.planes(packed, k).astype(np.float64)
    return nonzero * (1.0 - 2.0 * negative)


def unpack(packed: np.ndarray, gamma: np.ndarray, k: int) -> np.ndarray:
    """The dense weight W [K, N], float32."""
    return (trits(packed, k) * gamma).astype(np.float32)


def evaluate(x: np.ndarray, packed: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """Numpy reference: add, subtract or skip each activation, then scale each output."""
    return ((x.astype(np.float64) @ trits(packed, x.shape[-1])) * gamma).astype(x.dtype)


@script(_bitfold, default_opset=op)
def TernaryMatMul(X: FLOAT, P: UINT8, G: FLOAT) -> FLOAT:
    bits = BitPlanes(P, X)
    nonzero = op.Gather(bits, op.Constant(value_int=0), axis=0)
    negative = op.Gather(bits, op.Constant(value_int=1), axis=0)
    unit = op.Mul(nonzero, op.Sub(op.Constant(value_float=1.0), op.Mul(negative, op.Constant(value_float=2.0))))
    return op.Mul(op.MatMul(X, unit), G)


FUNCTION = TernaryMatMul.to_function_proto()


def ensure_function(model: ir.Model) -> None:
    """Add the op's ONNX functions and opset import to ``model`` (idempotent)."""
    install(model, [bitplanes.FUNCTION, FUNCTION])
