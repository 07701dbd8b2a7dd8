from __future__ import annotations

import onnx_ir as ir
from conftest import fresh

import bitfold
from bitfold.passes.canonical import FoldConstants, RemoveDead


def test_fold_constants_removes_shape_arithmetic(zoo_protos):
    model = fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    ops = [n.op_type for n in model.graph]
    assert {"Range", "Cos", "Sin", "Trilu"} <= set(ops)
    model, report = bitfold.optimize(model, ["fold-constants"], verify=True)
    left = {n.op_type for n in model.graph}
    assert not {"Range", "Cos", "Sin", "Trilu"} & left, "rotary tables and the causal mask are constants"
    assert report.passes[0].max_rel <= 1e-5


def test_size_limit_keeps_large_folds_out(zoo_protos):
    model = fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    FoldConstants(input_size_limit=0, output_size_limit=0)(model)
    assert "Range" in [n.op_type for n in model.graph]


def test_remove_dead_drops_unused_nodes_initializers_but_not_io(zoo_protos):
    model = fresh(zoo_protos, "mlp")
    x = model.graph.inputs[0]
    dead = ir.node("Neg", [x], name="dead")
    model.graph.append(dead)
    unused = ir.Value(name="unused", const_value=ir.tensor([1.0, 2.0]))
    model.graph.initializers["unused"] = unused
    inputs, outputs = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
    assert RemoveDead()(model).modified
    assert "dead" not in [n.name for n in model.graph] and "unused" not in model.graph.initializers
    assert [v.name for v in model.graph.inputs] == inputs and [v.name for v in model.graph.outputs] == outputs
    assert not RemoveDead()(model).modified
