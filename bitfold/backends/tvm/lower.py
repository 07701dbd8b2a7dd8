"""Prepare an onnx-ir model for TVM's ONNX importer (pure onnx-ir, no TVM calls).

1. Input shapes are fixed to the feeds' (the importer needs static shapes; one build per input signature).
2. Every node with a kernel (``bitfold.kernels``) whose weights are constants is renamed to the kernel's key
   (domain ``bitfold.tvm``, op type ``<domain>.<op>``): the importer ignores domains, so a unique op type is what
   routes it to bitfold's converter. Its attributes gain ``K`` (the activations' last dimension, once known) and
   int4 initializers are widened to int8 with ``storage_bits = 4`` (the importer cannot read int4 tensors).
3. Any other model-local function call (a bitfold op whose weights are computed, or without a kernel) is inlined
   into standard ops by onnx-ir's InlinePass, so every model still runs.
4. onnxscript's optimizer folds the shape subgraphs to constants and Constant nodes become initializers.
5. A decode-sized MatMul (fewer than 4 activation rows) whose constant weight W [K, N] has rows 64 KiB or more apart
   (SmolLM2's tied LM head: 576 × 49152) reads W re-laid as column strips W' [N/256, K, 256]:
   ``Reshape(Transpose(MatMul(Unsqueeze(x, -3), W')))``, the same numbers, so each parallel task of the GEMV
   streams one contiguous strip instead of 576 reads a page apart (ORT's MLAS packs such weights the same way).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common
from onnxscript import optimizer

from bitfold.frontend.onnx_io import clone
from bitfold.kernels import find

DOMAIN = "bitfold.tvm"


def prepare(model: ir.Model, shapes: Mapping[str, tuple[int, ...]]) -> tuple[ir.Model, int]:
    """A copy of ``model`` ready for import, and the number of nodes routed to bitfold kernels."""
    model = clone(model)
    for value in model.graph.inputs:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
    optimizer.optimize(model, inline=False)
    routed = sum(_route(node) for node in list(model.graph))
    if routed:
        model.opset_imports[DOMAIN] = 1
    common.InlinePass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    optimizer.optimize(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    for node in [node for node in model.graph if _wide_gemv(node)]:
        _strip_weight(model.graph, node)
    return model, routed


#: a GEMV weight whose rows lie at least this far apart is re-laid as contiguous column strips
_STRIP_ROW_BYTES = 65536
_STRIP = 256


def _wide_gemv(node: ir.Node) -> bool:
    if node.op_type != "MatMul" or node.domain or len(node.inputs) != 2:
        return False
    x, w = node.inputs
    if w is None or w.const_value is None or w.dtype != ir.DataType.FLOAT or len(w.shape) != 2 or len(w.uses()) != 1:
        return False
    n = int(w.shape[1])
    shape = x.shape
    static = shape is not None and shape.is_static() and len(shape) >= 2
    return static and int(shape[-2]) < 4 and n * 4 >= _STRIP_ROW_BYTES and n % _STRIP == 0


def _strip_weight(graph: ir.Graph, node: ir.Node) -> None:
    x, w = node.inputs
    k, n = (int(d) for d in w.shape)
    strips = w.const_value.numpy().reshape(k, n // _STRIP, _STRIP).transpose(1, 0, 2)
    packed = ir.Value(name=f"{w.name}_strips", const_value=ir.tensor(np.ascontiguousarray(strips)))
    graph.register_initializer(packed)
    axes = ir.Value(name=f"{w.name}_strip_axis", const_value=ir.tensor(np.array([-3], np.int64)))
    graph.register_initializer(axes)
    rank = len(x.shape) + 1
    out_shape = ir.Value(name=f"{w.name}_strip_shape", const_value=ir.tensor(np.array([*x.shape[:-1], n], np.int64)))
    graph.register_initializer(out_shape)
    lifted = ir.node("Unsqueeze", [x, axes])
    product = ir.node("MatMul", [lifted.outputs[0], packed])
    perm = [*range(rank - 3), rank - 2, rank - 3, rank - 1]
    swapped = ir.node("Transpose", [product.outputs[0]], attributes={"perm": perm})
    joined = ir.node("Reshape", [swapped.outputs[0], out_shape])
    ir.convenience.replace_nodes_and_values(graph, node, [node], [lifted, product, swapped, joined], node.outputs, joined.outputs)
    if not w.uses():
        graph.initializers.pop(w.name)


def _route(node: ir.Node) -> bool:
    entry = find(node.domain, node.op_type)
    if entry is None:
        return False
    inputs = list(node.inputs)
    if any(i < len(inputs) and inputs[i] is not None and inputs[i].const_value is None for i in entry.weights):
        return False
    x = inputs[0]
    if x is None or x.shape is None or not x.shape.is_static():
        return False
    for i in entry.weights:
        if i < len(inputs) and inputs[i] is not None and inputs[i].dtype == ir.DataType.INT4:
            widened = inputs[i].const_value.numpy().astype(np.int8)
            inputs[i].const_value = ir.tensor(widened, name=inputs[i].name)
            inputs[i].dtype = ir.DataType.INT8
            node.attributes["storage_bits"] = ir.AttrInt64("storage_bits", 4)
    node.attributes["K"] = ir.AttrInt64("K", int(x.shape[-1]))
    node.op_type, node.domain = entry.key, DOMAIN
    node.version = None
    return True

