from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.errors import BitfoldError
from bitfold.ops.functions import upgrade_opset

_REDUCE = """
<ir_version: 10, opset_import: ["" : {opset}]>
reduce (float[4,8] x) => (float[4,1] m, float[1,8] p) {{
    [mean] m = ReduceMean <axes = [-1]> (x)
    [max] p = ReduceMax <axes = [0]> (x)
}}
"""


def _model(opset: int) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(_REDUCE.format(opset=opset)))


def test_upgrade_moves_reduce_axes_to_an_input_in_place_and_keeps_the_outputs():
    model = _model(17)
    nodes = list(model.graph)
    for node in nodes:
        node.metadata_props["bitfold.tag"] = node.name
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    before = OrtRunnable(bitfold.clone(model), device="cpu").run({"x": x})
    upgrade_opset(model, 21)
    assert model.opset_imports[""] == 21
    assert list(model.graph) == nodes  # the same node objects, so collected nodes stay valid
    assert [n.inputs[1].const_value.numpy().tolist() for n in nodes] == [[-1], [0]]
    assert all("axes" not in n.attributes and n.metadata_props["bitfold.tag"] == n.name for n in nodes)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    after = OrtRunnable(model, device="cpu").run({"x": x})
    for name in ("m", "p"):
        np.testing.assert_array_equal(after[name], before[name])


def test_upgrade_refuses_models_older_than_opset_13():
    model = _model(11)
    with pytest.raises(BitfoldError, match="upgrade the model to opset 21 first"):
        upgrade_opset(model, 21)
    assert model.opset_imports[""] == 11

