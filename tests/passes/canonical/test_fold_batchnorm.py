from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from conftest import fresh
from models import bn_graph

import bitfold
from bitfold.passes.canonical import FoldBatchNorm
from bitfold.passes.canonical.fold_batchnorm import bn_affine, scale_output_channels
from bitfold.passes.registry import FROM_KEY, PASS_KEY


def _ops(model):
    return [n.op_type for n in model.graph]


def test_folds_every_bn_in_conv_convtranspose_gemm(zoo_protos):
    model = fresh(zoo_protos, "cnn-bn")
    assert _ops(model).count("BatchNormalization") == 4
    # the exporter gives a bias-less Conv a zero bias computed by Expand: not constant until folded
    model, report = bitfold.optimize(model, ["fold-constants", "fold-batchnorm"], verify=True)
    assert "BatchNormalization" not in _ops(model)
    assert report.passes[1].ops_removed == {"BatchNormalization": 4}
    assert report.passes[1].max_rel <= 1e-5


def test_non_constant_bias_is_a_refusal(zoo_protos):
    model = fresh(zoo_protos, "cnn-bn")
    model, report = bitfold.optimize(model, ["fold-batchnorm"], verify=True)
    assert _ops(model).count("BatchNormalization") == 1
    (note,) = report.passes[0].notes
    assert note.startswith("BatchNormalization ") and "kept: the bias " in note and "is not constant" in note


def test_created_nodes_carry_provenance(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), ["fold-constants", "fold-batchnorm"])
    folded = [n for n in model.graph if n.op_type in ("Conv", "ConvTranspose", "Gemm")]
    assert folded and all(n.metadata_props[PASS_KEY] == "fold-batchnorm" for n in folded)
    assert all("BatchNormalization" in n.metadata_props[FROM_KEY] or "batch_norm" in n.metadata_props[FROM_KEY] for n in folded)


def test_bn_whose_input_has_two_consumers_is_left_alone(zoo_protos):
    model = fresh(zoo_protos, "shared-bn-input")
    model, report = bitfold.optimize(model, ["fold-batchnorm"], verify=True)
    assert _ops(model).count("BatchNormalization") == 1
    assert not report.passes[0].modified


@pytest.mark.parametrize("producer", ["matmul", "matmul-add"])
def test_matmul_and_matmul_add(producer):
    model, report = bitfold.optimize(bn_graph(producer), ["fold-batchnorm"], verify=True)
    assert sorted(_ops(model)) == ["Add", "MatMul"]
    assert report.passes[0].max_rel <= 1e-5
    assert set(model.graph.initializers) == {"w_bnfold", "bn_bias"}, "orphaned weights and BN params are removed"


@pytest.mark.parametrize("variant", [{"training": True}, {"scale_is_input": True}, {"rank3": True}])
@pytest.mark.parametrize("producer", ["matmul", "matmul-add"])
def test_negative_cases_stay_untouched(producer, variant):
    model = bn_graph(producer, **variant)
    before = _ops(model)
    result = FoldBatchNorm()(model)
    assert not result.modified
    assert _ops(model) == before


def test_shared_weight_is_copied_not_mutated():
    model = bn_graph("matmul")
    w = model.graph.initializers["w"]
    original = w.const_value.numpy().copy()
    other = ir.node("MatMul", [model.graph.inputs[0], w], name="other")
    model.graph.append(other)
    other.outputs[0].name = "y2"
    model.graph.outputs.append(other.outputs[0])
    before = _proto(model)
    assert FoldBatchNorm()(model).modified
    assert sorted(_ops(model)) == ["Add", "MatMul", "MatMul"]
    assert {"w", "w_bnfold"} <= set(model.graph.initializers)
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), original)
    _assert_same_outputs(before, model)


def test_bn_affine_matches_batchnorm_formula():
    rng = np.random.default_rng(0)
    gamma, beta, mean = rng.standard_normal((3, 5))
    var = rng.uniform(0.1, 2, 5)
    z = rng.standard_normal((7, 5))
    s, t = bn_affine(gamma, beta, mean, var, 1e-5)
    np.testing.assert_allclose(s * z + t, gamma * (z - mean) / np.sqrt(var + 1e-5) + beta, rtol=1e-12)


def test_grouped_conv_transpose_scaling_matches_per_output_channel():
    rng = np.random.default_rng(1)
    group, cin, cout_g = 2, 4, 3
    w = rng.standard_normal((cin, cout_g, 2, 2))
    s = rng.uniform(0.5, 2, group * cout_g)
    out = scale_output_channels(w, s, "ConvTranspose", {"group": group})
    for g in range(group):
        for j in range(cout_g):
            rows = slice(g * cin // group, (g + 1) * cin // group)
            np.testing.assert_allclose(out[rows, j], w[rows, j] * s[g * cout_g + j])


# ---- hand-built producers, compared under ONNX Runtime -------------------------------------------------------------


def _proto(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString()


def _ort(data: bytes, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT would fold BN itself
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_same_outputs(before: bytes, model: ir.Model, seed: int = 0) -> None:
    """The rewritten model's outputs equal the original's within 1e-5 relative (to the output's largest value)."""
    rng = np.random.default_rng(seed)
    inputs = onnx.ModelProto.FromString(before).graph.input
    feeds = {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in inputs}
    for ref, got in zip(_ort(before, feeds), _ort(_proto(model), feeds), strict=True):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


def _graph(nodes, inputs, inits, output_shape) -> ir.Model:
    """A float32 opset-17 model from onnx.helper nodes; ``inputs`` maps names to shapes, ``inits`` to arrays."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, output_shape)],
        [onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in inits.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))


def _bn_params(rng, c: int) -> dict[str, np.ndarray]:
    ranges = {"gamma": (0.5, 1.5), "beta": (-0.2, 0.2), "mean": (-0.5, 0.5), "var": (0.5, 2.0)}
    return {name: rng.uniform(low, high, c) for name, (low, high) in ranges.items()}


def _bn(z: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [z, "gamma", "beta", "mean", "var"], ["out"], name="bn", epsilon=1e-3)


# name: (op, attributes, x shape, weight shape, own bias shape or None, Add bias shape or None, output shape)
PRODUCERS = {
    "conv": ("Conv", {"pads": [1, 1, 1, 1]}, [2, 3, 6, 6], [5, 3, 3, 3], [5], None, [2, 5, 6, 6]),
    "conv-add-c11": ("Conv", {"pads": [1, 1, 1, 1]}, [2, 3, 6, 6], [5, 3, 3, 3], None, [5, 1, 1], [2, 5, 6, 6]),
    "conv-add-1c11": ("Conv", {}, [2, 3, 6, 6], [5, 3, 3, 3], [5], [1, 5, 1, 1], [2, 5, 4, 4]),
    "conv-add-scalar": ("Conv", {}, [2, 3, 6, 6], [5, 3, 3, 3], None, [], [2, 5, 4, 4]),
    "conv1d-add-c1": ("Conv", {}, [2, 3, 7], [4, 3, 3], None, [4, 1], [2, 4, 5]),
    "convtranspose-add": ("ConvTranspose", {"strides": [2, 2]}, [1, 4, 5, 5], [4, 3, 2, 2], None, [3, 1, 1], [1, 3, 10, 10]),
    "convtranspose-group2": ("ConvTranspose", {"group": 2, "strides": [2, 2]}, [1, 4, 5, 5], [4, 3, 3, 3], [6], None, [1, 6, 11, 11]),
    "convtranspose-group2-add": ("ConvTranspose", {"group": 2}, [1, 4, 5, 5], [4, 3, 3, 3], [6], [1, 6, 1, 1], [1, 6, 7, 7]),
    "gemm-transb-alpha-beta": ("Gemm", {"transB": 1, "alpha": 0.7, "beta": 1.3}, [4, 8], [6, 8], [6], None, [4, 6]),
    "gemm-transa-add": ("Gemm", {"transA": 1, "alpha": 1.5, "beta": 0.5}, [8, 4], [8, 6], [1, 6], [6], [4, 6]),
    "gemm-transb-add-row-bias": ("Gemm", {"transB": 1, "beta": 2.0}, [4, 8], [6, 8], [4, 6], [1, 6], [4, 6]),
    "gemm-no-c-add": ("Gemm", {"transB": 1, "alpha": 0.25}, [4, 8], [6, 8], None, [1, 6], [4, 6]),
    "matmul-add-c": ("MatMul", {}, [4, 8], [8, 6], None, [6], [4, 6]),
    "matmul-add-nc": ("MatMul", {}, [4, 8], [8, 6], None, [4, 6], [4, 6]),
    "matmul-add-square": ("MatMul", {}, [6, 8], [8, 6], None, [6], [6, 6]),
}


def _producer_graph(name: str, seed: int = 0) -> ir.Model:
    op, attrs, x_shape, w_shape, own, add, out_shape = PRODUCERS[name]
    rng = np.random.default_rng(seed)
    inits = {"w": rng.standard_normal(w_shape)}
    inputs = ["x", "w"]
    if own is not None:
        inits["c"] = rng.standard_normal(own)
        inputs.append("c")
    nodes = [helper.make_node(op, inputs, ["z"], name="linear", **attrs)]
    z = "z"
    if add is not None:
        inits["b"] = rng.standard_normal(add)
        nodes.append(helper.make_node("Add", ["b", "z"], ["z_b"], name="add"))  # bias first: the rule commutes
        z = "z_b"
    channels = out_shape[1]
    inits.update(_bn_params(rng, channels))
    return _graph([*nodes, _bn(z)], {"x": x_shape}, inits, out_shape)


@pytest.mark.parametrize("name", list(PRODUCERS))
def test_folds_linear_with_bias_add(name):
    model = _producer_graph(name)
    before = _proto(model)
    op = PRODUCERS[name][0]
    p = FoldBatchNorm()
    assert p(model).modified
    expected = ["Add", "MatMul"] if op == "MatMul" else [op]
    assert sorted(_ops(model)) == expected, "BatchNormalization and the bias Add are folded away"
    assert not p.notes
    _assert_same_outputs(before, model)
    folded = _proto(model)
    assert not FoldBatchNorm()(model).modified, "a second run changes nothing"
    assert _proto(model) == folded


def test_gemm_keeps_alpha_and_trans_and_resets_beta():
    model = _producer_graph("gemm-transb-alpha-beta")
    FoldBatchNorm()(model)
    (gemm,) = model.graph
    assert gemm.attributes.get_float("alpha") == pytest.approx(0.7)
    assert gemm.attributes.get_int("transB") == 1
    assert gemm.attributes.get_float("beta", 1.0) == 1.0


@pytest.mark.parametrize(
    ("name", "bias_shape", "reason"),
    [
        ("conv-add-c11", [1, 1, 1, 6], "does not broadcast on channel axis 1 alone"),
        ("conv-add-c11", [1, 5, 6, 6], "does not broadcast on channel axis 1 alone"),
        ("gemm-no-c-add", [4, 6], "does not broadcast on channel axis 1 alone"),
        # [6, 6] + [1, 1, 6] is [1, 6, 6]: BN normalizes the MatMul's rows, not its output channels
        ("matmul-add-square", [1, 1, 6], "does not broadcast on the MatMul's channels"),
    ],
)
def test_bias_varying_off_the_channel_axis_is_declined(name, bias_shape, reason):
    model = _producer_graph(name)
    bias = np.random.default_rng(5).standard_normal(bias_shape).astype(np.float32)
    model.graph.initializers["b"].const_value = ir.tensor(bias)
    model.graph.outputs[0].shape = None
    before = _proto(model)
    p = FoldBatchNorm()
    assert not p(model).modified
    assert "BatchNormalization" in _ops(model)
    assert len(p.notes) == 1 and reason in p.notes[0]
    _assert_same_outputs(before, model)


def _two_matmuls(w2_constant: bool) -> ir.Model:
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((8, 6)), **_bn_params(rng, 6)}
    inputs = {"x": [4, 8], "y": [4, 8]}
    if w2_constant:
        inits["w2"] = rng.standard_normal((8, 6))
    else:
        inputs["w2"] = [8, 6]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="m1"),
        helper.make_node("MatMul", ["y", "w2"], ["m2"], name="m2"),
        helper.make_node("Add", ["m1", "m2"], ["s"], name="add"),
        _bn("s"),
    ]
    return _graph(nodes, inputs, inits, [4, 6])


@pytest.mark.parametrize("w2_constant", [True, False])
def test_add_of_two_matmuls_is_declined_with_a_reason(w2_constant):
    """Neither branch of Add(MatMul(x, W1), MatMul(y, W2)) is a constant bias, so no single linear op absorbs BN."""
    model = _two_matmuls(w2_constant)
    before = _proto(model)
    p = FoldBatchNorm()
    assert not p(model).modified
    assert sorted(_ops(model)) == ["Add", "BatchNormalization", "MatMul", "MatMul"]
    assert len(p.notes) == 1 and "which is not a constant bias" in p.notes[0]
    _assert_same_outputs(before, model)


def test_bn_after_an_unsupported_producer_is_noted():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), _bn("r")]
    model = _graph(nodes, {"x": [2, 3, 4, 4]}, _bn_params(rng, 3), [2, 3, 4, 4])
    p = FoldBatchNorm()
    assert not p(model).modified
    assert p.notes == [
        "BatchNormalization 'bn' kept: its input comes from Relu 'relu', "
        "not from Conv, ConvTranspose, Gemm or MatMul (+ a constant bias Add)"
    ]
