"""Bit-plane packing shared by bitfold's low-bit MatMul ops, and the ONNX function that unpacks it.

Layout. A weight W of shape [K, N] (MatMul layout, Y = X · W) with b-bit unsigned codes c[k, n] is stored as::

    P: uint8[b, ceil(K / 8), N]      bit j (LSB = 0) of P[i, g, n]  =  bit i of c[8g + j, n]

so plane i holds bit i of every code, and one byte holds the same bit of eight consecutive inputs k = 8g … 8g+7
of one output n. Bits for k >= K (the tail of the last byte) are zero. Codes have b = 1 … 8 bits (``MAX_BITS``;
:func:`pack` refuses wider ones). Storage is exactly b bits per weight plus at most 7 padding rows (3-bit codes
cost 3 bits, not 4). Grouping eight inputs per byte is what a lookup-table kernel needs: it tabulates the 256
signed partial sums of eight activations once and then reads one table entry per plane byte instead of
multiplying (see ``bitfold.ops.bcq.evaluate_lut``).

``BitPlanes(P, X)`` is the ONNX function the ops' own functions call: it returns the planes as float 0/1 values
of shape [b, K, N], K taken from X's last axis.
"""

from __future__ import annotations

import numpy as np
from onnxscript import FLOAT, UINT8, script
from onnxscript import opset18 as op
from onnxscript.values import Opset

from bitfold.errors import BitfoldError

_bitfold = Opset("bitfold", 1)

#: the widest code the planes hold
MAX_BITS = 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes [K, N] (each < 2**bits) into planes uint8[bits, ceil(K/8), N], 1 <= bits <= 8."""
    if not 1 <= bits <= MAX_BITS:
        raise BitfoldError(f"bit planes hold codes of 1 to {MAX_BITS} bits, got bits = {bits}; use a code of at most {MAX_BITS} bits.")
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be [K, N], got shape {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    k, n = codes.shape
    padded = np.zeros((-(-k // 8) * 8, n), np.uint8)
    padded[:k] = codes
    planes = (padded[None] >> np.arange(bits, dtype=np.uint8)[:, None, None]) & 1  # [b, K8, N]
    planes = planes.reshape(bits, -1, 8, n)
    return (planes << np.arange(8, dtype=np.uint8)[None, None, :, None]).sum(axis=2).astype(np.uint8)


def planes(packed: np.ndarray, k: int) -> np.ndarray:
    """The bits of every plane, uint8 0/1 of shape [b, K, N]."""
    packed = np.asarray(packed, np.uint8)
    b, groups, n = packed.shape
    if groups != -(-k // 8):
        raise ValueError(f"{groups} bytes per output cannot hold K = {k} inputs (need {-(-k // 8)})")
    bits = (packed[:, :, None, :] >> np.arange(8, dtype=np.uint8)[None, None, :, None]) & 1
    return bits.reshape(b, groups * 8, n)[:, :k]


def unpack(packed: np.ndarray, k: int) -> np.ndarray:
    """The codes [K, N] packed by :func:`pack` (int64)."""
    bits = planes(packed, k).astype(np.int64)
    return (bits << np.arange(bits.shape[0])[:, None, None]).sum(axis=0)


@script(_bitfold, default_opset=op)
def BitPlanes(P: UINT8, X: FLOAT) -> FLOAT:
    shifts = op.Cast(op.Range(op.Constant(value_int=0), op.Constant(value_int=8), op.Constant(value_int=1)), to=UINT8.dtype)
    bits = op.BitwiseAnd(
        op.BitShift(op.Unsqueeze(P, [2]), op.Unsqueeze(shifts, [1]), direction="RIGHT"),
        op.CastLike(op.Constant(value_int=1), P),
    )
    rows = op.Mul(op.Shape(P, start=1, end=2), op.Constant(value_ints=[8]))
    flat = op.Reshape(bits, op.Concat(op.Shape(P, start=0, end=1), rows, op.Shape(P, start=2), axis=0))
    k = op.Shape(X, start=-1)
    return op.Cast(op.Slice(flat, op.Constant(value_ints=[0]), k, op.Constant(value_ints=[1])), to=FLOAT.dtype)


FUNCTION = BitPlanes.to_function_proto()
