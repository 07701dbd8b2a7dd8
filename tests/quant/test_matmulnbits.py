from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from bitfold.quant import matmulnbits


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k, n, block, with_zero", [(100, 7, 32, False), (64, 5, 16, True), (300, 33, 128, True)])
def test_pack_unpack_and_ort_kernel_agree(bits, k, n, block, with_zero):
    rng = np.random.default_rng(bits * k + n)
    blocks = -(-k // block)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, blocks)).astype(np.float32) * rng.choice([-1, 1], (n, blocks))
    zp = rng.integers(0, 1 << bits, (n, blocks)).astype(np.uint8) if with_zero else None
    b, s, packed_zp = matmulnbits.pack(codes, scales, zp, bits, block)
    assert b.shape == (n, blocks, block * bits // 8) and b.dtype == np.uint8
    w = matmulnbits.unpack(b, s, packed_zp, bits, block, k)
    zfull = np.full((n, blocks), 1 << (bits - 1)) if zp is None else zp
    expected = ((codes.astype(np.float32) - np.repeat(zfull, block, 1)[:, :k]) * np.repeat(scales, block, 1)[:, :k]).T
    np.testing.assert_allclose(w, expected, rtol=1e-6)

    a = ir.val("a", ir.DataType.FLOAT, [3, k])
    inputs = [a] + [ir.Value(name=nm, const_value=ir.tensor(t)) for nm, t in (("b", b), ("s", s))]
    if packed_zp is not None:
        inputs.append(ir.Value(name="zp", const_value=ir.tensor(packed_zp)))
    node = ir.node("MatMulNBits", inputs, domain="com.microsoft",
                   attributes={"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": 0})  # fmt: skip
    node.outputs[0].name, node.outputs[0].dtype, node.outputs[0].shape = "y", ir.DataType.FLOAT, ir.Shape([3, n])
    graph = ir.Graph([a], node.outputs, nodes=[node], initializers=inputs[1:], opset_imports={"": 21, "com.microsoft": 1}, name="g")
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"a": x})[0], x @ expected, rtol=1e-4, atol=1e-4)
