from __future__ import annotations

import numpy as np
import onnx_ir as ir

import bitfold
from bitfold.passes.canonical import RemoveIdentity


def _model(nodes, inputs, outputs):
    for v in outputs:
        v.dtype, v.shape = ir.DataType.FLOAT, ir.Shape([2, 3])
    return ir.Model(ir.Graph(inputs, outputs, nodes=nodes, opset_imports={"": 17}, name="g"), ir_version=9)


def _x():
    return ir.val("x", ir.DataType.FLOAT, [2, 3])


def test_removes_identity_chains_and_inference_dropout():
    x = _x()
    a = ir.node("Relu", [x])
    i1 = ir.node("Identity", [a.outputs[0]])
    d = ir.node("Dropout", [i1.outputs[0]])
    b = ir.node("Neg", [d.outputs[0]])
    b.outputs[0].name = "y"
    model, report = bitfold.optimize(_model([a, i1, d, b], [x], [b.outputs[0]]), ["remove-identity"], verify=True)
    assert [n.op_type for n in model.graph] == ["Relu", "Neg"]
    assert report.passes[0].max_rel == 0.0


def test_dropout_with_used_mask_or_training_mode_stays():
    x = _x()
    mask_used = ir.node("Dropout", [x], num_outputs=2)
    mask_used.outputs[0].name, mask_used.outputs[1].name = "y", "mask"
    mask_used.outputs[1].dtype, mask_used.outputs[1].shape = ir.DataType.BOOL, ir.Shape([2, 3])
    x2 = ir.val("x2", ir.DataType.FLOAT, [2, 3])
    ratio = ir.Value(name="ratio", const_value=ir.tensor(np.float32(0.5)))
    training = ir.Value(name="training", const_value=ir.tensor(np.bool_(True)))
    train = ir.node("Dropout", [x2, ratio, training])
    train.outputs[0].name = "y2"
    model = _model([mask_used, train], [x, x2], [mask_used.outputs[0], train.outputs[0]])
    model.graph.outputs.append(mask_used.outputs[1])
    model.graph.initializers["ratio"] = ratio
    model.graph.initializers["training"] = training
    assert not RemoveIdentity()(model).modified
    assert [n.op_type for n in model.graph] == ["Dropout", "Dropout"]


def test_identity_from_input_to_output_is_kept():
    x = _x()
    node = ir.node("Identity", [x])
    node.outputs[0].name = "y"
    model = _model([node], [x], [node.outputs[0]])
    assert not RemoveIdentity()(model).modified
    assert [v.name for v in model.graph.outputs] == ["y"]
