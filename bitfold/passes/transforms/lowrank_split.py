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
import fnmatch

import numpy as np
import onnx_ir as ir

from bitfold.passes.initializers import add_initializer
from bitfold.passes.quant.cast_precision import ISLAND_KEY
from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.structure import Linear, linear
from bitfold.passes.transforms.weights import set_weight

LOWRANK_KEY = "bitfold.lowrank"


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
            scope = (node.name or "", node.metadata_props.get("namespace", ""))
            if any(fnmatch.fnmatchcase(s, p) for p in self.config.exclude for s in scope):
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
        x, y = mm.inputs[0], mm.outputs[0]
        dtype = lin.weight.dtype
        readers = list(y.uses())
        set_weight(graph, lin, lin.weight.astype(np.float64) - l1 @ l2, "residual")
        down = ir.node("MatMul", [x, add_initializer(graph, f"{mm.name}_lowrank_l1", l1.astype(dtype))], name=f"{mm.name}_lowrank_down")
        up = ir.node("MatMul", [down.outputs[0], add_initializer(graph, f"{mm.name}_lowrank_l2", l2.astype(dtype))], name=f"{mm.name}_lowrank_up")
        add = ir.node("Add", [y, up.outputs[0]], name=f"{mm.name}_lowrank_add")
        down.outputs[0].name, up.outputs[0].name = f"{y.name}_lowrank_down", f"{y.name}_lowrank"
        for node in (down, up, add):
            node.metadata_props[LOWRANK_KEY] = str(self.config.rank)
            self.stamp(node, [mm])
        for node in (down, up):
            node.metadata_props[ISLAND_KEY] = "float32"
        mm.metadata_props[LOWRANK_KEY] = "residual"
        self.stamp(mm, [mm])
        graph.insert_after(mm, [down, up, add])
        result = add.outputs[0]
        result.dtype, result.shape = y.dtype, y.shape
        for user, index in readers:
            user.replace_input_with(index, result)
        if y.is_graph_output():
            position = next(i for i, v in enumerate(graph.outputs) if v is y)
            name = y.name
            y.name, result.name = f"{name}_residual", name
            graph.outputs[position] = result
        else:
            result.name = f"{y.name}_split"
