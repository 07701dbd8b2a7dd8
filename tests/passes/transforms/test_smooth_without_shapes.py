"""smooth on graphs whose intermediate values carry no shape (value_info stripped, as many exporters write them)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.quant.calibration import CalibrationData

K, N = 16, 8


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": (1.0 + 0.5 * rng.standard_normal(K)).astype(np.float32),
        "beta": (0.1 * rng.standard_normal(K)).astype(np.float32),
        "wq": rng.standard_normal((K, N)).astype(np.float32),
        "wk": rng.standard_normal((K, N)).astype(np.float32),
    }


def _model(nodes, initializers, x_shape=(2, 5, K), shapes: bool = False) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [*x_shape[:-1], N]) for name in ("q", "k")],
        [numpy_helper.from_array(v, k) for k, v in initializers.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    if shapes:
        proto = onnx.shape_inference.infer_shapes(proto)
        assert {v.name for v in proto.graph.value_info} >= {"n"}
    else:
        assert not proto.graph.value_info
    return proto


def layernorm_linears(shapes: bool, axis: int = -1) -> onnx.ModelProto:
    """x → LayerNormalization(γ, β) → n, read by two MatMuls (q and k)."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=axis),
        helper.make_node("MatMul", ["n", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["n", "wk"], ["k"], name="k_proj"),
    ]
    return _model(nodes, _weights(), shapes=shapes)


def rmsnorm_linears(shapes: bool) -> onnx.ModelProto:
    """x → x · 1/sqrt(mean(x²) + ε) (decomposed, as torch.onnx exports it) → · γ → n, read by two MatMuls."""
    w = _weights()
    del w["beta"]
    w |= {"two": np.array(2.0, np.float32), "axes": np.array([-1], np.int64), "eps": np.array(1e-6, np.float32)}
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean", keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
        helper.make_node("Reciprocal", ["rms"], ["inv"], name="reciprocal"),
        helper.make_node("Mul", ["x", "inv"], ["core"], name="normalize"),
        helper.make_node("Mul", ["core", "gamma"], ["n"], name="scale"),
        helper.make_node("MatMul", ["n", "wq"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["n", "wk"], ["k"], name="k_proj"),
    ]
    return _model(nodes, w, shapes=shapes)


def _samples(n: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    outliers = np.ones(K, np.float32)
    outliers[[3, 11]] = 30.0  # channels far larger than the rest: smoothing has something to move
    return [{"x": (rng.standard_normal((2, 5, K)) * outliers).astype(np.float32)} for _ in range(n)]


def _calibration() -> CalibrationData:
    return CalibrationData(_samples())


def _smooth(proto: onnx.ModelProto):
    model = ir.from_proto(proto)
    smoothed, report = bitfold.optimize(model, ["smooth"], _calibration())
    return smoothed, report.passes[0]


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def _run(model: ir.Model, feeds) -> dict[str, np.ndarray]:
    return OrtRunnable(model, device="cpu", optimization="none").run(feeds)


@pytest.mark.parametrize("build", [layernorm_linears, rmsnorm_linears], ids=["layernorm", "rmsnorm"])
def test_smooth_is_the_same_with_and_without_value_info(build):
    annotated, annotated_record = _smooth(build(shapes=True))
    stripped, stripped_record = _smooth(build(shapes=False))
    assert annotated_record.modified and stripped_record.modified, stripped_record.notes
    assert not stripped_record.notes, "no activation is left unsmoothed"
    assert [(n.op_type, [v.name for v in n.inputs]) for n in stripped.graph] == [(n.op_type, [v.name for v in n.inputs]) for n in annotated.graph]
    got, want = _initializers(stripped), _initializers(annotated)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    gamma = next(v for k, v in got.items() if k.startswith("gamma"))
    assert not np.allclose(gamma, _weights()["gamma"]), "γ absorbed 1/s"
    feeds = {"x": _samples(1, seed=7)[0]["x"]}
    reference = _run(ir.from_proto(build(shapes=False)), feeds)
    outputs = _run(stripped, feeds)
    for name in ("q", "k"):
        np.testing.assert_allclose(outputs[name], reference[name], rtol=1e-5, atol=1e-5 * np.abs(reference[name]).max())
    assert _initializers(ir.from_proto(build(shapes=False))).keys() != got.keys()


def test_layernorm_with_a_positive_axis_is_smoothed_without_shapes():
    """axis = 2 on a rank-3 input is the last axis only once the rank is known: inference supplies it."""
    smoothed, record = _smooth(layernorm_linears(shapes=False, axis=2))
    assert record.modified and not record.notes
    assert sum(1 for n in smoothed.graph if "bitfold.smoothed" in n.metadata_props) == 2


def test_rerun_on_a_stripped_graph_is_a_no_op():
    smoothed, _ = _smooth(layernorm_linears(shapes=False))
    _, again = bitfold.optimize(smoothed, ["smooth"], _calibration(), verify=True, feeds=_samples(1, seed=7)[0])
    assert not again.passes[0].modified


def test_shape_inference_adds_annotations_only():
    from bitfold.passes.transforms.structure import infer_shapes

    model = ir.from_proto(layernorm_linears(shapes=False))
    assert model.graph.node(0).outputs[0].shape is None
    for v in model.graph.outputs:
        v.shape = None
    assert infer_shapes(model) == 1  # n; the graph outputs q and k keep their (absent) shapes
    assert model.graph.node(0).outputs[0].shape == ir.Shape([2, 5, K])
    assert all(v.shape is None for v in model.graph.outputs)
    assert infer_shapes(model) == 0


def _declined(nodes, initializers, x_shape=(2, 5, K)) -> str:
    model = ir.from_proto(_model(nodes, initializers, x_shape))
    _, report = bitfold.optimize(model, ["smooth"], _calibration())
    (note,) = report.passes[0].notes
    assert not report.passes[0].modified
    return note


def test_declines_state_the_real_reason():
    w = _weights()
    readers = [helper.make_node("MatMul", ["n", "wq"], ["q"], name="q_proj"), helper.make_node("MatMul", ["n", "wk"], ["k"], name="k_proj")]
    identity = [helper.make_node("Identity", ["x"], ["n"], name="copy")]
    no_beta = {k: v for k, v in w.items() if k != "beta"}
    assert "graph input" in _declined([helper.make_node("MatMul", ["x", w_name], [y], name=f"{y}_proj") for w_name, y in (("wq", "q"), ("wk", "k"))], no_beta)
    assert "Identity 'copy' cannot absorb a per-channel scale" in _declined(identity + readers, no_beta)
    computed_gamma = [
        helper.make_node("Constant", [], ["g"], name="gamma_node", value=numpy_helper.from_array(w["gamma"])),
        helper.make_node("LayerNormalization", ["x", "g", "beta"], ["n"], name="ln"),
    ]
    assert "LayerNormalization 'ln' has a γ or β that is not a constant initializer" in _declined(computed_gamma + readers, no_beta | {"beta": w["beta"]})
    scalar = [helper.make_node("Mul", ["x", "half"], ["n"], name="halve")]
    note = _declined(scalar + readers, no_beta | {"half": np.array(0.5, np.float32)})
    assert f"Mul 'halve' multiplies by neither a constant [{K}] vector" in note


def test_a_symbolic_width_is_read_from_the_consumers_weights():
    """Shape inference keeps a symbolic width symbolic; the consumers' [K, N] weights still give it."""
    ln = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln"),
          helper.make_node("MatMul", ["n", "wq"], ["q"], name="q_proj"), helper.make_node("MatMul", ["n", "wk"], ["k"], name="k_proj")]
    model = ir.from_proto(_model(ln, _weights(), ("batch", "seq", "hidden")))
    reference = bitfold.clone(model)
    smoothed, report = bitfold.optimize(model, ["smooth"], _calibration())
    assert report.passes[0].modified
    feeds = _samples(1, seed=5)[0]
    for name, want in _run(reference, feeds).items():
        np.testing.assert_allclose(_run(smoothed, feeds)[name], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("build", [layernorm_linears, rmsnorm_linears], ids=["layernorm", "rmsnorm"])
def test_awq_folds_the_same_scales_with_and_without_value_info(build):
    """AWQ's scale fold reads the channel count from the consumers' weights when the norm output has no shape."""
    step = {"name": "quantize-weights", "method": "awq", "bits": 3, "group_size": 8, "format": "fake"}
    results = []
    for shapes in (True, False):
        model, _ = bitfold.optimize(ir.from_proto(build(shapes)), [step], _calibration())
        results.append(_initializers(model))
    annotated, stripped = results
    assert any(name.endswith("_awq") for name in stripped), sorted(stripped)  # the norm took the scale
    assert annotated.keys() == stripped.keys()
    for name in annotated:
        np.testing.assert_array_equal(stripped[name], annotated[name], err_msg=name)
