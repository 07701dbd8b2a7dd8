"""Installing bitfold ops' ONNX functions into a model, so any ONNX runtime can execute it."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript

DOMAIN = "bitfold"
#: Function bodies use ops whose semantics are unchanged from opset 18 on (BitwiseAnd is new in 18).
MIN_OPSET = 18


def install(model: ir.Model, functions: list[onnx.FunctionProto], min_opset: int = MIN_OPSET) -> None:
    """Add ``functions`` and the ``bitfold`` opset import to ``model`` (idempotent), raising its opset to
    ``min_opset`` if older. Each function body imports the model's own default opset."""
    version = model.opset_imports.get("", 1)
    if version < min_opset:
        onnxscript.version_converter.convert_version(model, min_opset)
        version = min_opset
    for proto in functions:
        function = ir.serde.deserialize_function(proto)
        function.opset_imports[""] = version
        model.functions.setdefault(function.identifier(), function)
    model.opset_imports.setdefault(DOMAIN, 1)
    model.graph.opset_imports.setdefault(DOMAIN, 1)
