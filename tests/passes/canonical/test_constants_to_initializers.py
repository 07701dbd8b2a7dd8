from __future__ import annotations

import onnx_ir as ir
from conftest import fresh

import bitfold
from bitfold.passes.canonical import ConstantsToInitializers


def paddle_style(model: ir.Model) -> ir.Model:
    """Move every initializer into a Constant node, as Paddle2ONNX-exported graphs keep their weights."""
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        const = ir.node("Constant", [], attributes={"value": value.const_value}, name=f"const_{name}")
        graph.insert_before(graph.node(0), const)
        ir.convenience.replace_all_uses_with(value, const.outputs[0])
        const.outputs[0].name = name + "_c"
        graph.initializers.pop(name)
    return model


def test_lifts_weights_so_batchnorm_folds(zoo_protos):
    model = paddle_style(fresh(zoo_protos, "cnn-bn"))
    assert not model.graph.initializers
    model, report = bitfold.optimize(
        model, ["constants-to-initializers", "fold-constants", "fold-batchnorm", "remove-dead"], verify=True
    )
    assert report.passes[0].ops_removed["Constant"] >= 20
    assert model.graph.initializers
    assert "BatchNormalization" not in [n.op_type for n in model.graph]
    assert all(r.max_rel <= 1e-5 for r in report.passes)


def test_min_elements_keeps_small_constants(zoo_protos):
    model = paddle_style(fresh(zoo_protos, "mlp"))
    ConstantsToInitializers(min_elements=100)(model)
    lifted = {v.const_value.size for v in model.graph.initializers.values()}
    assert lifted and min(lifted) >= 100
    kept = [n for n in model.graph if n.op_type == "Constant"]
    assert kept and all(n.attributes["value"].value.size < 100 for n in kept)
