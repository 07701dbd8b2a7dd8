"""remove-identity: remove ``Identity`` nodes and inference-mode ``Dropout`` nodes.

A ``Dropout`` is an identity when it is not in training mode (``training_mode`` absent or constant false) and its
optional mask output is unused; such Dropouts become Identity, then every Identity ``y = Identity(x)`` that can go
goes: the readers of ``y`` read ``x`` instead and, when ``y`` is a graph output, ``x`` takes the name ``y`` (the
rules of onnx-ir's ``IdentityEliminationPass``). Guarantees: exact equivalence; every graph output keeps its name
and its value. Leaves alone: Dropouts whose mask is read or whose training mode is not a constant false; an
Identity whose output is a graph output and whose input is a graph input, an initializer or itself a graph output
(removing it would rename or merge the model's outputs).
"""

from __future__ import annotations

import onnx_ir as ir

from bitfold.passes.registry import BitfoldPass, register


@register
class RemoveIdentity(BitfoldPass):
    """Remove Identity nodes and Dropouts that are identities at inference."""

    name = "remove-identity"
    family = "canonical"

    def rewrite(self, model: ir.Model) -> int:
        count = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type == "Dropout" and not node.domain and _is_inference_dropout(node):
                identity = ir.node("Identity", [node.inputs[0]], name=node.name)
                self.stamp(identity, [node])
                ir.convenience.replace_nodes_and_values(
                    node.graph, node, [node], [identity], [node.outputs[0]], [identity.outputs[0]]
                )
                count += 1
        graphs = [model.graph, *model.functions.values()]
        for node in [node for graph in graphs for node in ir.traversal.RecursiveGraphIterator(graph)]:
            count += _eliminate(node)
        return count


def _is_inference_dropout(node: ir.Node) -> bool:
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return False
    if len(node.outputs) > 1 and node.outputs[1].is_graph_output():
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = ir.convenience.get_const_tensor(node.inputs[2])
        return mode is not None and not bool(mode.numpy())
    return True


def _eliminate(node: ir.Node) -> bool:
    """Remove ``y = Identity(x)``: ``y``'s readers read ``x``; a graph output ``y`` renames ``x`` to ``y``. Refused
    when ``y`` is a graph output and ``x`` cannot take its place (a graph input, an initializer or another graph
    output keeps its own name)."""
    if node.op_type != "Identity" or node.domain or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    source, target = node.inputs[0], node.outputs[0]
    if source is None:
        return False
    is_output = target.is_graph_output()
    if is_output and (source.is_graph_input() or source.is_initializer() or source.is_graph_output()):
        return False
    if source.shape is None:
        source.shape = target.shape
    if source.type is None:
        source.type = target.type
    ir.convenience.replace_all_uses_with(target, source, replace_graph_outputs=True)
    if is_output:
        source.name = target.name
    node.graph.remove(node, safe=True)
    return True
