"""Plain ``MatMul`` against a constant fp32 weight, re-laid in column strips at build time (CPU).

A GEMV reads a tile of T outputs per parallel task (``schedule.tile``); in the [K, N] layout each of the K rows of
that tile is a separate short read (T floats) a whole weight row away, which the hardware prefetchers follow
poorly: cold decode GEMVs at SmolLM2's shapes (576 × 576, 576 × 1536, 1536 × 576, 576 × 192) read at 17–20 GB/s,
and its tied LM head (576 × 49152, rows 196 KB apart, so every reduction step touches a new page) at 9.5 GB/s.
``prepare`` stores the weight as ``W: float[N / T, K, T]`` (strip t holds outputs t · T … t · T + T − 1 for every
input), so each task streams one contiguous K · T block: 26–30 GB/s at the same shapes, 23.5 GB/s for the head. A
GEMM (prefill) reads the same strips, each weight vector serving a block of rows, as fast as the [K, N] layout
(within 10 % at 128 rows), and a wide weight no longer needs the per-call strip copy the standard-op schedule makes.

Selected for weights of at least ``MIN_BYTES`` on the CPU; smaller ones stay in cache between calls and remain
standard ops (TVM fuses them with their neighbours). CUDA's GEMV rules need no strips.
"""

from __future__ import annotations

import numpy as np
from tvm import te

from bitfold.kernels import Prepared, kernel, schedule

OP_TYPE = "MatMul"
DOMAIN = "ai.onnx"
#: weights below this size (bytes) stay standard ops
MIN_BYTES = 262144


def strips(w: np.ndarray) -> np.ndarray:
    """[K, N] → float32[N / T, K, T] with T = ``schedule.tile(N)`` (one strip, T = N, where T does not divide N)."""
    k, n = w.shape
    width = schedule.tile(n)
    width = width if n % width == 0 else n
    return np.ascontiguousarray(w.astype(np.float32).reshape(k, n // width, width).transpose(1, 0, 2))


def select(weights, attrs, device: str) -> bool:
    w = weights[1]
    return device == "cpu" and w.ndim == 2 and w.dtype == np.float32 and w.nbytes >= MIN_BYTES


def prepare(weights, attrs) -> Prepared:
    w = weights[1]
    return Prepared((strips(w),), {}, int(w.shape[0]), int(w.shape[1]))


def compute(x: te.Tensor, arrays) -> te.Tensor:
    (w,) = arrays
    count, k, width = (int(d) for d in w.shape)
    r = te.reduce_axis((0, k), "k")
    return te.compute((x.shape[0], count * width), lambda m, n: te.sum(x[m, r] * w[n // width, r, n % width], axis=r), name="gemv")


KERNEL = kernel(DOMAIN, OP_TYPE, (1,), prepare, compute, select=select)
