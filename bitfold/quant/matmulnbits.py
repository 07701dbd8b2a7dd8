"""ONNX Runtime's ``com.microsoft.MatMulNBits`` weight layout: pack and unpack, in numpy.

``Y = A @ dequant(B)`` with A (..., K) and the logical weight W (K, N). The packed inputs are:

- ``B``: uint8 [N, n_blocks, blob], n_blocks = ceil(K / block_size), blob = block_size · bits / 8. Row n holds
  output channel n; along a row, element k (of K padded to n_blocks · block_size) is stored at bit offset
  (k · bits) mod 8 of byte (k · bits) // 8 of its row, least significant bits first: for 4 bits, even k in the
  low nibble, odd k in the high nibble; for 2 bits, four per byte from bit 0 up.
- ``scales``: float [N, n_blocks] (ORT also reads it flattened).
- ``zero_points`` (optional): uint8 [N, ceil(n_blocks · bits / 8)], packed along blocks the same way, or float
  [N, n_blocks] (unpacked, the scales' dtype: a min-max grid whose zero point is not an integer). When absent,
  every zero point is 2^(bits-1).

Element value: (code - zero_point) · scale. Padded codes equal the block's zero point so they decode to 0.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 4, 8)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (..., M) into bytes along the last axis, LSB first; M · bits must divide by 8."""
    per_byte = 8 // bits
    codes = codes.astype(np.uint8).reshape(*codes.shape[:-1], -1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(codes << shifts, axis=-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :count]


def pack(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int, float_zero: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """codes: unsigned (N, K); scales, zero_points: (N, n_blocks). Returns (B, scales, zero points: packed uint8, or
    float32 (N, n_blocks) with ``float_zero``)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"MatMulNBits stores 2, 4 or 8 bits, got {bits}")
    n, k = codes.shape
    blocks = -(-k // block_size)
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.uint8)
    else:
        zp = np.clip(np.round(zero_points), 0, (1 << bits) - 1).astype(np.uint8)
    padded = np.repeat(zp, block_size, axis=1).copy()
    padded[:, :k] = codes
    b = pack_bits(padded.reshape(n, blocks, block_size), bits)
    packed_zp = None
    if zero_points is not None and float_zero:
        packed_zp = np.asarray(zero_points, np.float32).reshape(n, blocks)
    elif zero_points is not None:
        width = -(-blocks * bits // 8) * 8 // bits
        zp_padded = np.zeros((n, width), np.uint8)
        zp_padded[:, :blocks] = zp
        packed_zp = pack_bits(zp_padded, bits)
    return b, scales.astype(np.float32).reshape(n, blocks), packed_zp


def unpack(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, block_size: int, k: int) -> np.ndarray:
    """The dequantized logical weight W (K, N)."""
    n, blocks, _ = b.shape
    codes = unpack_bits(b, bits, block_size).reshape(n, blocks * block_size).astype(np.float32)
    if zero_points is None:
        zp = np.full((n, blocks), 1 << (bits - 1), np.float32)
    elif zero_points.dtype != np.uint8:
        zp = zero_points.astype(np.float32).reshape(n, blocks)
    else:
        zp = unpack_bits(zero_points, bits, blocks).astype(np.float32)
    values = (codes - np.repeat(zp, block_size, axis=1)) * np.repeat(scales.reshape(n, blocks), block_size, axis=1)
    return values[:, :k].T.copy()
