"""Random instances of every op a kernel lowers: (kernel, op inputs after X, attributes, numpy reference)."""

from __future__ import annotations

import numpy as np

from bitfold.kernels import bcq as k_bcq
from bitfold.kernels import binary as k_binary
from bitfold.kernels import csr as k_csr
from bitfold.kernels import dense as k_dense
from bitfold.kernels import hadamard as k_hadamard
from bitfold.kernels import nbits as k_nbits
from bitfold.kernels import shift as k_shift
from bitfold.kernels import sparse as k_sparse
from bitfold.kernels import ternary as k_ternary
from bitfold.ops import (
    bcq,
    binary,
    block_csr,
    csr,
    dense_sparse,
    hadamard,
    shift,
    sparse,
    ternary,
)
from bitfold.quant import matmulnbits


def _nm_sparse(rng, k, n, keep, group):
    w = rng.standard_normal((k, n))
    g = np.zeros((-(-k // group) * group, n))
    g[:k] = w
    g = g.reshape(-1, group, n)
    mask = np.zeros_like(g, bool)
    np.put_along_axis(mask, np.argsort(-np.abs(g), axis=1)[:, :keep], True, axis=1)
    return (g * mask).reshape(-1, n)[:k]


def int8_codes(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x as ONNX Runtime's ``accuracy_level = 4`` quantizes it: int8 codes [M, blocks, block] per row and block of
    inputs (zero-padded) and scales [M, blocks, 1] = max|x| / 127, codes rint(x · (127 / max|x|)) (to nearest
    even, in fp32)."""
    m, k = x.shape
    blocks = np.zeros((m, -(-k // block) * block), np.float32)
    blocks[:, :k] = x
    blocks = blocks.reshape(m, -1, block)
    top = np.abs(blocks).max(-1, keepdims=True)
    inverse = np.divide(np.float32(127), top, out=np.zeros_like(top), where=top > 0)
    return np.rint(blocks * inverse), top / np.float32(127)


def int8_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x as ONNX Runtime's ``accuracy_level = 4`` sees it: :func:`int8_codes` times their scales, float64."""
    codes, scale = int8_codes(np.asarray(x, np.float32), block)
    return (codes * scale).reshape(x.shape[0], -1)[:, : x.shape[1]].astype(np.float64)


def nbits_weights(k: int, n: int, bits: int, block: int, zero, level: int, rng, bias: bool = False):
    """Random ``com.microsoft.MatMulNBits`` inputs after A (B, scales, zero points, g_idx, bias; None where absent)
    and attributes. ``zero``: False (none), True (packed uint8 codes) or "float" (float zero points anywhere in
    the code range, a min-max grid)."""
    blocks = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, k))
    zeros = rng.integers(0, 1 << bits, (n, blocks)) if zero else None
    if zero == "float":
        zeros = (rng.random((n, blocks)) * ((1 << bits) - 1)).astype(np.float32)
    scales = rng.random((n, blocks)).astype(np.float32)
    b, s, z = matmulnbits.pack(codes, scales, zeros, bits, block, float_zero=zero == "float")
    extra = [None, rng.standard_normal(n).astype(np.float32)] if bias else []
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": level}
    return [b, s, z, *extra], attrs


def run_ort(op_type: str, domain: str, weights: list, attrs: dict, x: np.ndarray) -> np.ndarray:
    """One node ``op_type(X, *weights)`` (None: an absent optional input) run by ONNX Runtime on the CPU."""
    import onnx_ir as ir
    import onnxruntime as ort

    a = ir.val("x", ir.DataType.FLOAT, list(x.shape))
    inputs = [None if w is None else ir.Value(name=f"w{i}", const_value=ir.tensor(w)) for i, w in enumerate(weights)]
    node = ir.node(op_type, [a, *inputs], domain=domain, attributes=attrs)
    y = node.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([x.shape[0], attrs["N"]])
    graph = ir.Graph([a], [y], nodes=[node], initializers=[v for v in inputs if v is not None], opset_imports={"": 21, domain: 1}, name="g")
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def case(name: str, k: int, n: int, seed: int = 0):
    """(kernel, weights (inputs 1…), attrs, reference(x) -> y)."""
    rng = np.random.default_rng(seed)
    if name.startswith("nbits"):
        bits, zp, level = {"nbits4": (4, False, 0), "nbits4-zp": (4, True, 0), "nbits8": (8, False, 0), "nbits2-zp": (2, True, 0), "nbits4-int8": (4, False, 4), "nbits4-int8-zp": (4, True, 4), "nbits4-fzp": (4, "float", 0), "nbits4-int8-fzp": (4, "float", 4)}[name]
        weights, attrs = nbits_weights(k, n, bits, 32, zp, level, rng)
        w = matmulnbits.unpack(*weights[:3], bits, 32, k)
        return k_nbits.KERNEL, weights, attrs, (lambda x: int8_blocks(x, 32) @ w) if level == 4 else (lambda x: x @ w)
    if name.startswith(("binary", "xnor")):
        planes, salient, binarize = {"binary": (1, False, 0), "binary-residual-salient": (2, True, 0), "xnor": (1, False, 1), "xnor-salient": (2, True, 1)}[name]
        signs = rng.choice([-1, 1], (planes, k, n))
        extra = (rng.random((k, n)) < 0.05, rng.integers(-127, 128, (k, n)), rng.random(n)) if salient else ()
        packed = binary.pack(signs, rng.random((planes, n)), rng.standard_normal(n) * 0.1, *extra)
        return k_binary.KERNEL, list(packed), {"K": k, "binarize_input": binarize}, lambda x: binary.evaluate(x, *packed, binarize_input=binarize)
    if name == "ternary":
        p, g = ternary.pack(rng.integers(-1, 2, (k, n)), rng.random(n))
        return k_ternary.KERNEL, [p, g], {"K": k}, lambda x: ternary.evaluate(x, p, g)
    if name.startswith("shift"):
        bits, zero = {"shift3": (3, 1), "shift4-dense": (4, 0)}[name]
        units = shift.decode(rng.integers(0, 1 << bits, (k, n)), bits, bool(zero))
        p, s = shift.pack(units, rng.random(n), bits, bool(zero))
        return k_shift.KERNEL, [p, s], {"K": k, "zero": zero}, lambda x: shift.evaluate(x, p, s, zero)
    if name.startswith("bcq"):
        q, group = {"bcq3": (3, 32), "bcq2-g16": (2, 16)}[name]
        p, a = bcq.pack(rng.choice([-1, 1], (q, k, n)), rng.random((q, -(-k // group), n)))
        return k_bcq.KERNEL, [p, a], {"K": k, "group_size": group}, lambda x: bcq.evaluate(x, p, a, group)
    if name.startswith("sparse"):
        keep, group = {"sparse2:4": (2, 4), "sparse1:4": (1, 4), "sparse2:8": (2, 8)}[name]
        w = _nm_sparse(rng, k, n, keep, group)
        v, i = sparse.pack(w, keep, group)
        return k_sparse.KERNEL, [v, i], {"K": k, "n": keep, "m": group}, lambda x: x @ w
    if name == "csr":
        w = rng.standard_normal((k, n)) * (rng.random((k, n)) < 0.3)
        v, c, r = csr.pack(w)
        return k_csr.CSR, [v.astype(np.float32), c, r], {"K": k}, lambda x: csr.evaluate(x, v, c, r)
    if name.startswith("block-csr"):
        rows, cols = {"block-csr4x4": (4, 4), "block-csr3x5": (3, 5)}[name]
        keep = rng.random((-(-n // rows), -(-k // cols))) < 0.5
        w = rng.standard_normal((k, n)) * np.repeat(np.repeat(keep, rows, 0), cols, 1)[:n, :k].T
        v, c, r = block_csr.pack(w, rows, cols)
        return k_csr.BLOCK_CSR, [v.astype(np.float32), c, r], {"K": k, "n": n}, lambda x: x @ w
    if name.startswith("dense-sparse"):
        bits, block = {"dense-sparse4": (4, 32), "dense-sparse8": (8, 16)}[name]
        codes = rng.integers(-7, 8, (k, n))
        outliers = rng.standard_normal((k, n)) * (rng.random((k, n)) < 0.02)
        codes[outliers != 0] = 0
        packed = dense_sparse.pack(codes, rng.random((-(-k // block), n)), outliers, bits)
        return k_csr.DENSE_SPARSE, list(packed), {"K": k, "block_size": block}, lambda x: dense_sparse.evaluate(x, *packed, block)
    if name == "dense":
        w = rng.standard_normal((k, n)).astype(np.float32)
        return k_dense.KERNEL, [w], {"K": k}, lambda x: x @ w
    if name.startswith("hadamard"):
        block = hadamard.random_block(hadamard.split(k)[0], rng)
        return k_hadamard.KERNEL, [block], {"K": k}, lambda x: hadamard.evaluate(x, block)
    raise KeyError(name)


NAMES = [
    "nbits4", "nbits4-zp", "nbits8", "nbits2-zp", "nbits4-int8", "nbits4-int8-zp", "nbits4-fzp", "nbits4-int8-fzp", "binary", "binary-residual-salient", "xnor", "xnor-salient", "ternary",
    "shift3", "shift4-dense", "bcq3", "bcq2-g16", "sparse2:4", "sparse1:4", "sparse2:8", "csr", "block-csr4x4",
    "block-csr3x5", "dense-sparse4", "dense-sparse8", "hadamard", "dense",
]  # fmt: skip
