"""remove-identity: remove ``Identity`` nodes and inference-mode ``Dropout`` nodes.

A ``Dropout`` is an identity when it is not in training mode (``training_mode`` absent or constant false) and its
optional mask output is unused; such Dropouts become Identity, then onnx-ir's ``IdentityEliminationPass`` removes
every Identity it can. Guarantees: exact equivalence. Leaves alone: Dropouts whose mask is read or whose training
mode is not a constant false; an Identity that links a graph input straight to a graph output (removing it would
change the model's signature).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass

from bitfold.passes.registry import BitfoldPass, register


@register
class RemoveIdentity(BitfoldPass):
    """Remove Identity nodes and Dropouts that are identities at inference."""

    name = "remove-identity"
    family = "canonical"

    def rewrite(self, model: ir.Model) -> int:
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type == "Dropout" and not node.domain and _is_inference_dropout(node):
                identity = ir.node("Identity", [node.inputs[0]], name=node.name)
                self.stamp(identity, [node])
                ir.convenience.replace_nodes_and_values(
                    node.graph, node, [node], [identity], [node.outputs[0]], [identity.outputs[0]]
                )
        before = _identity_count(model.graph)
        IdentityEliminationPass()(model)
        return before - _identity_count(model.graph)


def _is_inference_dropout(node: ir.Node) -> bool:
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return False
    if len(node.outputs) > 1 and node.outputs[1].is_graph_output():
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = ir.convenience.get_const_tensor(node.inputs[2])
        return mode is not None and not bool(mode.numpy())
    return True


def _identity_count(graph: ir.Graph) -> int:
    return sum(1 for node in ir.traversal.RecursiveGraphIterator(graph) if node.op_type == "Identity" and not node.domain)
