"""``ScheduleStandardOps``: a schedule for every PrimFunc Relax legalizes from standard ONNX ops on llvm, where
TVM's default CPU pipeline applies none (one SmolLM2 token ran 15× slower than ONNX Runtime unscheduled).

Per block at the root of a function, from its iteration kinds and read pattern (no op names):

- a reduction whose last spatial axis indexes the last dimension of one of its inputs (MatMul against a [K, N]
  weight), or with three or more spatial axes (convolutions: the last is the output row): the kernels' GEMV/GEMM
  schedule (``bitfold.kernels.schedule.gemv_cpu``): column tiles in parallel, reductions outside a block of
  rows × vectors of accumulators kept in registers;
- any other reduction (norms, softmax sums, A·Bᵀ products): spatial axes fused and run in parallel;
- an element-wise block: all axes fused, split into vector lanes, outer part parallel.

Blocks with little work stay serial (thread start-up would cost more). A primitive the block's structure does not
allow leaves that block as it was, so every function stays correct; functions a kernel scheduled already
(``tirx.is_scheduled``) are skipped.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, tirx

from bitfold.kernels.schedule import gemv_cpu, lanes

_PARALLEL_WORK = 16384


@tvm.transform.module_pass(opt_level=0, name="bitfold.ScheduleStandardOps")
class ScheduleStandardOps:
    def __init__(self, target: tvm.target.Target) -> None:
        self.width = lanes(target)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or bool(func.attrs and func.attrs.get("tirx.is_scheduled", False)):
                continue
            sch = s_tir.Schedule(func)
            try:
                roots = sch.get_child_blocks(sch.get_sblock("root"))
            except (RuntimeError, ValueError):  # a function without a root block: leave it
                continue
            for block in roots:
                _schedule_block(sch, block, self.width)
            updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def _schedule_block(sch: s_tir.Schedule, block, width: int) -> None:
    info = sch.get(block)
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in info.iter_vars]
    if len(loops) != len(kinds) or not loops:
        return
    extents = [int(sch.get(loop).extent) if isinstance(sch.get(loop).extent, tirx.IntImm) else 0 for loop in loops]
    if 0 in extents:
        return
    spatial = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == tirx.IterVar.DataPar]
    reduce = [loop for loop, kind in zip(loops, kinds, strict=True) if kind == tirx.IterVar.CommReduce]
    if len(spatial) + len(reduce) != len(loops) or loops[: len(spatial)] != spatial:
        return
    work = int(np.prod(extents))
    try:
        if reduce and spatial and extents[len(spatial) - 1] >= width and (_columns(info, len(spatial)) or len(spatial) >= 3):
            gemv_cpu(sch, block, width, parallel=work >= _PARALLEL_WORK)
        elif reduce:
            if spatial and work >= _PARALLEL_WORK:
                sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
        else:
            _elementwise(sch, spatial, width, work)
    except (RuntimeError, s_tir.ScheduleError):  # the block's structure forbids a primitive: keep it as is
        return


def _columns(info, n_spatial: int) -> bool:
    """Whether some input is read with the block's last spatial variable as its last index (contiguous lanes)."""
    last = info.iter_vars[n_spatial - 1].var
    for region in info.reads:
        index = region.region[-1].min if region.region else None
        if index is not None and isinstance(index, tirx.Var) and index.same_as(last):
            return True
    return False


def _elementwise(sch, spatial, width: int, work: int) -> None:
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    extent = int(sch.get(fused).extent)
    if extent < width:
        return
    outer, lane = sch.split(fused, [None, width])
    if work >= _PARALLEL_WORK:
        sch.parallel(outer)
    sch.vectorize(lane)
