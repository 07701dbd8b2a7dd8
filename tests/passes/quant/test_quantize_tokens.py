from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.passes.canonical import CANONICAL


def _reference(x: np.ndarray, bits: int, clip_ratio: float) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) * clip_ratio / qmax, 1e-12)
    return np.clip(np.round(x / s), -qmax - 1, qmax) * s


@pytest.mark.parametrize("bits", [8, 4])
def test_matches_numpy_per_token_quantization(bits):
    rng = np.random.default_rng(bits)
    x = ir.val("x", ir.DataType.FLOAT, [3, 5, 16])
    w = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal((16, 4)).astype(np.float32)))
    node = ir.node("MatMul", [x, w], name="mm")
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 18}, name="g")
    step = {"name": "quantize-tokens", "bits": bits, "clip_ratio": 0.9}
    quantized, report = bitfold.optimize(ir.Model(graph, ir_version=10), [step])
    feeds = {"x": (rng.standard_normal((3, 5, 16)) * np.exp(rng.standard_normal(16))).astype(np.float32)}
    got = next(iter(bitfold.compile(quantized, "ort", "cpu").run(feeds).values()))
    expected = _reference(feeds["x"].astype(np.float64), bits, 0.9) @ w.const_value.numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    exact = feeds["x"].astype(np.float64) @ w.const_value.numpy()
    assert np.abs(got - exact).max() > 0  # it does quantize
    _, again = bitfold.optimize(quantized, [step])
    assert report.passes[0].modified and not again.passes[0].modified


def test_shared_inputs_are_quantized_once_and_attention_is_left(zoo_protos):
    model, report = bitfold.optimize(fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope"), [*CANONICAL, "quantize-tokens"], verify=True)
    # 7 projections read 4 distinct activations (q/k/v share one, gate/up share one, o, down): 4 Round nodes
    assert report.passes[-1].ops_added["Round"] == 4
    assert report.passes[-1].max_rel < 0.05  # A8 on a small block
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert sum(n.inputs[1].const_value is None for n in matmuls) == 2  # QKᵀ and PV untouched


def test_bad_bits_refused(zoo_protos):
    with pytest.raises(BitfoldError, match="bits"):
        bitfold.optimize(fresh(zoo_protos, "mlp"), [{"name": "quantize-tokens", "bits": 3}])
