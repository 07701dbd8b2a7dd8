"""quantize-weights on a float16 graph: the result stays float16, runs in ONNX Runtime, and carries the same
quantization error as the same recipe applied to the float32 model."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import bitfold
from bitfold.backends.ort import OrtRunnable

WIDTH = 64


def _mlp(dtype: type) -> ir.Model:
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((WIDTH, 2 * WIDTH)) / np.sqrt(WIDTH)).astype(np.float16)  # float16-exact in both models
    w2 = (rng.standard_normal((2 * WIDTH, WIDTH)) / np.sqrt(2 * WIDTH)).astype(np.float16)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["a"], name="act"),
         helper.make_node("MatMul", ["a", "w2"], ["y"], name="mm2")],
        "mlp",
        [helper.make_tensor_value_info("x", elem, [8, WIDTH])],
        [helper.make_tensor_value_info("y", elem, [8, WIDTH])],
        [onnx.numpy_helper.from_array(w1.astype(dtype), "w1"), onnx.numpy_helper.from_array(w2.astype(dtype), "w2")],
    )  # fmt: skip
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return next(iter(OrtRunnable(model, device="cpu", optimization="none").run({"x": x}).values())).astype(np.float32)


def _rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.mark.parametrize(
    "params",
    [
        {"group_size": -1},
        {"group_size": 16, "symmetric": False},
        {"group_size": 16, "format": "fake"},
        {"group_size": 16, "format": "matmulnbits"},
        {"group_size": 16, "format": "matmulnbits", "symmetric": False, "zero_point": "float"},
    ],
    ids=["qdq-channel", "qdq-group-asym", "fake", "matmulnbits", "matmulnbits-float-zero"],
)
def test_float16_mlp_matches_the_float32_recipe(params: dict) -> None:
    x = np.random.default_rng(1).standard_normal((8, WIDTH)).astype(np.float32)
    step = [{"name": "quantize-weights", "bits": 4, **params}]
    q32, _ = bitfold.optimize(_mlp(np.float32), step)
    q16, report = bitfold.optimize(_mlp(np.float16), step)
    assert report.passes[0].modified
    g = q16.graph
    values = [*g.inputs, *g.initializers.values(), *(v for node in g for v in node.outputs)]
    floats = {v.name: v.dtype for v in values if v.dtype is not None and v.dtype.is_floating_point()}
    assert set(floats.values()) == {ir.DataType.FLOAT16}, floats
    reference = _run(_mlp(np.float32), x)
    y32, y16 = _run(q32, x), _run(q16, x.astype(np.float16))
    quant_error = _rms(y32 - reference)
    assert quant_error > 1e-3  # 4-bit weights do change the output
    assert _rms(y16 - y32) < 0.1 * quant_error, (_rms(y16 - y32), quant_error)


def _conv(dtype: type) -> ir.Model:
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((8, 4, 3, 3)) / 6).astype(np.float16)
    b = rng.standard_normal(8).astype(np.float16)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="act"),
         helper.make_node("Conv", ["r", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", elem, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", elem, [1, 8, 6, 6])],
        [onnx.numpy_helper.from_array(w.astype(dtype), "w"), onnx.numpy_helper.from_array(b.astype(dtype), "b")],
    )  # fmt: skip
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))


def _no_float32(model: ir.Model) -> None:
    g = model.graph
    values = [*g.inputs, *g.initializers.values(), *(v for node in g for v in node.outputs)]
    wide = {v.name: v.dtype for v in values if v.dtype in (ir.DataType.FLOAT, ir.DataType.DOUBLE)}
    assert not wide, f"float32 values in a float16 graph: {wide}"


@pytest.mark.parametrize("outputs", [False, True], ids=["bias-correction", "int32-bias"])
def test_quantize_activations_on_a_float16_conv_with_bias_matches_the_float32_recipe(outputs: bool) -> None:
    """Weight scales, the int32 bias's scale and the corrected bias stay float16; the outputs agree with the
    float32 model quantized by the same recipe to well within the quantization error."""
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    step = [{"name": "quantize-activations", "outputs": outputs, "activation_dtype": "int8"}]
    q32, _ = bitfold.optimize(_conv(np.float32), step, samples)
    q16, report = bitfold.optimize(_conv(np.float16), step, [{"x": s["x"].astype(np.float16)} for s in samples])
    assert report.passes[0].modified
    _no_float32(q16)
    x = samples[0]["x"]
    reference = _run(_conv(np.float32), x)
    y32, y16 = _run(q32, x), _run(q16, x.astype(np.float16))
    quant_error = _rms(y32 - reference)
    assert quant_error > 1e-4
    assert _rms(y16 - y32) < 0.5 * quant_error + 2e-3 * _rms(reference), (_rms(y16 - y32), quant_error)




def test_quantize_tokens_keeps_a_zero_token_zero_in_float16() -> None:
    """A token of zeros gets the floor scale, which must not round to 0 in float16 (0 / 0 would give NaN)."""
    x = np.random.default_rng(4).standard_normal((8, WIDTH)).astype(np.float16)
    x[3] = 0
    q16, _ = bitfold.optimize(_mlp(np.float16), [{"name": "quantize-tokens", "bits": 8}])
    _no_float32(q16)
    y = _run(q16, x)
    assert np.isfinite(y).all()
    np.testing.assert_array_equal(y[3], 0)
    reference = _run(_mlp(np.float32), x.astype(np.float32))
    assert _rms(y - reference) < 0.02 * _rms(reference)
