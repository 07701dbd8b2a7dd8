"""Number formats and granularities for quantization, vectorised in numpy.

A weight is handled as a matrix ``w`` of shape (N, K): N output channels (rows), K the reduction axis (columns).
A :class:`Granularity` decides which elements share one scale: the whole tensor, one output channel, or a group
of ``size`` consecutive elements of a row (the last group of a row may be shorter). A :class:`Format` maps real
values to codes and back given a scale (and, for asymmetric integers, a zero point):

- :class:`IntFormat`: b-bit integers, b in {2, 3, 4, 8}. Symmetric codes are signed in [-2^(b-1), 2^(b-1) - 1]
  with zero point 0 and a *signed* scale ``s = e / -2^(b-1)``, e the group's value of largest magnitude: e lands
  exactly on code -2^(b-1) whatever its sign, so all 2^b levels are used (a positive-only scale would waste one
  step on one side). ONNX DequantizeLinear and ORT's MatMulNBits compute (q - z) · s with any sign of s.
  Asymmetric codes are unsigned in [0, 2^b - 1] with ``s = (max - min) / (2^b - 1)`` over a range that always
  contains 0, and an integer zero point. With ``float_zero`` the range is the group's own [min, max] and the zero
  point ``-min / s`` stays a float: the min-max grid of llama.cpp's Q4_1 (``x = s·q + min``), which ORT's MatMulNBits
  reads as a float zero point but ONNX's DequantizeLinear cannot hold.
- :class:`FloatFormat`: FP8 e4m3 / e5m2 and FP4 e2m1 (ml_dtypes casts, round to nearest even) with scale
  ``absmax / max_finite``; NF4 (the 16 normal-quantile levels of QLoRA, nearest level) with scale ``absmax``.

``clip`` searches, per scale group, the shrink ratio r of the range (a grid from 1 down to ``min_ratio``) that
minimises the squared round-trip error, as in AWQ/OmniQuant's clipping; with ``clip=False`` r = 1.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np

# ---- granularity ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PerTensor:
    def __str__(self) -> str:
        return "per-tensor"


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """One scale per output channel (row of the (N, K) matrix)."""

    def __str__(self) -> str:
        return "per-channel"


@dataclasses.dataclass(frozen=True)
class PerGroup:
    """One scale per ``size`` consecutive elements along the reduction axis."""

    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"group size must be >= 1, got {self.size}")

    def __str__(self) -> str:
        return f"g{self.size}"


Granularity = PerTensor | PerChannel | PerGroup


def granularity_from(group_size: int) -> Granularity:
    """Recipe convention: group_size -1 is per-channel, 0 per-tensor, n > 0 groups of n."""
    if group_size == -1:
        return PerChannel()
    if group_size == 0:
        return PerTensor()
    return PerGroup(group_size)


def to_groups(w: np.ndarray, granularity: Granularity) -> np.ndarray:
    """View (N, K) as (N_groups, G, size) blocks sharing a scale; a short last group is padded with zeros.

    Zero padding never changes a group's scale (every range includes 0) and is dropped by :func:`from_groups`.
    """
    n, k = w.shape
    if isinstance(granularity, PerTensor):
        return w.reshape(1, 1, n * k)
    if isinstance(granularity, PerChannel):
        return w.reshape(n, 1, k)
    size = granularity.size
    groups = -(-k // size)
    if groups * size != k:
        w = np.pad(w, ((0, 0), (0, groups * size - k)))
    return w.reshape(n, groups, size)


def from_groups(blocks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    n, k = shape
    return blocks.reshape(n, -1)[:, :k]


# ---- formats -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IntFormat:
    bits: int
    symmetric: bool = True
    float_zero: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"integer bits must be 2, 3, 4 or 8, got {self.bits}")

    @property
    def name(self) -> str:
        return f"int{self.bits}{'' if self.symmetric else '-minmax' if self.float_zero else '-asym'}"

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    def params(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point for blocks whose range is [lo, hi] (any shapes that broadcast)."""
        if self.float_zero and not self.symmetric:
            scale = (hi - lo) / self.qmax
            safe = np.where(scale > 0, scale, 1.0)
            return safe.astype(np.float32), (-lo / safe).astype(np.float32)
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        if self.symmetric:
            extreme = np.where(-lo >= hi, lo, hi)
            scale = extreme / self.qmin  # signed: the extreme lands exactly on code qmin
            zero = np.zeros_like(scale)
        else:
            scale = (hi - lo) / self.qmax
            zero = np.clip(np.round(-lo / np.where(scale > 0, scale, 1.0)), 0, self.qmax)
        return np.where(scale != 0, scale, 1.0).astype(np.float32), zero.astype(np.float32)

    def quantize(self, x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        return np.clip(np.round(x / scale + zero), self.qmin, self.qmax).astype(np.int32)

    def dequantize(self, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        return ((q - zero) * scale).astype(np.float32)


NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230850219727, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip

_FLOAT_DTYPES = {"fp8-e4m3": ml_dtypes.float8_e4m3fn, "fp8-e5m2": ml_dtypes.float8_e5m2, "fp4-e2m1": ml_dtypes.float4_e2m1fn}


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    kind: Literal["fp8-e4m3", "fp8-e5m2", "fp4-e2m1", "nf4"]

    @property
    def name(self) -> str:
        return self.kind

    @property
    def bits(self) -> int:
        return 8 if self.kind.startswith("fp8") else 4

    @property
    def max_value(self) -> float:
        return 1.0 if self.kind == "nf4" else float(ml_dtypes.finfo(_FLOAT_DTYPES[self.kind]).max)

    def params(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = np.maximum(-lo, hi) / self.max_value
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return scale, np.zeros_like(scale)

    def quantize(self, x: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        y = np.clip(x / scale, -self.max_value, self.max_value)
        if self.kind == "nf4":
            return np.abs(y[..., None] - NF4_LEVELS).argmin(axis=-1).astype(np.uint8)
        return y.astype(_FLOAT_DTYPES[self.kind])

    def dequantize(self, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
        values = NF4_LEVELS[q] if self.kind == "nf4" else q.astype(np.float32)
        return (values * scale).astype(np.float32)


Format = IntFormat | FloatFormat


def format_from(name: str, *, symmetric: bool = True, float_zero: bool = False) -> Format:
    """``int8|int4|int3|int2|fp8-e4m3|fp8-e5m2|fp4-e2m1|nf4``."""
    if name.startswith("int"):
        return IntFormat(int(name[3:]), symmetric, float_zero)
    return FloatFormat(name)  # type: ignore[arg-type]


# ---- round trip ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Quantized:
    """Codes with their scales and zero points, shaped (N_groups, G, size) / (N_groups, G, 1)."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    fmt: Format
    granularity: Granularity
    shape: tuple[int, int]

    def dequantize(self) -> np.ndarray:
        return from_groups(self.fmt.dequantize(self.codes, self.scale, self.zero), self.shape)


def block_params(
    blocks: np.ndarray, fmt: Format, *, clip: bool = False, min_ratio: float = 0.5, steps: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per block (last axis), optionally with the MSE-optimal range shrink."""
    lo, hi = blocks.min(axis=-1, keepdims=True), blocks.max(axis=-1, keepdims=True)
    best = fmt.params(lo, hi)
    if not clip:
        return best
    best_err = _block_error(blocks, fmt, *best)
    for ratio in np.linspace(1.0, min_ratio, steps)[1:]:
        scale, zero = fmt.params(lo * ratio, hi * ratio)
        err = _block_error(blocks, fmt, scale, zero)
        better = err < best_err
        best = (np.where(better, scale, best[0]), np.where(better, zero, best[1]))
        best_err = np.minimum(err, best_err)
    return best


def _block_error(blocks, fmt, scale, zero) -> np.ndarray:
    return ((fmt.dequantize(fmt.quantize(blocks, scale, zero), scale, zero) - blocks) ** 2).sum(axis=-1, keepdims=True)


def rtn(w: np.ndarray, fmt: Format, granularity: Granularity, *, clip: bool = False):
    """Round (N, K) ``w`` to nearest: (dequantized weight, per-element scale, per-element zero point)."""
    blocks = to_groups(np.asarray(w, dtype=np.float32), granularity)
    scale, zero = block_params(blocks, fmt, clip=clip)
    expand = lambda p: from_groups(np.broadcast_to(p, blocks.shape), w.shape)  # noqa: E731
    return from_groups(fmt.dequantize(fmt.quantize(blocks, scale, zero), scale, zero), w.shape), expand(scale), expand(zero)


def quantize(w: np.ndarray, fmt: Format, granularity: Granularity, *, clip: bool = False) -> Quantized:
    """Quantize the (N, K) matrix ``w``."""
    w = np.asarray(w, dtype=np.float32)
    blocks = to_groups(w, granularity)
    scale, zero = block_params(blocks, fmt, clip=clip)
    return Quantized(fmt.quantize(blocks, scale, zero), scale, zero, fmt, granularity, w.shape)


def fake_quantize(w: np.ndarray, fmt: Format, granularity: Granularity, *, clip: bool = False) -> np.ndarray:
    """Quantize then dequantize (N, K) ``w``: what the hardware will compute with."""
    return quantize(w, fmt, granularity, clip=clip).dequantize()
