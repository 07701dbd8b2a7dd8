"""The verify-mode change check treats initializers as a name-keyed mapping."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from bitfold.passes.registry import BitfoldPass
from bitfold.pipeline import PassContractError, run_pass
from bitfold.pipeline.instrument import change_key


def _model() -> ir.Model:
    x = ir.val("x", ir.DataType.FLOAT, [1, 4])
    w = ir.Value(name="w", const_value=ir.tensor(np.arange(16, dtype=np.float32).reshape(4, 4)))
    b = ir.Value(name="b", const_value=ir.tensor(np.ones(4, np.float32)))
    mm = ir.node("MatMul", [x, w])
    add = ir.node("Add", [mm.outputs[0], b])
    add.outputs[0].name = "y"
    add.outputs[0].dtype, add.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([1, 4])
    graph = ir.Graph([x], [add.outputs[0]], nodes=[mm, add], initializers=[w, b], opset_imports={"": 17}, name="g")
    return ir.Model(graph, ir_version=10)


class _Reorder(BitfoldPass):
    """Re-registers the initializers with ``w`` last and says "not modified"."""

    name = "reorder"
    family = "canonical"

    def rewrite(self, model: ir.Model) -> int:
        model.graph.initializers.add(model.graph.initializers.pop("w"))
        return 0


class _Scale(BitfoldPass):
    """Replaces ``b`` by ``2 b`` and says "not modified"."""

    name = "scale"
    family = "canonical"

    def rewrite(self, model: ir.Model) -> int:
        b = model.graph.initializers["b"]
        b.const_value = ir.tensor(2 * b.const_value.numpy())
        return 0


def test_change_key_ignores_initializer_order_and_leaves_it_as_it_was() -> None:
    model = _model()
    key = change_key(model)
    model.graph.initializers.add(model.graph.initializers.pop("w"))
    assert list(model.graph.initializers) == ["b", "w"]
    assert change_key(model) == key
    assert list(model.graph.initializers) == ["b", "w"]


def test_verify_accepts_a_reorder_reported_unmodified_and_refuses_a_hidden_change() -> None:
    feeds = {"x": np.ones((1, 4), np.float32)}
    model = _model()
    reference = [feeds["x"] @ np.arange(16, dtype=np.float32).reshape(4, 4) + 1]
    record = run_pass(model, _Reorder(), verify=True, feeds=feeds, reference=reference)
    assert not record.modified
    assert list(model.graph.initializers) == ["b", "w"]
    with pytest.raises(PassContractError, match="pass 'scale' reported not modified but the model did change"):
        run_pass(model, _Scale(), verify=True, feeds=feeds, reference=reference)
