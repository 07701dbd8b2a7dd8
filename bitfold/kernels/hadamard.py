"""``bitfold.Hadamard`` kernel: the fast Walsh–Hadamard transform, O(n log p) additions per row, then the small
orthogonal block B mixing the m sub-blocks (Y = Bᵀ · X · H_p / √p with X viewed as [m, p]).

Stages: with z_0 = x and h = 2^s, for s = 0 … log2(p) − 1::

    z_{s+1}[i] = bit s of i clear ? z_s[i] + z_s[i + h] : z_s[i − h] − z_s[i]

(each stage touches every element once, a butterfly on index pairs), then
``Y[a·p + b] = Σ_c B'[c, a] · z[c·p + b]`` with B' = B / √p (prepared once; for B = [[1]] a single scale).

CPU (``lowering``, TIR): rows run in parallel (a single row on the calling thread); a row is transformed in place in a scratch buffer that stays in L1.
The first four stages (butterflies inside 16-element chunks, which a 16-lane vector cannot do with contiguous
loads) are one product with the 16×16 Walsh matrix: 16 broadcast multiply-adds per chunk; the remaining stages are
in-place butterflies on whole vectors (two loads, an add, a subtract, two stores per 16 elements). CUDA (TE):
one thread block per row with the stages in shared memory when they fit (synchronized between stages), else one
thread per row with the stages in its local memory.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import tvm
from tvm import te, tirx
from tvm.script import tirx as T

from bitfold.kernels import Prepared, kernel, schedule

OP_TYPE = "Hadamard"
DOMAIN = "bitfold"
_SHARED_BYTES = 48 * 1024


def prepare(weights, attrs) -> Prepared:
    _, block = weights
    k = int(attrs["K"])
    m, _ = block.shape
    p = k // m
    if m * p != k or p & (p - 1):
        raise ValueError(f"last axis {k} is not {m} times a power of two")
    chunk = min(p, 16)
    scaled = (np.asarray(block, np.float64) / np.sqrt(p)).astype(np.float32)
    return Prepared((scaled, scipy.linalg.hadamard(chunk).astype(np.float32)), {"p": p}, k, k)


def lowering(prepared: Prepared, m: int, target: tvm.target.Target):
    if target.kind.name != "llvm":
        return None
    return _fwht(m, prepared.n, prepared.params["p"])


def _fwht(rows: int, n: int, p: int) -> tvm.tirx.PrimFunc:
    """In-place fast Walsh–Hadamard transform of each row, then the block mix (see the module docstring)."""
    q = min(p, 16)
    blocks = n // p
    wide = (p // q).bit_length() - 1  # stages after the first log2(q)
    rows_loop = T.parallel if rows > 1 else T.serial  # one row: no thread-pool launch (a few µs, the row's own cost)

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((rows, n), "float32"), block: T.Buffer((blocks, blocks), "float32"), walsh: T.Buffer((q, q), "float32"), y: T.Buffer((rows, n), "float32")):
        for r in rows_loop(rows):
            buf = T.decl_buffer((n,), "float32")
            for c in range(n // q):
                buf[T.ramp(c * q, 1, q)] = T.broadcast(T.float32(0), q)
                for j in T.unroll(q):
                    buf[T.ramp(c * q, 1, q)] = buf[T.ramp(c * q, 1, q)] + T.broadcast(x[r, c * q + j], q) * walsh[j, T.ramp(0, 1, q)]
            for s in range(wide):
                for a in range(n // (2 * (q << s))):
                    for b in range(q << s >> 4):
                        lo: T.float32x16 = buf[T.ramp(a * 2 * (q << s) + b * 16, 1, 16)]
                        hi: T.float32x16 = buf[T.ramp(a * 2 * (q << s) + (q << s) + b * 16, 1, 16)]
                        buf[T.ramp(a * 2 * (q << s) + b * 16, 1, 16)] = lo + hi
                        buf[T.ramp(a * 2 * (q << s) + (q << s) + b * 16, 1, 16)] = lo - hi
            for a, c0 in T.grid(blocks, p // q):
                for t in T.vectorized(q):
                    y[r, a * p + c0 * q + t] = T.float32(0)
                for c in range(blocks):
                    for t in T.vectorized(q):
                        y[r, a * p + c0 * q + t] = y[r, a * p + c0 * q + t] + block[c, a] * buf[c * p + c0 * q + t]

    return kernel


def compute(x: te.Tensor, arrays, p: int) -> te.Tensor:
    block = arrays[0]
    rows, n = (int(d) for d in x.shape)
    m = n // p
    z = x
    for s in range(p.bit_length() - 1):
        z = te.compute((rows, n), _butterfly(z, 1 << s, n), name=f"stage{s}")
    if m == 1:
        return te.compute((rows, n), lambda r, i: block[0, 0] * z[r, i], name="mix")
    c = te.reduce_axis((0, m), "c")
    return te.compute((rows, n), lambda r, i: te.sum(block[c, i // p] * z[r, c * p + i % p], axis=c), name="mix")


def _butterfly(z: te.Tensor, h: int, n: int):
    def stage(r, i):
        return te.if_then_else((i & h) == 0, z[r, tirx.min(i + h, n - 1)] + z[r, i], z[r, tirx.max(i - h, 0)] - z[r, i])

    return stage


def schedule_fwht(sch, names: list[str], target: tvm.target.Target) -> None:
    stages = [sch.get_sblock(name) for name in names if name.startswith("stage")]
    mix = sch.get_sblock("mix")
    loops = sch.get_loops(mix)
    row = loops[0]
    mixing = len(loops) == 3
    if schedule.is_cuda(target):
        _cuda(sch, stages, mix, mixing)
        return
    sch.parallel(row)
    for stage in reversed(stages):
        sch.compute_at(stage, row)
        sch.vectorize(sch.get_loops(stage)[-1])
    if mixing:
        i, c = sch.get_loops(mix)[1:]
        sch.reorder(c, i)
        sch.vectorize(i)
        init = sch.decompose_reduction(mix, c)
        sch.vectorize(sch.get_loops(init)[-1])
    else:
        sch.vectorize(sch.get_loops(mix)[-1])


def _cuda(sch, stages, mix, mixing: bool) -> None:
    loops = sch.get_loops(mix)
    n = int(sch.get(loops[1]).extent)
    if len(stages) * n * 4 <= _SHARED_BYTES:
        sch.bind(loops[0], "blockIdx.x")
        for stage in reversed(stages):
            sch.compute_at(stage, loops[0])
            sch.set_scope(stage, 0, "shared")
            sch.bind(sch.get_loops(stage)[-1], "threadIdx.x")
        sch.bind(loops[1], "threadIdx.x")
        return
    bx, tx = sch.split(loops[0], [None, 32])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    for stage in reversed(stages):
        sch.compute_at(stage, tx)
        sch.set_scope(stage, 0, "local")


KERNEL = kernel(DOMAIN, OP_TYPE, (1,), prepare, compute, schedule_fwht, lowering)
