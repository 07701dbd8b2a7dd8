"""Weight-only int2/int4/int8 dequantizing GEMV/GEMM for ONNX Runtime's ``com.microsoft.MatMulNBits`` (the format
bitfold's ``quantize_weights`` pass emits for ORT).

Kernel layout (``prepare``): codes are re-packed from ORT's [N, blocks, blob] (inputs along a row) to
``W: uint8[N / T, blocks, block_size · bits / 8, T]``: byte [t, g, j, c] holds, for output n = t · T + c, the
8 / bits consecutive inputs k = g · block_size + j · 8 / bits + u at bit offset u · bits. Outputs are innermost, so
one vector load reads the codes of consecutive outputs, and each tile of T outputs (the columns one parallel task
owns, ``schedule.tile``) is one contiguous stream: 10 % faster than one row per input on a cold 4096² GEMV. ``S: float[blocks, N]`` scales, ``ZS: float[blocks, N]`` zero point × scale.

Compute, with q the unsigned codes and z the zero points::

    part[m, g, n] = Σ_{k in block g} x[m, k] · q[k, n]          (codes decoded with constant shifts and masks)
    rows[m, g]    = Σ_{k in block g} x[m, k]
    Y[m, n]       = Σ_g S[g, n] · part[m, g, n] − ZS[g, n] · rows[m, g]   (+ bias[n])

so the inner loop is one byte load per output lane and 8 / bits fused multiply-adds of broadcast activations; the
zero point and scale cost one multiply-add per block, not per weight.

At ``accuracy_level = 4`` (ORT's int8 compute) 4-bit weights take ``int8_layout`` instead: activations are quantized
per row and block to int8 as ONNX Runtime does at that level, and the dots are integer (``vnni``'s AVX-512 VNNI
microkernel on CPUs that have it, ``compute_int8`` elsewhere, both with the same numerics), matching ONNX Runtime's
CPU kernel at that level to float32 rounding (tests/kernels). Level 4 is a floor on accuracy, not a prescription:
other codes keep float activations here, where ORT's CPU kernel quantizes them for 8-bit weights and 2-bit weights
in blocks of 32 or more, and keeps them in float for float zero points (which take ``int8_layout`` here).
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from bitfold.errors import BitfoldError
from bitfold.kernels import Prepared, kernel, schedule, vnni
from bitfold.kernels.common import padded
from bitfold.quant import matmulnbits

OP_TYPE = "MatMulNBits"
DOMAIN = "com.microsoft"


def relayout(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Unsigned codes [N, blocks · block_size] → uint8[N / T, blocks, block_size · bits / 8, T]."""
    n = codes.shape[0]
    per = 8 // bits
    grouped = codes.astype(np.uint8).reshape(n, -1, block_size // per, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    packed = np.bitwise_or.reduce(grouped << shifts, axis=-1).astype(np.uint8)  # [N, blocks, bytes]
    width = schedule.tile(n)
    width = width if n % width == 0 else n
    return np.ascontiguousarray(packed.reshape(n // width, width, *packed.shape[1:]).transpose(0, 2, 3, 1))


def prepare(weights, attrs) -> Prepared:
    _, b, scales, *rest = list(weights) + [None] * (6 - len(weights))
    zero_points, g_idx, bias = rest[0], rest[1], rest[2]
    k, n, bits, block_size = (int(attrs[a]) for a in ("K", "N", "bits", "block_size"))
    if bits not in matmulnbits.SUPPORTED_BITS:
        raise BitfoldError(f"MatMulNBits with {bits} bits has no kernel; bitfold's kernel reads 2, 4 or 8 bits.")
    if g_idx is not None:
        raise BitfoldError("MatMulNBits with g_idx (act-order groups) has no kernel; re-export without g_idx.")
    blocks = b.shape[1]
    codes = matmulnbits.unpack_bits(b, bits, block_size).reshape(n, blocks * block_size)
    scale = scales.astype(np.float32).reshape(n, blocks)
    if zero_points is None:
        zero = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif zero_points.dtype != np.uint8:  # unpacked float zero points (a min-max grid): the corrections carry them
        zero = zero_points.astype(np.float32).reshape(n, blocks)
    else:
        zero = matmulnbits.unpack_bits(zero_points, bits, blocks).astype(np.float32)
    if bits == 4 and int(attrs.get("accuracy_level", 0)) == 4 and block_size % 16 == 0:
        return int8_layout(codes, scale, zero, block_size, k, bias)
    return layout(codes, scale, zero, bits, block_size, k, bias)


def _offset(zero: np.ndarray) -> int:
    """The most common zero point (folded into the per-block term; the others become a correction)."""
    values, counts = np.unique(np.round(zero), return_counts=True)
    return int(values[counts.argmax()])


def int8_layout(codes, scale, zero, block_size: int, k: int, bias=None) -> Prepared:
    """Operands of the int8-activation kernel from 4-bit codes [N, blocks · block_size], scales and zero points
    [N, blocks]: codes int32[ceil(N/64), blocks · block_size / 8, 4, 16] (``vnni``'s layout), coefficients
    C[blocks + 1, 1 or 2, 64 · ceil(N/64)] (scales, zero-point corrections, bias in the last row)."""
    n, blocks = scale.shape
    tiles = -(-n // vnni.COLUMNS)
    offset = _offset(zero)
    shift = (zero - offset) * scale
    full = np.zeros((tiles * vnni.COLUMNS, codes.shape[1]), np.uint8)
    full[:n] = codes
    nibbles = full.reshape(tiles, 4, 16, -1, 2, 4)  # [v, t, lane, octet, half, j]
    words = (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).astype(np.uint8).transpose(0, 3, 1, 2, 4)
    coefficients = np.zeros((blocks + 1, 1 + int(shift.any()), tiles * vnni.COLUMNS), np.float32)
    coefficients[:blocks, 0, :n] = scale.T
    if shift.any():
        coefficients[:blocks, 1, :n] = shift.T
    if bias is not None:
        coefficients[blocks, 0, :n] = bias.astype(np.float32).reshape(n)
    arrays = (np.ascontiguousarray(words).view(np.int32)[..., 0], coefficients)
    return Prepared(arrays, {"int8": 1, "block_size": block_size, "offset": offset, "columns": n}, k, n)


def layout(codes, scale, zero, bits: int, block_size: int, k: int, bias=None) -> Prepared:
    """Prepared operands from unsigned codes [N, blocks · block_size], scales and zero points [N, blocks]."""
    n = codes.shape[0]
    offset = _offset(zero)
    shift = (zero - offset) * scale
    arrays = [relayout(codes, bits, block_size), np.ascontiguousarray(scale.T)]
    if shift.any():
        arrays.append(np.ascontiguousarray(shift.T.astype(np.float32)))
    if bias is not None:
        arrays.append(bias.astype(np.float32).reshape(n))
    params = {"bits": bits, "block_size": block_size, "offset": offset, "zero_points": int(shift.any()), "bias": int(bias is not None)}
    return Prepared(tuple(arrays), params, k, n)


def lowering(prepared: Prepared, m: int, target):
    if not prepared.params.get("int8") or not vnni.available(target):
        return None
    _, c = prepared.arrays
    blocks, corrections = c.shape[0] - 1, c.shape[1]
    return vnni.int4_kernel(m, prepared.k, prepared.n, prepared.params["block_size"], blocks, prepared.params["offset"], corrections > 1)


def compute(x: te.Tensor, arrays, **params) -> te.Tensor:
    return _compute_int8(x, arrays, **params) if params.pop("int8", 0) else _compute_float(x, arrays, **params)


def _compute_int8(x: te.Tensor, arrays, block_size: int, offset: int, columns: int) -> te.Tensor:
    """``vnni``'s numerics in TE, for every target: int8 activations per row and block, integer dots per block."""
    w, c = arrays
    m, octets = int(x.shape[0]), int(w.shape[1])
    blocks, corrections, n = int(c.shape[0]) - 1, int(c.shape[1]), columns
    xp = padded(x, octets * 8)
    i = te.reduce_axis((0, block_size), "i")
    top = te.compute((m, blocks), lambda r, g: te.max(te.abs(xp(r, g * block_size + i)), axis=i), name="rows_max")
    inverse = lambda r, g: te.if_then_else(top[r, g] > 0, tirx.const(127.0, "float32") / top[r, g], tirx.const(0.0, "float32"))
    q = te.compute((m, octets * 8), lambda r, kk: tirx.nearbyint(xp(r, kk) * inverse(r, kk // block_size)).astype("int32"), name="rows_q")
    i = te.reduce_axis((0, block_size), "i")
    sums = te.compute((m, blocks), lambda r, g: te.sum(q[r, g * block_size + i], axis=i), name="rows_sum")
    o, half, j = te.reduce_axis((0, block_size // 8), "o"), te.reduce_axis((0, 2), "h"), te.reduce_axis((0, 4), "j")

    def term(r, g, cols):
        word = w[cols // vnni.COLUMNS, g * (block_size // 8) + o, cols % vnni.COLUMNS // 16, cols % 16]
        return q[r, g * block_size + 8 * o + 4 * half + j] * ((word >> (8 * j + 4 * half)) & 15)

    part = te.compute((m, blocks, n), lambda r, g, cols: te.sum(term(r, g, cols), axis=[o, half, j]), name="part")
    g = te.reduce_axis((0, blocks), "g")
    scale = lambda r, h: top[r, h] * tirx.const(1 / 127, "float32")

    def block(r, cols):
        shift = scale(r, g) * sums[r, g].astype("float32")
        value = c[g, 0, cols] * (part[r, g, cols].astype("float32") * scale(r, g) - shift * tirx.const(float(offset), "float32"))
        return value - c[g, 1, cols] * shift if corrections > 1 else value

    y = te.compute((m, n), lambda r, cols: te.sum(block(r, cols), axis=g), name="gemv")
    return te.compute((m, n), lambda r, cols: y[r, cols] + c[blocks, 0, cols], name="out")


def _compute_float(x: te.Tensor, arrays, bits: int, block_size: int, offset: int, zero_points: int, bias: int) -> te.Tensor:
    w, s = arrays[:2]
    tiles, blocks, width, columns = (int(d) for d in w.shape)
    n = tiles * columns
    per = 8 // bits
    mask = tirx.const((1 << bits) - 1, "uint8")
    xp = padded(x, blocks * block_size)
    j = te.reduce_axis((0, width), "j")
    u = te.reduce_axis((0, per), "u") if per > 1 else None

    def term(m, g, cols):
        shift = (u * bits).astype("uint8") if u is not None else tirx.const(0, "uint8")
        code = ((w[cols // columns, g, j, cols % columns] >> shift) & mask).astype("int32") - tirx.const(offset, "int32")
        return xp(m, g * block_size + j * per + (u if u is not None else 0)) * code.astype("float32")

    axes = [j, u] if u is not None else [j]
    part = te.compute((x.shape[0], blocks, n), lambda m, g, cols: te.sum(term(m, g, cols), axis=axes), name="part")
    g = te.reduce_axis((0, blocks), "g")
    if zero_points:
        zs = arrays[2]
        i = te.reduce_axis((0, block_size), "i")
        rows = te.compute((x.shape[0], blocks), lambda m, h: te.sum(xp(m, h * block_size + i), axis=i), name="rows")
        y = te.compute((x.shape[0], n), lambda m, cols: te.sum(s[g, cols] * part[m, g, cols] - zs[g, cols] * rows[m, g], axis=g), name="gemv")
    else:
        y = te.compute((x.shape[0], n), lambda m, cols: te.sum(s[g, cols] * part[m, g, cols], axis=g), name="gemv")
    if bias:
        return te.compute(y.shape, lambda m, cols: y[m, cols] + arrays[-1][cols], name="out")
    return y


KERNEL = kernel(DOMAIN, OP_TYPE, (1, 2, 3, 4, 5), prepare, compute, lowering=lowering)
