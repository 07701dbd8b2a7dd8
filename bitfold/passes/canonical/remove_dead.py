"""remove-dead: delete nodes, initializers, functions and opset imports nothing reads.

Guarantees: exact equivalence; the model's inputs and outputs are never changed. The work is onnx-ir's unused
removal passes (nodes and initializers, functions, opsets), counted here.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from bitfold.passes.registry import BitfoldPass, register


@register
class RemoveDead(BitfoldPass):
    """Remove nodes, initializers, functions and opset imports that no output depends on."""

    name = "remove-dead"
    family = "canonical"

    def rewrite(self, model: ir.Model) -> int:
        before = _sizes(model)
        for cleanup in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            cleanup(model)
        return sum(b - a for b, a in zip(before, _sizes(model), strict=True))


def _sizes(model: ir.Model) -> tuple[int, int, int, int]:
    nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    return nodes, len(model.graph.initializers), len(model.functions), len(model.opset_imports)
