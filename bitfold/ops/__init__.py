"""bitfold's custom-op domain ``bitfold``: one module per op, each with its schema, numpy reference and ONNX
function (so any ONNX runtime executes a bitfold model)."""

from bitfold.ops import bcq, binary, bitplanes, block_csr, csr, dense_sparse, functions, hadamard, shift, sparse, ternary

__all__ = ["bcq", "binary", "bitplanes", "block_csr", "csr", "dense_sparse", "functions", "hadamard", "shift", "sparse", "ternary"]
