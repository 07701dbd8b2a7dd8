"""prune: zero weights of MatMul/Gemm (and Conv, without calibration statistics) by magnitude, Wanda or SparseGPT
under an unstructured, N:M or block pattern.

``pattern`` is ``unstructured:<ratio>``, ``nm:<N>:<M>`` (at most N non-zeros per M consecutive inputs of an
output, e.g. ``nm:2:4``) or ``block:<rows>x<cols>:<ratio>`` (whole tiles of outputs × inputs);
``overrides = ["<glob>=<pattern>", ...]`` sets another pattern for the layers a glob matches (node, weight or
torch module scope; first match wins). Methods (``bitfold.quant.sparse``): ``magnitude`` (per layer),
``wanda`` (|W|·‖X_j‖₂ within each output row; needs calibration), ``sparsegpt`` (OBS updates through the GPTQ
loop; needs calibration), which can quantize the kept weights in the same pass (``bits`` > 0: symmetric integers,
``group_size`` per scale, written back dequantized). ``refine_cycles`` swaps magnitude/Wanda mask entries, training-free
like DSnoT but scored by the exact layer error dᵀHd (unstructured layers; it needs the dense weights, so it lives
here rather than in a later pass);
``compensate_rank`` adds a float EoRA branch fitted to the pruning error (``bitfold.quant.eora``; MatMul and Gemm
layers only: a Conv gets no branch and a note). ``format = "masked"`` keeps the weights dense float with
zeros, which any runtime runs; ``format = "sparse"`` emits ``bitfold.SparseMatMul`` (compressed N:M layout:
values plus b-bit positions) for N:M layers, ``bitfold.CSRMatMul`` for unstructured ones and
``bitfold.BlockCSRMatMul`` for block patterns. Guarantees: the pattern holds exactly (every N:M group, the exact count of weights or tiles).
Leaves alone: what ``bitfold.passes.multless.base`` leaves alone (``exclude``, ``keep_ends``), Conv weights
under Wanda/SparseGPT. The report notes the zero fraction achieved.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Literal

import numpy as np
import onnx_ir as ir

from bitfold.ops import bitplanes, block_csr, csr
from bitfold.ops import sparse as sparse_op
from bitfold.passes.multless.base import Encoded, WeightPass
from bitfold.passes.registry import register
from bitfold.passes.transforms.weights import add_lowrank_branch
from bitfold.quant import sparse
from bitfold.quant.eora import eora
from bitfold.quant.formats import format_from, granularity_from


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    method: Literal["magnitude", "wanda", "sparsegpt"] = dataclasses.field(default="sparsegpt", metadata={"doc": "magnitude | wanda | sparsegpt"})
    pattern: str = dataclasses.field(default="unstructured:0.5", metadata={"doc": "unstructured:<ratio> | nm:<N>:<M> | block:<rows>x<cols>:<ratio>"})
    overrides: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "per-layer patterns, '<glob>=<pattern>'"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on node name, weight name or torch module scope"})
    keep_ends: bool = dataclasses.field(default=True, metadata={"doc": "leave layers reading a graph input and the head alone"})
    bits: int = dataclasses.field(default=0, metadata={"doc": "sparsegpt: also quantize kept weights to this many bits (0: no)"})
    group_size: int = dataclasses.field(default=128, metadata={"doc": "sparsegpt with bits: elements per scale; -1 per channel"})
    damp: float = dataclasses.field(default=0.01, metadata={"doc": "sparsegpt: Hessian dampening, fraction of mean diag"})
    block_size: int = dataclasses.field(default=128, metadata={"doc": "sparsegpt: columns per mask decision (unstructured)"})
    sink_weight: float = dataclasses.field(default=1.0, metadata={"doc": "weight in H of each sequence's first token (attention sink)"})
    refine_cycles: int = dataclasses.field(default=0, metadata={"doc": "mask swaps per row after magnitude/wanda that lower the layer error (unstructured; needs calibration)"})
    compensate_rank: int = dataclasses.field(default=0, metadata={"doc": "EoRA: rank of a float branch fitted to the pruning error (needs calibration)"})
    format: Literal["masked", "sparse"] = dataclasses.field(default="masked", metadata={"doc": "masked: dense with zeros | sparse: bitfold.SparseMatMul for N:M"})

    def __post_init__(self) -> None:
        if not 0.0 < self.damp <= 1.0:
            raise ValueError("damp must be a number in (0, 1]")
        self._check_packable(f"pattern '{self.pattern}'", sparse.parse_pattern(self.pattern))
        for item in self.overrides:
            glob, sep, pattern = item.partition("=")
            if not sep or not glob:
                raise ValueError(f"override '{item}' must read '<glob>=<pattern>'")
            self._check_packable(f"override '{item}'", sparse.parse_pattern(pattern))
        if self.refine_cycles < 0 or self.compensate_rank < 0:
            raise ValueError("refine_cycles and compensate_rank must be >= 0")
        if self.refine_cycles and self.method == "sparsegpt":
            raise ValueError("refine_cycles swaps a magnitude or wanda mask; SparseGPT already updates the kept weights")
        if self.bits and (self.method != "sparsegpt" or self.bits not in (2, 3, 4, 8)):
            raise ValueError("bits (joint quantization) is 2, 3, 4 or 8 and needs method = \"sparsegpt\"")

    def _check_packable(self, field: str, pattern: sparse.Pattern) -> None:
        """N:M positions are bit-plane codes (``bitfold.ops.bitplanes``): M may not exceed 2^8 in the sparse format."""
        limit = 1 << bitplanes.MAX_BITS
        if self.format == "sparse" and isinstance(pattern, sparse.NM) and pattern.m > limit:
            raise ValueError(f"{field} with format = \"sparse\" needs M <= {limit} (SparseMatMul stores "
                             f"positions in at most {bitplanes.MAX_BITS} bits); use M <= {limit} or format = \"masked\"")  # fmt: skip


@register
class Prune(WeightPass):
    """Zero weights by magnitude, Wanda or SparseGPT under unstructured, N:M or block patterns (dense, masked)."""

    name = "prune"
    family = "sparse"
    Config = PruneConfig

    @property
    def uses_hessian(self) -> bool:
        c = self.config
        return c.method != "magnitude" or c.refine_cycles > 0 or c.compensate_rank > 0

    op = sparse_op

    def __init__(self, config: PruneConfig | None = None, /, **params) -> None:
        super().__init__(config, **params)
        self._zeros = self._total = 0
        self._branches: dict[ir.Node, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def emits_op(self) -> bool:
        return self.config.format == "sparse"

    def rewrite(self, model: ir.Model) -> int:
        self._zeros = self._total = 0
        self._branches: dict[ir.Node, tuple[np.ndarray, np.ndarray]] = {}
        return super().rewrite(model)

    def pattern_for(self, node: ir.Node) -> sparse.Pattern:
        scope = (node.name or "", node.inputs[1].name or "", node.metadata_props.get("namespace", ""))
        for item in self.config.overrides:
            glob, _, pattern = item.partition("=")
            if any(fnmatch.fnmatchcase(s, glob) for s in scope):
                return sparse.parse_pattern(pattern)
        return sparse.parse_pattern(self.config.pattern)

    def solve_node(self, node: ir.Node, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        pattern, c = self.pattern_for(node), self.config
        if c.method == "sparsegpt":
            fmt = format_from(f"int{c.bits}") if c.bits else None
            pruned, mask = sparse.sparsegpt(wt, hessian, pattern, fmt=fmt, granularity=granularity_from(c.group_size),
                                            block=c.block_size, damp=c.damp)  # fmt: skip
        else:
            mask = sparse.select(sparse.scores(wt, hessian, c.method), pattern, per_row=c.method == "wanda")
            if c.refine_cycles and isinstance(pattern, sparse.Unstructured):
                mask = sparse.refine(wt, mask, hessian, c.refine_cycles)
            pruned = wt * mask
        if c.compensate_rank and node.op_type == "Conv":
            note = f"{node.name}: no low-rank compensation (its x·L1·L2 branch is a MatMul; a Conv reads NCHW)"
            self.notes += [] if note in self.notes else [note]
        elif c.compensate_rank:
            self._branches[node] = eora((wt - pruned).T, hessian, c.compensate_rank)
        self._zeros += int((~mask).sum())
        self._total += mask.size
        if self.emits_op and isinstance(pattern, sparse.NM):
            values, index = sparse_op.pack(pruned.T.astype(np.float32), pattern.n, pattern.m)
            return Encoded(pruned, {"values": values, "index": index}, {"n": pattern.n, "m": pattern.m}, sparse_op)
        if self.emits_op and isinstance(pattern, sparse.Unstructured):
            values, cols, pointers = csr.pack(pruned.T.astype(np.float32))
            return Encoded(pruned, {"values": values, "cols": cols, "rows": pointers}, {}, csr)
        if self.emits_op and isinstance(pattern, sparse.Block):
            values, cols, pointers = block_csr.pack(pruned.T.astype(np.float32), pattern.rows, pattern.cols)
            return Encoded(pruned, {"values": values, "cols": cols, "rows": pointers}, {"n": len(wt)}, block_csr)
        return Encoded(pruned, {})

    def fold(self, model: ir.Model, node: ir.Node, encoded: Encoded, w: np.ndarray) -> ir.Node:
        x = node.inputs[0]
        producer = super().fold(model, node, encoded, w)
        if node in self._branches:
            for added in add_lowrank_branch(model.graph, producer, x, *self._branches.pop(node)):
                self.stamp(added, [node])
        return producer

    def summary(self, count: int, bits: int, weights: int) -> str:
        return f"{count} weights, {self._zeros / self._total:.4f} of their elements zero"
