"""Plain ``MatMul`` against a constant fp32 weight whose rows lie far apart (a tied LM head: 576 × 49152, rows
196 KB apart), re-laid in column strips at build time.

A GEMV reads a tile of T outputs per parallel task (``schedule.tile``); in the [K, N] layout each of the K rows of
that tile is a separate 1 KiB read a whole weight row away, so every reduction step touches a new page and the
hardware prefetchers restart: SmolLM2's head reads at 9.5 GB/s that way. ``prepare`` stores the weight as
``W: float[N / T, K, T]`` (strip t holds outputs t · T … t · T + T − 1 for every input), so each task streams one
contiguous K · T block (23.5 GB/s, same run). A GEMM (prefill) reads the same strips with each weight vector
serving a block of rows, without the per-call copy the standard-op schedule makes for such weights.

Selected only for weights at least ``schedule.STRIP_ROW_BYTES`` per row on the CPU; narrower MatMuls stay standard
ops (TVM fuses them with their neighbours), and CUDA's GEMV rules need no strips.
"""

from __future__ import annotations

import numpy as np
from tvm import te

from bitfold.kernels import Prepared, kernel, schedule

OP_TYPE = "MatMul"
DOMAIN = "ai.onnx"


def strips(w: np.ndarray) -> np.ndarray:
    """[K, N] → float32[N / T, K, T] with T = ``schedule.tile(N)`` (one strip, T = N, where T does not divide N)."""
    k, n = w.shape
    width = schedule.tile(n)
    width = width if n % width == 0 else n
    return np.ascontiguousarray(w.astype(np.float32).reshape(k, n // width, width).transpose(1, 0, 2))


def select(weights, attrs, device: str) -> bool:
    w = weights[1]
    return device == "cpu" and w.ndim == 2 and w.dtype == np.float32 and w.shape[1] * 4 >= schedule.STRIP_ROW_BYTES


def prepare(weights, attrs) -> Prepared:
    w = weights[1]
    return Prepared((strips(w),), {}, int(w.shape[0]), int(w.shape[1]))


def compute(x: te.Tensor, arrays) -> te.Tensor:
    (w,) = arrays
    count, k, width = (int(d) for d in w.shape)
    r = te.reduce_axis((0, k), "k")
    return te.compute((x.shape[0], count * width), lambda m, n: te.sum(x[m, r] * w[n // width, r, n % width], axis=r), name="gemv")


KERNEL = kernel(DOMAIN, OP_TYPE, (1,), prepare, compute, select=select)
