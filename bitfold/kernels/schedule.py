"""Schedules for the kernels' loop nests, by block name (see ``bitfold.kernels``), for llvm and CUDA.

CPU (llvm): every ``gemv`` block is split along its output axis N into tiles (``tile``) run in parallel over the
cores; inside a tile the reduction loops run outermost and the tile's columns innermost, vectorized to the target's
width, so each packed byte is loaded once per lane and each activation is a broadcast. A step computes a block of
up to four activation rows × column vectors, eight accumulators in all (independent running sums keep the loop
bound by loads and arithmetic rather than by one add's latency, and each decoded weight vector serves every row);
``part`` blocks are computed per group at that point, a ``gemv`` without parts accumulates in a local buffer.
``row`` and ``out`` blocks are fused, vectorized and parallel over their flattened extent.

CUDA: one thread per output column (and row of activations) of a ``gemv`` block, consecutive threads on
consecutive outputs (coalesced weight loads), accumulators and ``part`` values in registers; ``row`` and ``out``
blocks are flat element-wise grids.
"""

from __future__ import annotations

import os

import tvm
from tvm import s_tir, tirx

_THREADS = 128
#: accumulator vectors per tile step, rows × column vectors (independent sums hide the add latency; 8 leaves
#: registers for the decoded weights)
_ACCUMULATORS = 8
#: accumulator vectors of a GEMM step (plain weights, nothing to decode: AVX-512 has 32 vector registers)
_GEMM_ACCUMULATORS = 16
#: a GEMM copies each column strip of its weight contiguous first when the weight's rows are this far apart
_STRIP_ROW_BYTES = 65536
#: ... and it has at least this many strips (one parallel task each)
_STRIP_TASKS = 32


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


def tile(extent: int) -> int:
    """Output columns per parallel task: 256 (1 KiB of fp32 per weight row, long enough for the hardware
    prefetchers: a 4096² fp32 GEMV streams 29 GB/s here against 6 GB/s with 16 columns), fewer when that would
    leave a core idle; a multiple of 16 (every vector width), the whole axis when it is narrower."""
    cores = os.cpu_count() or 1
    return min(extent, max(16, min(256, extent // (2 * cores)) // 16 * 16))


def apply(sch: s_tir.Schedule, names: list[str], target: tvm.target.Target) -> s_tir.Schedule:
    """Schedule the blocks ``names`` (the kernel's compute stages) in ``sch`` for ``target``."""
    if is_cuda(target):
        _cuda(sch, names)
    else:
        _cpu(sch, names, lanes(target))
    return sch


# ---- llvm ---------------------------------------------------------------------------------------------------------


def _cpu(sch, names, width: int) -> None:
    for gemv in blocks(sch, names, "gemv"):
        parts = [p for p in sch.get_producers(gemv) if sch.get(p).name_hint.startswith("part")]
        gemv_cpu(sch, gemv, width, parts)
    for prefix in ("row", "out"):
        for block in blocks(sch, names, prefix):
            _flat_cpu(sch, block, width)


def gemv_cpu(sch, gemv, width: int, parts=(), parallel: bool = True) -> None:
    """The CPU schedule of one reduction block whose last spatial axis is the output columns (contiguous in its
    weights), the rows taken from the axis before them (a GEMM's M). Column tiles, leading (batch) axes and row
    blocks are fused into one parallel loop, column tile outermost so the tasks of one core share a weight tile.

    A GEMV (or a kernel decoding its weights in ``parts``) runs the reductions outside the tile's column vectors:
    each weight row of the tile is one contiguous read, the tile's sums stay in L1. A GEMM (a row block of 4 or
    more, plain weights) runs them inside: ``rows × chains`` accumulator vectors stay in registers over the whole
    reduction and each weight vector loaded serves every row of the block. A GEMM whose weight rows lie far apart
    (``_strip``) runs one task per column strip (and batch index) instead, which first copies its strip of the
    weight contiguous (the copy's buffer compacts to K × strip when lowered) and then runs every row block on it."""
    loops = sch.get_loops(gemv)
    reduce = _reduce_count(sch, gemv)
    spatial, reductions = loops[: len(loops) - reduce], loops[len(loops) - reduce :]
    extent = int(sch.get(spatial[-1]).extent)
    vec = min(width, extent)
    rows = _row_block(int(sch.get(spatial[-2]).extent)) if len(spatial) > 1 else 1
    gemm = rows >= 4 and not parts and bool(reductions)
    if gemm:
        vectors = max(1, _gemm_tile(extent, vec) // vec)
        rows, chains = _gemm_block(int(sch.get(spatial[-2]).extent), vectors)
    else:
        vectors = max(1, tile(extent) // vec)
        chains = max(1, _ACCUMULATORS // rows)
        while vectors % chains:
            chains //= 2
    strip = _strip(sch, gemv, extent, vectors * vec) if gemm else None
    outer, sub, chain, inner = sch.split(spatial[-1], [None, vectors // chains, chains, vec])
    if len(spatial) > 1:
        row_outer, row_inner = sch.split(spatial[-2], [None, rows])
        steps = [sub, *reductions] if gemm else [*reductions, sub]
        sch.reorder(outer, *spatial[:-2], row_outer, *steps, row_inner, chain, inner)
        task = sch.fuse(outer, *spatial[:-2]) if strip is not None else sch.fuse(outer, *spatial[:-2], row_outer)
        if strip is not None:  # one task per column strip: copy it contiguous once, then every row block reads it
            packed = sch.cache_read(gemv, strip, "global")
            sch.compute_at(packed, task)
            _vectorize_last(sch, packed)
    else:
        row_inner = None
        sch.reorder(outer, *reductions, sub, chain, inner)
        task = outer
    if parallel:
        sch.parallel(task)
    for part in parts:
        sch.compute_at(part, sub)
        _vector_part(sch, part, vec, len(reductions) + 2)
    if reductions and not parts:
        cached = sch.cache_write(gemv, 0, "local")
        sch.reverse_compute_at(cached, sub if gemm else task)
        _vectorize_last(sch, cached)
    if row_inner is not None:
        sch.unroll(row_inner)
    sch.unroll(chain)
    sch.vectorize(inner)
    if reductions:
        init = sch.decompose_reduction(gemv, reductions[0])
        _vectorize_last(sch, init)


def _gemm_tile(extent: int, vec: int) -> int:
    """Output columns per GEMM task: the widest multiple of ``vec`` up to 256 dividing the columns (row blocks
    give the parallelism, so the tile need not be narrow), else the GEMV tile."""
    fits = [c for c in range(vec, min(extent, 256) + 1, vec) if extent % c == 0]
    return fits[-1] if fits else tile(extent)


def _strip(sch, gemv, columns: int, width: int) -> int | None:
    """The read index of a GEMM's weight when its column strips are worth copying contiguous first: rows of at
    least ``_STRIP_ROW_BYTES`` (every reduction step of a strip would touch a new page) and at least
    ``_STRIP_TASKS`` strips to run in parallel (the strips alone give the parallelism); else None."""
    if columns * 4 < _STRIP_ROW_BYTES or columns // width < _STRIP_TASKS:
        return None
    info = sch.get(gemv)
    last = info.iter_vars[sum(1 for iv in info.iter_vars if iv.iter_type == tirx.IterVar.DataPar) - 1].var
    found = [i for i, region in enumerate(info.reads) if len(region.region) == 2
             and isinstance(region.region[-1].min, tirx.Var) and region.region[-1].min.same_as(last)]  # fmt: skip
    return found[0] if len(found) == 1 else None


def _gemm_block(rows: int, vectors: int) -> tuple[int, int]:
    """Rows × column vectors of a GEMM step: the most accumulators (up to ``_GEMM_ACCUMULATORS``), 8 rows before 4
    on a tie (each weight vector loaded from L2 then serves 8 rows). ``rows`` is a multiple of 4."""
    _, r, c = max((r * c, r, c) for r in (8, 4) if rows % r == 0 for c in range(1, vectors + 1)
                  if vectors % c == 0 and r * c <= _GEMM_ACCUMULATORS)  # fmt: skip
    return r, c


def _row_block(rows: int) -> int:
    """Activation rows computed together (each decoded weight vector reused that many times)."""
    if rows <= 4:
        return rows
    return 4 if rows % 4 == 0 else 2 if rows % 2 == 0 else 1


def _vectorize_last(sch, block) -> None:
    sch.vectorize(sch.get_loops(block)[-1])


def _vector_part(sch, part, width: int, depth: int) -> None:
    """Loops of a part block computed ``depth`` loops deep: reductions outside, then its rows and column vectors
    unrolled (independent accumulators sharing each decoded weight vector), the lanes vectorized."""
    own = sch.get_loops(part)[depth:]
    reduce = _reduce_count(sch, part)
    spatial, reds = own[: len(own) - reduce], own[len(own) - reduce :]
    rows = spatial[0] if len(spatial) > 1 else None
    chain, lane = sch.split(spatial[-1], [None, width])
    sch.reorder(*reds, *([rows] if rows is not None else []), chain, lane)
    if rows is not None:
        sch.unroll(rows)
    sch.unroll(chain)
    sch.vectorize(lane)
    for loop in reversed(reds):
        if int(sch.get(loop).extent) <= 8:
            sch.unroll(loop)
            continue
        _, unit = sch.split(loop, [None, 4])
        sch.unroll(unit)
        reduce += 1
        break
    tail = 2 + (rows is not None)  # loops after the reductions: rows, chain, lane
    init = sch.decompose_reduction(part, sch.get_loops(part)[-reduce - tail])
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
        tx = _grid(sch, loops[: len(loops) - reduce])
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
    _grid(sch, loops[: len(loops) - _reduce_count(sch, block)])


def _grid(sch, spatial):
    """Fuse the spatial loops into one flat grid of thread blocks; returns the thread loop."""
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    bx, tx = sch.split(fused, [None, _THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return tx
