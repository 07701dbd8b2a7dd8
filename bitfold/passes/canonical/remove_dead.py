"""remove-dead: delete nodes, initializers, functions and opset imports nothing reads.

Guarantees: exact equivalence; the model's inputs and outputs are never changed. The work is onnx-ir's unused
removal passes (nodes and initializers, functions, opsets), counted here. Besides deleting, the node removal trims
the nodes it keeps: trailing empty inputs, unread optional outputs, and a ``training_mode = 0`` attribute on
``BatchNormalization`` (the default); each node it trims counts as one rewrite.
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
        count = 0
        for cleanup in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            sizes, faces = _sizes(model), _faces(model)
            result = cleanup(model)
            after = _faces(model)
            changes = sum(b - a for b, a in zip(sizes, _sizes(model), strict=True))
            changes += sum(1 for node, face in faces.items() if node in after and after[node] != face)
            count += changes if changes or not result.modified else 1
        return count


def _nodes(model: ir.Model) -> list[ir.Node]:
    graphs = [model.graph, *model.functions.values()]
    return [node for graph in graphs for node in ir.traversal.RecursiveGraphIterator(graph)]


def _sizes(model: ir.Model) -> tuple[int, int, int, int]:
    return len(_nodes(model)), len(model.graph.initializers), len(model.functions), len(model.opset_imports)


def _faces(model: ir.Model) -> dict[ir.Node, tuple]:
    """Per node: its input count, output names and attribute names (what the node removal trims on kept nodes)."""
    return {
        node: (len(node.inputs), tuple(v.name for v in node.outputs), tuple(node.attributes)) for node in _nodes(model)
    }
