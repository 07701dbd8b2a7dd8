"""AVX-512 VNNI microkernel for 4-bit weights with int8 activations (``MatMulNBits`` at ``accuracy_level = 4``),
written in TIR with explicit 16-lane vectors.

Activations are quantized per row and block of ``block_size`` inputs to int8 (symmetric, scale max|x| / 127,
rounded to nearest even), as ONNX Runtime does at that accuracy level. The codes (``nbits.int8_layout``) are stored
as int32[N / 64, K / 8, 4, 16]: word [v, o, t, l] belongs to output n = 64 v + 16 t + l, and its byte j holds the
codes of inputs 8 o + j (low nibble) and 8 o + 4 + j (high nibble). One 64-byte load thus gives, after a mask and a
shift, two vectors of unsigned bytes laid out exactly as ``vpdpbusd`` reads them (4 inputs per output lane), and
the activation operand is one broadcast int32 (4 signed bytes): per 128 weights one load, three bit operations and
two dot-product instructions, so the kernel is bound by the memory stream rather than by decoding. Per block the
int32 dots turn into floats once::

    Y[m, n] = C[blocks, 0, n] + Σ_g C[g, 0, n] · (s[m, g] · dot[m, g, n] − offset · d[m, g]) − C[g, 1, n] · d[m, g]

with s the activation scale, d = s · Σ_{k in g} q[m, k], C[g, 0] the weight scale, C[g, 1] the zero-point
correction (present when zero points differ from ``offset``) and C[blocks, 0] the bias. Each task owns 64 outputs
(a contiguous stream of 256 bytes of codes per 8 inputs, prefetched a page ahead); tasks run in parallel over the
cores.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

_DOT = "llvm.x86.avx512.vpdpbusd.512"

COLUMNS = 64
#: the codes a task reads this far ahead (in 8-input steps of 256 bytes: 4 KiB, one page) are prefetched; the
#: hardware prefetchers stop at page boundaries, and a cold 4096² GEMV took 1.4× longer without it
_AHEAD = 16


def available(target: tvm.target.Target) -> bool:
    from tvm.target import codegen

    return target.kind.name == "llvm" and codegen.llvm_cpu_has_features("avx512vnni", target)


def int4_kernel(m: int, k: int, n: int, block_size: int, blocks: int, offset: int, zero_points: bool) -> tvm.tirx.PrimFunc:
    """PrimFunc (x [m, k], w int32[ceil(n/64), blocks · block_size / 8, 4, 16], c [blocks + 1, 1 + zero_points,
    64 · ceil(n/64)], y [m, n])."""
    tiles = -(-n // COLUMNS)
    padded_k = blocks * block_size
    octets = block_size // 8
    corrections = 2 if zero_points else 1
    nibbles = T.broadcast(T.int32(0x0F0F0F0F), 16)

    @T.macro
    def quantize(x, xq, scale, shift):
        xf = T.decl_buffer((m * padded_k,), "float32")
        for r, i in T.grid(m, padded_k // 16):
            if i * 16 + 16 <= k:
                xf[T.ramp(r * padded_k + i * 16, 1, 16)] = x[r, T.ramp(i * 16, 1, 16)]
            else:
                for lane in range(16):
                    xf[r * padded_k + i * 16 + lane] = T.if_then_else(i * 16 + lane < k, x[r, T.min(i * 16 + lane, k - 1)], T.float32(0))
        for r, g in T.grid(m, blocks):
            top = T.decl_buffer((16,), "float32", scope="local")
            top[T.ramp(0, 1, 16)] = T.broadcast(T.float32(0), 16)
            for i in range(block_size // 16):
                top[T.ramp(0, 1, 16)] = T.max(top[T.ramp(0, 1, 16)], T.fabs(xf[T.ramp(r * padded_k + g * block_size + i * 16, 1, 16)]))
            for lane in range(1, 16):
                top[0] = T.max(top[0], top[lane])
            inverse = T.if_then_else(top[0] > T.float32(0), T.float32(127) / top[0], T.float32(0))
            sums = T.decl_buffer((16,), "int32", scope="local")
            sums[T.ramp(0, 1, 16)] = T.broadcast(0, 16)
            for i in range(block_size // 16):
                q = T.Cast("int32x16", T.nearbyint(xf[T.ramp(r * padded_k + g * block_size + i * 16, 1, 16)] * T.broadcast(inverse, 16)))
                xq[T.ramp(r * padded_k + g * block_size + i * 16, 1, 16)] = T.Cast("int8x16", q)
                sums[T.ramp(0, 1, 16)] = sums[T.ramp(0, 1, 16)] + q
            for lane in range(1, 16):
                sums[0] = sums[0] + sums[lane]
            scale[r * blocks + g] = top[0] / T.float32(127)
            shift[r * blocks + g] = top[0] / T.float32(127) * T.Cast("float32", sums[0])

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((m, k), "float32"), w: T.Buffer((tiles, padded_k // 8, 4, 16), "int32"), c: T.Buffer((blocks + 1, corrections, tiles * COLUMNS), "float32"), y: T.Buffer((m, n), "float32")):
        xq = T.decl_buffer((m * padded_k,), "int8")
        words = T.decl_buffer((m * padded_k // 4,), "int32", data=xq.data)
        scale = T.decl_buffer((m * blocks,), "float32")
        shift = T.decl_buffer((m * blocks,), "float32")
        quantize(x, xq, scale, shift)
        for v in T.parallel(tiles):
            acc = T.decl_buffer((m * 4,), "float32x16", scope="local")
            for r in range(m):
                for t in T.unroll(4):
                    acc[r * 4 + t] = c[blocks, 0, T.ramp(v * COLUMNS + t * 16, 1, 16)]
            for g, r in T.grid(blocks, m):
                dot = T.decl_buffer((8,), "int32x16", scope="local")
                for z in T.unroll(8):
                    dot[z] = T.broadcast(0, 16)
                for o in range(octets):
                    if r == 0:
                        for t in T.unroll(4):
                            T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(w[v, T.min(g * octets + o + _AHEAD, padded_k // 8 - 1), t, 0]), 0, 3, 1))
                    for t in T.unroll(4):
                        dot[t] = T.call_llvm_pure_intrin("int32x16", _DOT, dot[t], T.reinterpret("int8x64", w[v, g * octets + o, t, T.ramp(0, 1, 16)] & nibbles), T.reinterpret("int8x64", T.broadcast(words[(r * padded_k + g * block_size) // 4 + 2 * o], 16)))
                        dot[4 + t] = T.call_llvm_pure_intrin("int32x16", _DOT, dot[4 + t], T.reinterpret("int8x64", T.shift_right(w[v, g * octets + o, t, T.ramp(0, 1, 16)], T.broadcast(4, 16)) & nibbles), T.reinterpret("int8x64", T.broadcast(words[(r * padded_k + g * block_size) // 4 + 2 * o + 1], 16)))
                for t in T.unroll(4):
                    acc[r * 4 + t] = acc[r * 4 + t] + c[g, 0, T.ramp(v * COLUMNS + t * 16, 1, 16)] * (T.Cast("float32x16", dot[t] + dot[4 + t]) * T.broadcast(scale[r * blocks + g], 16) - T.broadcast(shift[r * blocks + g] * T.float32(offset), 16))
                    if zero_points:
                        acc[r * 4 + t] = acc[r * 4 + t] - c[g, corrections - 1, T.ramp(v * COLUMNS + t * 16, 1, 16)] * T.broadcast(shift[r * blocks + g], 16)
            for r in range(m):
                for t in T.unroll(4):
                    if v * COLUMNS + t * 16 + 16 <= n:
                        y[r, T.ramp(v * COLUMNS + t * 16, 1, 16)] = acc[r * 4 + t]
                    else:
                        lanes = T.decl_buffer((16,), "float32", scope="local")
                        lanes[T.ramp(0, 1, 16)] = acc[r * 4 + t]
                        for lane in range(16):
                            if v * COLUMNS + t * 16 + lane < n:
                                y[r, v * COLUMNS + t * 16 + lane] = lanes[lane]

    return kernel
