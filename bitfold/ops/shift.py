"""``bitfold.ShiftMatMul``: a MatMul whose weights are signed powers of two times one scale per output.

Schema (domain ``bitfold``, version 1)::

    Y = ShiftMatMul(X, P, S, zero=1)     X: float[..., K]   P: uint8[b, ceil(K/8), N]   S: float[N]   Y: float[..., N]

Codes have b = P.shape[0] bits (3 or 4), stored as bit planes (``bitfold.ops.bitplanes``). Bit b-1 of a code is
the sign (1: negative); the low b-1 bits are an exponent e in [0, E], E = 2^(b-1) - 1::

    W[k, n] = S[n] · (-1)^sign · 2^(-e)

With ``zero = 1`` (DeepShift-PS style) the code e = E means W = 0, so magnitudes are 2^0 … 2^-(E-1) and zero;
with ``zero = 0`` (DenseShift) every code is a power of two, 2^0 … 2^-E, and no weight is zero. A kernel
multiplies nothing but the final per-output scale: each product is the activation shifted by e and added or
subtracted. Cost: b bits per weight plus 32 bits per output.
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

OP_TYPE = "ShiftMatMul"
_bitfold = Opset(DOMAIN, 1)


def magnitudes(bits: int, zero: bool) -> np.ndarray:
    """The magnitude of every exponent code e = 0 … E, float64 (the last one 0 when ``zero``)."""
    top = (1 << (bits - 1)) - 1
    values = 2.0 ** -np.arange(top + 1)
    if zero:
        values[top] = 0.0
    return values


def decode(codes: np.ndarray, bits: int, zero: bool) -> np.ndarray:
    """Unit weights (−1)^sign · 2^(−e) (or 0) of codes, float64."""
    codes = np.asarray(codes, np.int64)
    sign = 1.0 - 2.0 * (codes >> (bits - 1))
    return sign * magnitudes(bits, zero)[codes & ((1 << (bits - 1)) - 1)]


def encode(units: np.ndarray, bits: int, zero: bool) -> np.ndarray:
    """Codes of unit weights that are exactly representable (as produced by ``bitfold.quant.shift``)."""
    units = np.asarray(units, np.float64)
    mags = magnitudes(bits, zero)
    exponent = np.abs(np.abs(units)[..., None] - mags).argmin(axis=-1)
    if not np.array_equal(mags[exponent], np.abs(units)):
        raise ValueError("weights are not signed powers of two in the code's range")
    return ((units < 0).astype(np.int64) << (bits - 1)) | exponent


def pack(units: np.ndarray, scale: np.ndarray, bits: int, zero: bool) -> tuple[np.ndarray, np.ndarray]:
    """(P, S) for W = units · scale with units [K, N] signed powers of two and scale [N]."""
    return bitplanes.pack(encode(units, bits, zero), bits), np.asarray(scale, np.float32)


def unpack(packed: np.ndarray, scale: np.ndarray, k: int, zero: bool) -> np.ndarray:
    """The dense weight W [K, N], float32."""
    bits = packed.shape[0]
    return (decode(bitplanes.unpack(packed, k), bits, zero) * scale).astype(np.float32)


def evaluate(x: np.ndarray, packed: np.ndarray, scale: np.ndarray, zero: int = 1) -> np.ndarray:
    """Numpy reference: sign-and-shift every activation, sum per output, then scale."""
    units = decode(bitplanes.unpack(packed, x.shape[-1]), packed.shape[0], bool(zero))
    return ((x.astype(np.float64) @ units) * scale).astype(x.dtype)


@script(_bitfold, default_opset=op)
def ShiftMatMul(X: FLOAT, P: UINT8, S: FLOAT, zero: int = 1) -> FLOAT:
    bits = BitPlanes(P, X)
    b = op.Shape(P, start=0, end=1)
    two = op.Constant(value_float=2.0)
    place = op.Pow(two, op.Cast(op.Range(op.Constant(value_int=0), op.Squeeze(b), op.Constant(value_int=1)), to=FLOAT.dtype))
    codes = op.ReduceSum(op.Mul(bits, op.Unsqueeze(place, [1, 2])), op.Constant(value_ints=[0]), keepdims=0)
    top = op.Pow(two, op.Cast(op.Sub(b, op.Constant(value_ints=[1])), to=FLOAT.dtype))
    negative = op.GreaterOrEqual(codes, top)
    e = op.Sub(codes, op.Where(negative, top, op.Constant(value_float=0.0)))
    magnitude = op.Pow(two, op.Neg(e))
    is_zero = op.And(op.Equal(e, op.Sub(top, op.Constant(value_float=1.0))), op.Cast(op.Constant(value_int=zero), to=9))
    unit = op.Where(is_zero, op.Constant(value_float=0.0), op.Where(negative, op.Neg(magnitude), magnitude))
    return op.Mul(op.MatMul(X, unit), S)


FUNCTION = ShiftMatMul.to_function_proto()


def ensure_function(model: ir.Model) -> None:
    """Add the op's ONNX functions and opset import to ``model`` (idempotent)."""
    install(model, [bitplanes.FUNCTION, FUNCTION])
