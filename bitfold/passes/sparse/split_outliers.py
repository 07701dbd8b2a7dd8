"""split-outliers: SqueezeLLM's dense-and-sparse weights: a sparse float16 side matrix of the largest weights plus
a dense low-bit rest (``bitfold.quant.sparse.dense_and_sparse``).

The top ``ratio`` of each MatMul/Gemm weight by magnitude stays float16; the rest is quantized to ``bits``-bit
symmetric integers with ``group_size`` scales fitted without the outliers (which no longer stretch the ranges),
rounded by the GPTQ loop (act-order; needs calibration) or, with ``gptq = false``, to nearest. ``solver =
"quantease"`` then runs QuantEase's outlier-aware coordinate descent (``bitfold.quant.quantease``) from that
solution: dense codes move on their grid and the outliers to their float16 optimum, never raising the layer
objective. Emitted as
``bitfold.DenseSparseMatMul`` (int4/int8 codes with blocked scales, plus the outliers in CSR; opset 21, raised if
older) or, with ``format = "fake"``, as the float sum. Guarantees: outliers are float16 values (the
weights themselves unless ``solver = "quantease"`` moved them), every other weight lies on its group's grid. Leaves alone: what ``bitfold.passes.multless.base`` leaves alone. The
report notes bits per weight: codes + fp32 scales + ratio · (16-bit value + 32-bit index) for the side matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from bitfold.ops import dense_sparse
from bitfold.passes.multless.base import Encoded, WeightPass
from bitfold.passes.registry import register
from bitfold.quant import sparse
from bitfold.quant.formats import format_from, granularity_from
from bitfold.quant.quantease import coordinate_descent


@dataclasses.dataclass(frozen=True)
class SplitOutliersConfig:
    ratio: float = dataclasses.field(default=0.005, metadata={"doc": "fraction of weights kept float16 in the sparse part"})
    bits: int = dataclasses.field(default=3, metadata={"doc": "bits of the dense part: 2, 3, 4 or 8"})
    group_size: int = dataclasses.field(default=128, metadata={"doc": "elements per scale along K; -1 per channel"})
    gptq: bool = dataclasses.field(default=True, metadata={"doc": "round the dense part with GPTQ (needs calibration)"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on node name, weight name or torch module scope"})
    keep_ends: bool = dataclasses.field(default=True, metadata={"doc": "leave layers reading a graph input and the head alone"})
    damp: float = dataclasses.field(default=0.01, metadata={"doc": "GPTQ: Hessian dampening, fraction of mean diag"})
    block_size: int = dataclasses.field(default=128, metadata={"doc": "GPTQ: columns per lazy-update block"})
    act_order: bool = dataclasses.field(default=True, metadata={"doc": "GPTQ: visit columns by decreasing Hessian diagonal"})
    sink_weight: float = dataclasses.field(default=1.0, metadata={"doc": "GPTQ: weight in H of each sequence's first token"})
    format: Literal["op", "fake"] = dataclasses.field(default="op", metadata={"doc": "op: bitfold.DenseSparseMatMul | fake: the float sum"})
    solver: Literal["gptq", "quantease"] = dataclasses.field(default="gptq", metadata={"doc": "quantease: then coordinate descent over the dense codes and the outlier values (QuantEase's outlier-aware variant; needs gptq)"})
    sweeps: int = dataclasses.field(default=20, metadata={"doc": "quantease: most coordinate-descent sweeps"})

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio < 0.5:
            raise ValueError("ratio must be in (0, 0.5)")
        if self.bits not in (2, 3, 4, 8):
            raise ValueError("bits must be 2, 3, 4 or 8")
        if not 0.0 < self.damp <= 1.0:
            raise ValueError("damp must be a number in (0, 1]")
        if self.solver == "quantease" and not self.gptq:
            raise ValueError("solver = \"quantease\" starts from the GPTQ rounding and needs calibration; set gptq = true")
        if self.sweeps < 0:
            raise ValueError("sweeps must be >= 0")


@register
class SplitOutliers(WeightPass):
    """Dense-and-sparse weights: float16 outliers plus a low-bit dense rest (SqueezeLLM), fake-quantized."""

    name = "split-outliers"
    family = "sparse"
    Config = SplitOutliersConfig

    @property
    def uses_hessian(self) -> bool:
        return self.config.gptq

    op = dense_sparse

    @property
    def emits_op(self) -> bool:
        return self.config.format == "op"

    def solve_node(self, node: ir.Node, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        c = self.config
        loop = self.loop
        fmt = format_from(f"int{c.bits}")
        q, outliers, scale = sparse.dense_and_sparse(wt, hessian, fmt, granularity_from(c.group_size), c.ratio, **loop)
        if c.solver == "quantease" and hessian is not None:
            h = np.asarray(hessian, np.float64)
            h = h + np.eye(len(h)) * c.damp * np.mean(np.abs(np.diag(h)))
            q, _ = coordinate_descent(wt, h, q, fmt, scale, np.zeros_like(scale), sweeps=c.sweeps, block_size=c.block_size,
                                      free=outliers)  # fmt: skip
            q = q.astype(np.float64)
        block = c.group_size if c.group_size > 0 else wt.shape[1]
        codes = np.where(outliers, 0, fmt.quantize(q, scale, np.zeros_like(scale)))
        tensors = dense_sparse.pack(codes.T, scale[:, ::block].T, np.where(outliers, q, 0.0).T, c.bits)
        dense = dense_sparse.unpack(*tensors, block).T.astype(np.float64)
        names = ("codes", "scale", "outliers", "outlier_cols", "outlier_rows")
        return Encoded(dense, dict(zip(names, tensors, strict=True)), {"block_size": block})

    def summary(self, count: int, bits: int, weights: int) -> str:
        c = self.config
        group = c.group_size if c.group_size > 0 else 1024
        ideal = c.bits + 32 / group + c.ratio * 48
        return f"{count} weights, {ideal:.3f} bits per weight (codes, scales, float16 outliers with 32-bit indices), {bits / weights:.3f} as stored"
