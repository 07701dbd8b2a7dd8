"""AVX-512 lookup-table microkernel for bit-plane weights (``BCQMatMul``, ``BinaryMatMul``, ``TernaryMatMul``),
written in TIR with explicit 16-lane vectors.

For every four consecutive activations the kernel tabulates the 16 sums ``T[t] = Σ_{j<4} (bit j of t) · x[4c + j]``
(one 512-bit register). A plane byte holds the bits of eight inputs for one output; a vector of 16 outputs' bytes
gives two vectors of 4-bit indices, and ``vpermps`` looks up all 16 partial sums at once: two lookups and two adds
per 8 weights × 16 outputs, no multiplication. Per plane i and group h of inputs the selected sum s is combined as

    signs  (BCQ, binary):  y += A[i, h, n] · (2 · s − Σ_{k in h} x[k])        (bit set = +1, clear = −1)
    select (ternary):      y += A[i, h, n] · s

plus ``y += E[n] · Σ_k x[k]`` (a binary layer's per-output mean; zero for the others). Each task owns 64 outputs
(four vectors: a whole cache line of each plane row, and 4 · planes independent accumulators); its planes and
coefficients are ``tiled`` into one contiguous stream, prefetched ``_AHEAD`` steps ahead; tasks run in parallel
over the cores. Exact in fp32 up to summation order. Used where the target has AVX-512; elsewhere the TE kernels
run on the same layout (``at``).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

_PERMUTE = "llvm.x86.avx512.permvar.sf.512"
COLUMNS = 64
#: plane rows prefetched this many 8-input steps ahead (a task's stream crosses a page every 64 / planes steps, where
#: the hardware prefetchers stop)
_AHEAD = 16


def available(target: tvm.target.Target) -> bool:
    from tvm.target import codegen

    return target.kind.name == "llvm" and codegen.llvm_cpu_has_features("avx512f", target)


def tiled(planes: np.ndarray) -> np.ndarray:
    """[planes, rows, N] → [ceil(N / 64), rows, planes, 64], zeros past N: the 64 outputs of one task, all planes,
    are one contiguous stream (row after row), which the hardware prefetchers follow."""
    count, rows, n = planes.shape
    tiles = -(-n // COLUMNS)
    full = np.zeros((count, rows, tiles * COLUMNS), planes.dtype)
    full[..., :n] = planes
    return np.ascontiguousarray(full.reshape(count, rows, tiles, COLUMNS).transpose(2, 1, 0, 3))


def padded(vector: np.ndarray) -> np.ndarray:
    """A per-output vector [N] zero-padded to whole tasks."""
    full = np.zeros(-(-vector.shape[0] // COLUMNS) * COLUMNS, vector.dtype)
    full[: vector.shape[0]] = vector
    return full


def at(tensor, plane, row, cols):
    """Element [plane, row, output] of a ``tiled`` tensor (TE)."""
    return tensor[cols // COLUMNS, row, plane, cols % COLUMNS]


def plane_kernel(m: int, k: int, n: int, planes: int, groups: int, group_bytes: int, a_dtype: str, signs: bool) -> tvm.tirx.PrimFunc:
    """PrimFunc (x [m, k], p, a ``tiled`` from [planes, ceil(k/8), n] and [planes, groups, n], e ``padded`` [n],
    y [m, n])."""
    chunks = -(-k // 8)
    tiles = -(-n // COLUMNS)
    nibbles = 2 * chunks
    two = 2.0 if signs else 1.0
    minus = 1.0 if signs else 0.0

    @T.macro
    def tabulate(x, table, sums):
        for r, c in T.grid(m, nibbles):
            table[T.ramp((r * nibbles + c) * 16, 1, 16)] = T.broadcast(T.float32(0), 16)
            for j in T.unroll(4):
                table[T.ramp((r * nibbles + c) * 16, 1, 16)] = table[T.ramp((r * nibbles + c) * 16, 1, 16)] + T.broadcast(T.if_then_else(4 * c + j < k, x[r, T.min(4 * c + j, k - 1)], T.float32(0)), 16) * T.Cast("float32x16", T.shift_right(T.ramp(0, 1, 16), T.broadcast(j, 16)) & T.broadcast(1, 16))
        for r in range(m):
            sums[r * (groups + 1) + groups] = T.float32(0)
            for h in range(groups):
                sums[r * (groups + 1) + h] = T.float32(0)
                for c in range(2 * group_bytes):  # entry 15 of a nibble's table: the sum of its four inputs
                    if 2 * h * group_bytes + c < nibbles:
                        sums[r * (groups + 1) + h] = sums[r * (groups + 1) + h] + table[(r * nibbles + 2 * h * group_bytes + c) * 16 + 15]
                sums[r * (groups + 1) + groups] = sums[r * (groups + 1) + groups] + sums[r * (groups + 1) + h]

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), "float32"), p: T.Buffer((tiles, chunks, planes, COLUMNS), "uint8"), a: T.Buffer((tiles, groups, planes, COLUMNS), a_dtype), e: T.Buffer((tiles * COLUMNS,), "float32"), y: T.Buffer((m, n), "float32")):
        table = T.decl_buffer((m * nibbles * 16,), "float32")
        sums = T.decl_buffer((m * (groups + 1),), "float32")
        tabulate(x, table, sums)
        for v in T.parallel(tiles):
            for r in range(m):
                acc = T.decl_buffer((4,), "float32x16", scope="local")
                for w in T.unroll(4):
                    acc[w] = e[T.ramp(v * 64 + w * 16, 1, 16)] * T.broadcast(sums[r * (groups + 1) + groups], 16)
                for h in range(groups):
                    s = T.decl_buffer((planes * 4,), "float32x16", scope="local")
                    for z in T.unroll(planes * 4):
                        s[z] = T.broadcast(T.float32(0), 16)
                    for c in range(group_bytes):
                        if h * group_bytes + c < chunks:
                            if r == 0:
                                for i in T.unroll(planes):
                                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(p[v, T.min(h * group_bytes + c + _AHEAD, chunks - 1), i, 0]), 0, 3, 1))
                            for i in T.unroll(planes):
                                for w in T.unroll(4):
                                    s[4 * i + w] = s[4 * i + w] + T.call_llvm_pure_intrin("float32x16", _PERMUTE, table[T.ramp((r * nibbles + 2 * (h * group_bytes + c)) * 16, 1, 16)], T.Cast("int32x16", p[v, h * group_bytes + c, i, T.ramp(w * 16, 1, 16)]) & T.broadcast(15, 16)) + T.call_llvm_pure_intrin("float32x16", _PERMUTE, table[T.ramp((r * nibbles + 2 * (h * group_bytes + c)) * 16 + 16, 1, 16)], T.shift_right(T.Cast("int32x16", p[v, h * group_bytes + c, i, T.ramp(w * 16, 1, 16)]), T.broadcast(4, 16)))
                    for i in T.unroll(planes):
                        for w in T.unroll(4):
                            acc[w] = acc[w] + T.Cast("float32x16", a[v, h, i, T.ramp(w * 16, 1, 16)]) * (s[4 * i + w] * T.broadcast(T.float32(two), 16) - T.broadcast(sums[r * (groups + 1) + h] * T.float32(minus), 16))
                for w in T.unroll(4):
                    if v * COLUMNS + w * 16 + 16 <= n:
                        y[r, T.ramp(v * COLUMNS + w * 16, 1, 16)] = acc[w]
                    else:
                        lanes = T.decl_buffer((16,), "float32", scope="local")
                        lanes[T.ramp(0, 1, 16)] = acc[w]
                        for lane in range(16):
                            if v * COLUMNS + w * 16 + lane < n:
                                y[r, v * COLUMNS + w * 16 + lane] = lanes[lane]

    return kernel
