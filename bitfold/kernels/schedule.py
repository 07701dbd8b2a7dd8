"""Schedules for the kernels' loop nests, by block name (see ``bitfold.kernels``), for llvm and CUDA.

CPU (llvm): every ``gemv`` block is split along its output axis N into tiles run in parallel over the cores; inside
a tile the reduction loops run outermost and the tile's columns innermost, vectorized to the target's width, so
each packed byte is loaded once per lane and each activation is a broadcast. The ``part`` blocks feeding it are
computed per group at that point (their buffers shrink to one tile). ``row`` and ``out`` blocks are fused,
vectorized and parallel over their flattened extent.

CUDA: one thread per output column (and row of activations) of a ``gemv`` block, consecutive threads on
consecutive outputs (coalesced weight loads), accumulators and ``part`` values in registers; ``row`` and ``out``
blocks are flat element-wise grids.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

_THREADS = 128


def is_cuda(target: tvm.target.Target) -> bool:
    return target.kind.name == "cuda"


def lanes(target: tvm.target.Target) -> int:
    """fp32 lanes of the llvm target's widest vector (at least 4)."""
    from tvm.target import codegen

    return max(4, codegen.llvm_get_vector_width(target) // 32)


def blocks(sch: s_tir.Schedule, names: list[str], prefix: str) -> list:
    return [sch.get_sblock(name) for name in names if name.startswith(prefix)]


def _reduce_count(sch, block) -> int:
    return sum(1 for iv in sch.get(block).iter_vars if iv.iter_type == tirx.IterVar.CommReduce)


def _split_tail(sch, loop, factor: int):
    extent = int(sch.get(loop).extent)
    if extent <= factor:
        return None, loop
    return sch.split(loop, [None, factor])


def apply(sch: s_tir.Schedule, names: list[str], target: tvm.target.Target, tile: int = 64) -> s_tir.Schedule:
    """Schedule the blocks ``names`` (the kernel's compute stages) in ``sch`` for ``target``."""
    if is_cuda(target):
        _cuda(sch, names)
    else:
        _cpu(sch, names, lanes(target), tile)
    return sch


# ---- llvm ---------------------------------------------------------------------------------------------------------


def _cpu(sch, names, width: int, tile: int) -> None:
    for gemv in blocks(sch, names, "gemv"):
        parts = [p for p in sch.get_producers(gemv) if sch.get(p).name_hint.startswith("part")]
        loops = sch.get_loops(gemv)
        reduce = _reduce_count(sch, gemv)
        spatial, reductions = loops[: len(loops) - reduce], loops[len(loops) - reduce :]
        n = spatial[-1]
        extent = int(sch.get(n).extent)
        vec = min(width, extent)
        outer, sub, inner = sch.split(n, [None, max(1, min(tile, extent) // vec), vec])
        sch.reorder(outer, *spatial[:-1], *reductions, sub, inner)
        sch.parallel(outer)
        for part in parts:
            sch.compute_at(part, sub)
            _vector_part(sch, part)
        sch.vectorize(inner)
        if reductions:
            sch.decompose_reduction(gemv, reductions[0])
    for prefix in ("row", "out"):
        for block in blocks(sch, names, prefix):
            _flat_cpu(sch, block, width)


def _vector_part(sch, part) -> None:
    loops = sch.get_loops(part)
    reduce = _reduce_count(sch, part)
    if not reduce:
        sch.vectorize(loops[-1])
        return
    lane, reds = loops[-reduce - 1], loops[-reduce:]
    sch.reorder(*reds, lane)
    sch.vectorize(lane)
    inner = reds[-1]
    if int(sch.get(inner).extent) <= 16:
        sch.unroll(inner)
    else:
        _, unit = sch.split(inner, [None, 4])
        sch.unroll(unit)
        reduce += 1
    init = sch.decompose_reduction(part, sch.get_loops(part)[-reduce - 1])
    sch.vectorize(sch.get_loops(init)[-1])


def _flat_cpu(sch, block, width: int) -> None:
    loops = sch.get_loops(block)
    reduce = _reduce_count(sch, block)
    spatial = loops[: len(loops) - reduce]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    if reduce:
        sch.parallel(fused)
        return
    outer, inner = _split_tail(sch, fused, width)
    if outer is not None:
        sch.parallel(outer)
    sch.vectorize(inner)


# ---- cuda ---------------------------------------------------------------------------------------------------------


def _cuda(sch, names) -> None:
    for gemv in blocks(sch, names, "gemv"):
        parts = [p for p in sch.get_producers(gemv) if sch.get(p).name_hint.startswith("part")]
        loops = sch.get_loops(gemv)
        reduce = _reduce_count(sch, gemv)
        spatial = loops[: len(loops) - reduce]
        fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
        bx, tx = sch.split(fused, [None, _THREADS])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
        local = sch.cache_write(gemv, 0, "local")
        sch.reverse_compute_at(local, tx)
        inner = sch.get_loops(gemv)[-1]
        for part in parts:
            sch.compute_at(part, inner)
            sch.set_scope(part, 0, "local")
        if reduce:
            sch.decompose_reduction(gemv, sch.get_loops(gemv)[2])
    for prefix in ("row", "out"):
        for block in blocks(sch, names, prefix):
            _flat_cuda(sch, block)


def _flat_cuda(sch, block) -> None:
    loops = sch.get_loops(block)
    reduce = _reduce_count(sch, block)
    spatial = loops[: len(loops) - reduce]
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, _THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
