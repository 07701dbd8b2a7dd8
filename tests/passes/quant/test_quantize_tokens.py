from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData


def _reference(x: np.ndarray, bits: int, clip_ratio: float, symmetric: bool = True) -> np.ndarray:
    if not symmetric:
        levels = 2**bits - 1
        low, high = x.min(axis=-1, keepdims=True) * clip_ratio, x.max(axis=-1, keepdims=True) * clip_ratio
        s = np.maximum((high - low) / levels, 1e-12)
        z = np.round(-low / s)
        return (np.clip(np.round(x / s) + z, 0, levels) - z) * s
    qmax = 2 ** (bits - 1) - 1
    s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) * clip_ratio / qmax, 1e-12)
    return np.clip(np.round(x / s), -qmax - 1, qmax) * s


@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (4, True), (4, False)])
def test_matches_numpy_per_token_quantization(bits, symmetric):
    rng = np.random.default_rng(bits)
    x = ir.val("x", ir.DataType.FLOAT, [3, 5, 16])
    w = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal((16, 4)).astype(np.float32)))
    node = ir.node("MatMul", [x, w], name="mm")
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[w], opset_imports={"": 18}, name="g")
    step = {"name": "quantize-tokens", "bits": bits, "clip_ratio": 0.9, "symmetric": symmetric}
    quantized, report = bitfold.optimize(ir.Model(graph, ir_version=10), [step])
    feeds = {"x": (rng.standard_normal((3, 5, 16)) * np.exp(rng.standard_normal(16))).astype(np.float32)}
    got = next(iter(bitfold.compile(quantized, "ort", "cpu").run(feeds).values()))
    expected = _reference(feeds["x"].astype(np.float64), bits, 0.9, symmetric) @ w.const_value.numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    exact = feeds["x"].astype(np.float64) @ w.const_value.numpy()
    assert np.abs(got - exact).max() > 0  # it does quantize
    _, again = bitfold.optimize(quantized, [step])
    assert report.passes[0].modified and not again.passes[0].modified


def _one_matmul(w: ir.TensorProtocol) -> ir.Model:
    x = ir.val("x", ir.DataType.FLOAT, [16, 64])
    node = ir.node("MatMul", [x, ir.Value(name="w", const_value=w)], name="mm")
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    return ir.Model(ir.Graph([x], [node.outputs[0]], nodes=[node], initializers=[node.inputs[1]], opset_imports={"": 18}, name="g"), ir_version=10)


def test_asymmetric_tokens_lose_less_on_one_sided_activations():
    rng = np.random.default_rng(7)
    w = ir.tensor(rng.standard_normal((64, 8)).astype(np.float32))
    feeds = {"x": (np.abs(rng.standard_normal((16, 64))) + 0.5).astype(np.float32)}  # like a post-activation input
    errors = {}
    for symmetric in (True, False):
        model, _ = bitfold.optimize(_one_matmul(w), [{"name": "quantize-tokens", "bits": 4, "symmetric": symmetric}])
        got = next(iter(bitfold.compile(model, "ort", "cpu").run(feeds).values()))
        errors[symmetric] = np.linalg.norm(got - feeds["x"] @ w.numpy())
    assert errors[False] < 0.6 * errors[True]


def test_searched_clip_is_the_best_ratio_of_the_grid_on_the_calibration_rows():
    rng = np.random.default_rng(3)
    w = ir.tensor(rng.standard_normal((64, 8)).astype(np.float32))
    batches = [{"x": (rng.standard_t(3, (16, 64))).astype(np.float32)} for _ in range(4)]  # heavy-tailed tokens
    rows = np.concatenate([b["x"] for b in batches])

    def error(step):
        model, _ = bitfold.optimize(_one_matmul(w), [step], CalibrationData(batches))
        runnable = bitfold.compile(model, "ort", "cpu")
        got = np.concatenate([next(iter(runnable.run(b).values())) for b in batches])
        return np.sum((got - rows.astype(np.float64) @ w.numpy()) ** 2), model

    searched, model = error({"name": "quantize-tokens", "bits": 4, "search_clip": True})
    chosen = next(n for n in model.graph if "bitfold.token_clip" in n.metadata_props).metadata_props["bitfold.token_clip"]
    fixed = {c: error({"name": "quantize-tokens", "bits": 4, "clip_ratio": c})[0] for c in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)}
    assert float(chosen) < 1.0  # heavy tails: clipping pays
    assert searched <= min(fixed.values()) * (1 + 1e-5)
    assert searched < fixed[1.0]


def test_clip_search_without_calibration_names_the_option():
    with pytest.raises(BitfoldError, match="calibration"):
        bitfold.optimize(_one_matmul(ir.tensor(np.ones((64, 8), np.float32))), [{"name": "quantize-tokens", "search_clip": True}])


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
