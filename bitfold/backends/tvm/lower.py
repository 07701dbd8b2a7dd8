"""Prepare an onnx-ir model for TVM's ONNX importer (pure onnx-ir, no TVM calls).

1. Input shapes are fixed to the feeds' (the importer needs static shapes; one build per input signature).
2. Every node with a kernel (``bitfold.kernels``) whose weights are constants (or Transposes of constants, folded
   here), and that the kernel selects for the device, is renamed to the kernel's key (domain ``bitfold.tvm``, op
   type ``<domain>.<op>``): the importer ignores domains, so a unique op type is what routes it to bitfold's
   converter. Its attributes gain ``K`` (the activations' last dimension, once known) and int4 initializers are
   widened to int8 with ``storage_bits = 4`` (the importer cannot read int4 tensors).
3. Any other model-local function call (a bitfold op whose weights are computed, or without a kernel) is inlined
   into standard ops by onnx-ir's InlinePass, so every model still runs.
4. onnxscript's optimizer folds the shape subgraphs to constants and Constant nodes become initializers.
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


def prepare(model: ir.Model, shapes: Mapping[str, tuple[int, ...]], device: str = "cpu") -> tuple[ir.Model, int]:
    """A copy of ``model`` ready for import on ``device``, and the number of nodes routed to bitfold kernels."""
    model = clone(model)
    for value in model.graph.inputs:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
    widths = {}  # a kernel's K from the exported shapes ([batch, sequence, 576]) where inference cannot reach it anew
    for node in model.graph:
        x = node.inputs[0] if node.inputs else None
        if x is not None and x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int):
            widths[node.name] = int(x.shape[-1])
    for node in model.graph:  # symbolic shapes (inferred for other inputs) would hide the static ones: infer anew
        for value in node.outputs:
            if value.shape is not None and not value.shape.is_static():
                value.shape = None
    optimizer.optimize(model, inline=False)
    routed = sum(_route(node, device, widths.get(node.name)) for node in list(model.graph))
    if routed:
        model.opset_imports[DOMAIN] = 1
    common.InlinePass()(model)
    common.RemoveUnusedFunctionsPass()(model)
    optimizer.optimize(model)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    return model, routed


def _route(node: ir.Node, device: str, width: int | None = None) -> bool:
    entry = find(node.domain, node.op_type)
    if entry is None:
        return False
    inputs = list(node.inputs)
    present = [i for i in entry.weights if i < len(inputs) and inputs[i] is not None]
    constants = {i: _constant(inputs[i]) for i in present}
    if any(array is None for array in constants.values()):
        return False
    x = inputs[0]
    if x is None:
        return False
    static = x.shape is not None and x.shape.is_static()
    k = int(x.shape[-1]) if static else node.attributes.get_int("K", width)  # MatMulNBits states its K
    if k is None:
        return False
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    if entry.select is not None and not entry.select([constants.get(i) for i in range(len(inputs))], attrs, device):
        return False
    for i in present:
        if inputs[i].const_value is None:  # a transposed constant: the node reads the folded copy
            folded = ir.Value(name=f"{inputs[i].name}_folded", shape=ir.Shape(constants[i].shape), type=inputs[i].type,
                              const_value=ir.tensor(constants[i], name=f"{inputs[i].name}_folded"))  # fmt: skip
            node.graph.initializers.add(folded)
            node.replace_input_with(i, folded)
        elif inputs[i].dtype == ir.DataType.INT4:
            widened = constants[i].astype(np.int8)
            inputs[i].const_value = ir.tensor(widened, name=inputs[i].name)
            inputs[i].dtype = ir.DataType.INT8
            node.attributes["storage_bits"] = ir.AttrInt64("storage_bits", 4)
    node.attributes["K"] = ir.AttrInt64("K", k)
    node.op_type, node.domain = entry.key, DOMAIN
    node.version = None
    return True


def _constant(value: ir.Value) -> np.ndarray | None:
    """The value's array if it is a constant or the Transpose of one (onnxscript's optimizer leaves Transposes
    of tensors over its size limit, e.g. a tied LM head's embedding), else None."""
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.op_type != "Transpose" or producer.domain not in ("", "ai.onnx"):
        return None
    source = producer.inputs[0]
    if source is None or source.const_value is None:
        return None
    perm = producer.attributes.get("perm")
    return np.ascontiguousarray(np.transpose(source.const_value.numpy(), None if perm is None else list(perm.value)))
