"""``bitfold.DenseSparseMatMul``: a MatMul over a low-bit dense weight plus a sparse float16 outlier matrix
(SqueezeLLM's dense-and-sparse decomposition), in one op.

Schema (domain ``bitfold``, version 1)::

    Y = DenseSparseMatMul(X, Q, S, V, C, R, block_size)
    X: float[..., K]     Q: int4[K, N] or int8[K, N]     S: float[ceil(K / block_size), N]
    V: float16[nnz]      C: int32[nnz]   R: int32[N + 1]                 Y: float[..., N]

    W = DequantizeLinear(Q, S, axis=0, block_size) + CSR(V, C, R)

Q holds signed codes (symmetric, no zero point; 2–4-bit codes in int4 storage), S one scale per ``block_size``
inputs and output, exactly ONNX's blocked DequantizeLinear (opset 21); outlier positions have code 0 in Q. V, C, R
are the outliers in compressed sparse rows per output, as ``bitfold.CSRMatMul``. The function adds both parts into
one weight before its single MatMul (``bitfold.CSRDense`` re-materializes the outliers); a DequantizeLinear feeding
a MatMul directly would be fused by ONNX Runtime into a kernel that quantizes the activations. Cost: code bits + 32 / block_size per weight, plus 16 + 32 bits per outlier and 32 per output.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from onnxscript import FLOAT, FLOAT16, INT32, script
from onnxscript import opset21 as op
from onnxscript.onnx_types import TensorType
from onnxscript.values import Opset

from bitfold.ops import csr
from bitfold.ops.csr import CSRDense
from bitfold.ops.functions import DOMAIN, install

OP_TYPE = "DenseSparseMatMul"
MIN_OPSET = 21
_bitfold = Opset(DOMAIN, 1)


def pack(codes: np.ndarray, scale: np.ndarray, outliers: np.ndarray, bits: int) -> tuple[np.ndarray, ...]:
    """(Q, S, V, C, R) from codes [K, N] (0 at outliers), block scales [G, N] and the outlier matrix [K, N]."""
    container = ml_dtypes.int4 if bits <= 4 else np.int8
    values, cols, pointers = csr.pack(outliers)
    return np.asarray(codes).astype(container), np.asarray(scale, np.float32), values.astype(np.float16), cols, pointers


def unpack(q, s, v, c, r, block_size: int) -> np.ndarray:
    """The dense weight W [K, N], float32."""
    k = q.shape[0]
    scale = np.repeat(np.asarray(s, np.float64), block_size, axis=0)[:k]
    dense = np.asarray(q).astype(np.float64) * scale
    return (dense + csr.unpack(np.asarray(v, np.float64), c, r, k)).astype(np.float32)


def evaluate(x: np.ndarray, q, s, v, c, r, block_size: int) -> np.ndarray:
    """Numpy reference: the product with the unpacked weight."""
    return (x.astype(np.float64) @ unpack(q, s, v, c, r, block_size).astype(np.float64)).astype(x.dtype)


@script(_bitfold, default_opset=op)
def DenseSparseMatMul(X: FLOAT, Q: TensorType, S: FLOAT, V: FLOAT16, C: INT32, R: INT32, block_size: int) -> FLOAT:
    dense = op.DequantizeLinear(Q, S, axis=0, block_size=block_size)
    return op.MatMul(X, op.Add(dense, CSRDense(op.Cast(V, to=FLOAT.dtype), C, R, X)))


FUNCTION = DenseSparseMatMul.to_function_proto()


def ensure_function(model) -> None:
    """Add the op's ONNX functions and opset import to ``model`` (raising it to opset 21 if older; idempotent)."""
    install(model, [csr.ROWS_FUNCTION, csr.DENSE_FUNCTION, FUNCTION], min_opset=MIN_OPSET)
