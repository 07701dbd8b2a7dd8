"""lowrank-split: SVDQuant's split of a weight into a float low-rank branch and a residual to quantize.

For a linear y = x·W ([K, N]) and rank r, with the SVD W = U Σ Vᵀ,

    L1 = U_r Σ_r^½  [K, r],   L2 = Σ_r^½ V_rᵀ  [r, N],   R = W - L1·L2,     y = x·R + (x·L1)·L2

The two branch MatMuls carry ``bitfold.precision = "float32"``: later quantizers (``quantize-weights``,
``quantize-tokens``, ``cast-precision``) leave them alone, so only R (whose largest singular directions are gone)
and its input get quantized. Run after ``smooth`` as SVDQuant does: smoothing moves activation outliers into W,
and the branch absorbs them. Guarantees: exact equivalence up to fp32 rounding (R + L1·L2 = W). Needs: nothing.
Leaves alone: weights with min(K, N) <= 2r (the branch would cost as much as the weight), excluded ones, and
weights already split (a rerun is a no-op). Costs r·(K + N) float parameters per linear.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bitfold.passes.registry import ISLAND_KEY, BitfoldPass, register
from bitfold.passes.transforms.structure import Linear, linear, matches
from bitfold.passes.transforms.weights import LOWRANK_KEY, add_lowrank_branch, set_weight


@dataclasses.dataclass(frozen=True)
class LowrankSplitConfig:
    rank: int = dataclasses.field(default=32, metadata={"doc": "rank r of the float branch"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on node name or torch module scope"})

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError("rank must be at least 1")


@register
class LowrankSplit(BitfoldPass):
    """W = L1·L2 + R with a float rank-r branch; R is left for a quantizer."""

    name = "lowrank-split"
    family = "transforms"
    Config = LowrankSplitConfig

    def rewrite(self, model: ir.Model) -> int:
        targets = self.collect(model.graph)
        for lin in targets:
            l1, l2 = self.solve(lin.weight.astype(np.float64), self.config.rank)
            self.fold(model.graph, lin, l1, l2)
        return len(targets)

    def collect(self, graph: ir.Graph) -> list[Linear]:
        found = []
        for node in graph:
            if LOWRANK_KEY in node.metadata_props or node.metadata_props.get(ISLAND_KEY) == "float32":
                continue
            lin = linear(node)
            if lin is None or min(lin.weight.shape) <= 2 * self.config.rank:
                continue
            if matches(node, self.config.exclude):
                continue
            found.append(lin)
        return found

    @staticmethod
    def solve(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(L1 [K, r], L2 [r, N]) with L1·L2 the best rank-r approximation of w."""
        u, sigma, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(sigma[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank]

    def fold(self, graph: ir.Graph, lin: Linear, l1: np.ndarray, l2: np.ndarray) -> None:
        mm = lin.matmul
        set_weight(graph, lin, lin.weight.astype(np.float64) - l1 @ l2, "residual")
        for node in add_lowrank_branch(graph, mm, mm.inputs[0], l1, l2):
            self.stamp(node, [mm])
        mm.metadata_props[LOWRANK_KEY] = "residual"
        self.stamp(mm, [mm])
