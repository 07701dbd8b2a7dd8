"""Installing bitfold ops' ONNX functions into a model, so any ONNX runtime can execute it."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript.version_converter

from bitfold.errors import BitfoldError

DOMAIN = "bitfold"
#: Function bodies use ops whose semantics are unchanged from opset 18 on (BitwiseAnd is new in 18).
MIN_OPSET = 18


def install(model: ir.Model, functions: list[onnx.FunctionProto], min_opset: int = MIN_OPSET) -> None:
    """Add ``functions`` and the ``bitfold`` opset import to ``model`` (idempotent), raising its opset to
    ``min_opset`` if older. Each function body imports the model's own default opset."""
    model.opset_imports.setdefault(DOMAIN, 1)
    model.graph.opset_imports.setdefault(DOMAIN, 1)
    version = model.opset_imports.get("", 1)
    if version < min_opset:
        upgrade_opset(model, min_opset)
        version = min_opset
    for proto in functions:
        function = ir.serde.deserialize_function(proto)
        function.opset_imports[""] = version
        model.functions.setdefault(function.identifier(), function)


#: Ops whose ``axes`` attribute became an input at opset 18.
_AXES_INPUT_AT_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
                     "ReduceProd", "ReduceSumSquare"}  # fmt: skip
#: The oldest opset :func:`upgrade_opset` converts from (older ones changed Split, Squeeze, ReduceSum... too).
OLDEST_UPGRADABLE = 13


def upgrade_opset(model: ir.Model, version: int) -> None:
    """Raise ``model``'s default opset to ``version`` in place (nodes and values stay the same objects).

    onnxscript's version converter raises the opset (and, as a side effect, inlines local functions and drops
    unused nodes); from below 18 the reduce ops listed in ``_AXES_INPUT_AT_18`` get their ``axes`` attribute
    moved to an int64 initializer input, and an equal ``Split`` (no ``split`` input) its ``num_outputs`` attribute,
    here, which that converter leaves undone. Models older than
    ``OLDEST_UPGRADABLE`` are refused with a :class:`BitfoldError`.
    """
    current = model.opset_imports.get("", 1)
    if current >= version:
        return
    if current < OLDEST_UPGRADABLE:
        raise BitfoldError(
            f"the model imports ONNX opset {current}, older than {OLDEST_UPGRADABLE}; upgrade the model to opset {version} first "
            f"(onnx.version_converter.convert_version)"
        )
    if current < 18 <= version:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type in _AXES_INPUT_AT_18 and "axes" in node.attributes:
                _axes_to_input(node)
            elif node.op_type == "Split" and (len(node.inputs) < 2 or node.inputs[1] is None) and "num_outputs" not in node.attributes:
                # an equal split into as many parts as outputs: opset 18 says so with num_outputs
                node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))
    onnxscript.version_converter.convert_version(model, version)


def _axes_to_input(node: ir.Node) -> None:
    """Move a reduce node's ``axes`` attribute to its second input, an int64 initializer of ``node``'s graph."""
    axes = node.attributes.pop("axes").as_ints()
    graph = node.graph
    base = f"{node.name or node.outputs[0].name}_axes"
    name, i = base, 1
    taken = set(graph.initializers) | {v.name for v in graph.inputs} | {v.name for n in graph for v in n.outputs}
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    tensor = ir.tensor(list(axes), dtype=ir.DataType.INT64, name=name)
    value = ir.Value(name=name, shape=ir.Shape([len(axes)]), type=ir.TensorType(ir.DataType.INT64), const_value=tensor)
    graph.register_initializer(value)
    node.resize_inputs(2)
    node.replace_input_with(1, value)
