from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
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
    FoldBatchNorm()(model)
    assert "w" in model.graph.initializers
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), original)


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
