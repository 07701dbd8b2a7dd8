"""AVX-512 lookup-table microkernel for bit-plane weights (``BCQMatMul``, ``BinaryMatMul``, ``TernaryMatMul``),
written in TIR with explicit 16-lane vectors.

For every four consecutive activations the kernel tabulates the 16 sums ``T[t] = Σ_{j<4} (bit j of t) · x[4c + j]``
(one 512-bit register). A plane byte holds the bits of eight inputs for one output; a vector of 16 outputs' bytes
gives two vectors of 4-bit indices, and ``vpermps`` looks up all 16 partial sums at once: two lookups and two adds
per 8 weights × 16 outputs, no multiplication. Per plane i and group h of inputs the selected sum s is combined as

    signs  (BCQ, binary):  y += A[i, h, n] · (2 · s − Σ_{k in h} x[k])        (bit set = +1, clear = −1)
    select (ternary):      y += A[i, h, n] · s

plus ``y += E[n] · Σ_k x[k]`` (a binary layer's per-output mean; zero for the others). Each task owns 64 outputs (four vectors: a whole cache line of
each plane row, prefetched ``_AHEAD`` steps ahead, and 4 · planes independent accumulators), tasks run in parallel
over the cores. Exact in fp32 up to
summation order. Used where the target has AVX-512 and N is a multiple of 64; elsewhere the TE kernels run.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

_PERMUTE = "llvm.x86.avx512.permvar.sf.512"
COLUMNS = 64
#: plane rows prefetched this many 8-input steps ahead: a task reads one 64-byte line per step and plane, N bytes
#: apart, so every line is on another page and the hardware prefetchers do not follow (cold 4096² GEMV: BCQ q3
#: 420 → 325 µs, binary 158 → 114 µs, ternary 307 → 211 µs)
_AHEAD = 16


def available(target: tvm.target.Target, n: int) -> bool:
    from tvm.target import codegen

    return target.kind.name == "llvm" and n % COLUMNS == 0 and codegen.llvm_cpu_has_features("avx512f", target)


def plane_kernel(m: int, k: int, n: int, planes: int, groups: int, group_bytes: int, a_dtype: str, signs: bool) -> tvm.tirx.PrimFunc:
    """PrimFunc (x [m, k], p [planes, ceil(k/8), n], a [planes, groups, n], e [n], y [m, n])."""
    chunks = -(-k // 8)
    nibbles = 2 * chunks
    two = 2.0 if signs else 1.0
    minus = 1.0 if signs else 0.0

    @T.macro
    def tabulate(x, table, sums):
        for r, c, t in T.grid(m, nibbles, 16):
            table[(r * nibbles + c) * 16 + t] = T.float32(0)
            for j in T.unroll(4):
                if 4 * c + j < k and (t >> j) & 1 == 1:
                    table[(r * nibbles + c) * 16 + t] = table[(r * nibbles + c) * 16 + t] + x[r, 4 * c + j]
        for r in range(m):
            sums[r * (groups + 1) + groups] = T.float32(0)
            for h in range(groups):
                sums[r * (groups + 1) + h] = T.float32(0)
                for i in range(group_bytes * 8):
                    if h * group_bytes * 8 + i < k:
                        sums[r * (groups + 1) + h] = sums[r * (groups + 1) + h] + x[r, h * group_bytes * 8 + i]
                sums[r * (groups + 1) + groups] = sums[r * (groups + 1) + groups] + sums[r * (groups + 1) + h]

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), "float32"), p: T.Buffer((planes, chunks, n), "uint8"), a: T.Buffer((planes, groups, n), a_dtype), e: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
        table = T.decl_buffer((m * nibbles * 16,), "float32")
        sums = T.decl_buffer((m * (groups + 1),), "float32")
        tabulate(x, table, sums)
        for v in T.parallel(n // 64):
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
                                    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(p[i, T.min(h * group_bytes + c + _AHEAD, chunks - 1), v * 64]), 0, 3, 1))
                            for i in T.unroll(planes):
                                for w in T.unroll(4):
                                    s[4 * i + w] = s[4 * i + w] + T.call_llvm_pure_intrin("float32x16", _PERMUTE, table[T.ramp((r * nibbles + 2 * (h * group_bytes + c)) * 16, 1, 16)], T.Cast("int32x16", p[i, h * group_bytes + c, T.ramp(v * 64 + w * 16, 1, 16)]) & T.broadcast(15, 16)) + T.call_llvm_pure_intrin("float32x16", _PERMUTE, table[T.ramp((r * nibbles + 2 * (h * group_bytes + c)) * 16 + 16, 1, 16)], T.shift_right(T.Cast("int32x16", p[i, h * group_bytes + c, T.ramp(v * 64 + w * 16, 1, 16)]), T.broadcast(4, 16)))
                    for i in T.unroll(planes):
                        for w in T.unroll(4):
                            acc[w] = acc[w] + T.Cast("float32x16", a[i, h, T.ramp(v * 64 + w * 16, 1, 16)]) * (s[4 * i + w] * T.broadcast(T.float32(two), 16) - T.broadcast(sums[r * (groups + 1) + h] * T.float32(minus), 16))
                for w in T.unroll(4):
                    y[r, T.ramp(v * 64 + w * 16, 1, 16)] = acc[w]

    return kernel
