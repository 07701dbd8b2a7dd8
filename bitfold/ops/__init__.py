"""bitfold's custom-op domain ``bitfold``: one module per op, each with its schema, numpy reference and ONNX
function (so any ONNX runtime executes a bitfold model)."""

from bitfold.ops import hadamard

__all__ = ["hadamard"]
