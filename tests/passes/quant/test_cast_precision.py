from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.registry import ISLAND_KEY
from bitfold.quant.calibration import CalibrationData


def _calibration(shape, n=4, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return CalibrationData([{"x": (rng.standard_normal(shape) * scale).astype(np.float32)} for _ in range(n)])


@pytest.mark.parametrize("name, shape", [("cnn-bn", (2, 3, 16, 16)), ("decoder-rmsnorm-swiglu-rope", (1, 8, 32))])
def test_float16_halves_bytes_with_bounded_error_and_float32_io(zoo_protos, name, shape):
    dtype, bound = "float16", 2e-3
    model, _ = bitfold.optimize(fresh(zoo_protos, name), list(CANONICAL))
    converted, report = bitfold.optimize(bitfold.clone(model), [{"name": "cast-precision", "dtype": dtype}], _calibration(shape), verify=True)
    assert report.passes[0].max_rel <= bound
    assert report.output["parameter_bytes"] <= 0.55 * report.input["parameter_bytes"]
    assert [v.dtype for v in converted.graph.inputs] == [ir.DataType.FLOAT]
    assert [v.dtype for v in converted.graph.outputs] == [ir.DataType.FLOAT]
    low = ir.DataType.FLOAT16
    assert any(v.dtype == low for n in converted.graph for v in n.outputs)
    _, again = bitfold.optimize(converted, [{"name": "cast-precision", "dtype": dtype}], _calibration(shape))
    assert not again.passes[0].modified


def test_cnn_needs_exactly_the_two_edge_casts(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), list(CANONICAL))
    _, report = bitfold.optimize(model, ["cast-precision"], _calibration((2, 3, 16, 16)))
    assert report.passes[0].ops_added == {"Cast": 2}


def test_values_beyond_float16_range_stay_in_float32_islands():
    x = ir.val("x", ir.DataType.FLOAT, [4, 8])
    big = ir.Value(name="big", const_value=ir.tensor(np.float32(1e5)))
    one = ir.Value(name="one", const_value=ir.tensor(np.float32(1.0)))
    up = ir.node("Mul", [x, big], name="up")
    shift = ir.node("Add", [up.outputs[0], one], name="shift")
    down = ir.node("Div", [shift.outputs[0], big], name="down")
    relu = ir.node("Relu", [down.outputs[0]], name="relu")
    y = relu.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([4, 8])
    graph = ir.Graph([x], [y], nodes=[up, shift, down, relu], initializers=[big, one], opset_imports={"": 21}, name="g")
    model, report = bitfold.optimize(ir.Model(graph, ir_version=10), ["cast-precision"], _calibration((4, 8)), verify=True)
    kept = {n.name for n in model.graph if n.metadata_props.get("bitfold.precision") == "float32"}
    assert {"up", "shift", "down"} <= kept and "relu" not in kept
    assert report.passes[0].max_rel <= 1e-3


def test_bfloat16_islands_come_from_an_emulation_and_the_emitted_model_computes_in_bfloat16(zoo_protos):
    """ORT's CPU has no bfloat16 arithmetic: islands are chosen on fp32 arithmetic over bfloat16-rounded tensors,
    and the emitted bfloat16 model (run by ONNX's reference evaluator) stays within bfloat16's error of fp32."""
    from onnx.reference import ReferenceEvaluator

    from bitfold.backends.ort import OrtRunnable

    model, _ = bitfold.optimize(fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope"), list(CANONICAL))
    calibration = _calibration((1, 8, 32))
    feeds = next(iter(_calibration((1, 8, 32), n=1, seed=1)))
    ref = next(iter(OrtRunnable(model, device="cpu", optimization="none").run(feeds).values()))
    converted, report = bitfold.optimize(bitfold.clone(model), [{"name": "cast-precision", "dtype": "bfloat16"}], calibration)
    low = ir.DataType.BFLOAT16
    assert report.output["parameter_bytes"] <= 0.55 * report.input["parameter_bytes"]
    assert any(v.dtype == low for v in converted.graph.initializers.values())
    assert [v.dtype for v in converted.graph.outputs] == [ir.DataType.FLOAT]
    emitted = ReferenceEvaluator(ir.to_proto(converted)).run(None, feeds)[0]
    scale = np.abs(ref).max()
    assert 1e-4 < np.abs(emitted - ref).max() / scale < 2e-2  # bfloat16 has 8 significant bits

    emulated = bitfold.clone(model)
    before = {n.name for n in emulated.graph}
    emulated, _ = bitfold.optimize(emulated, [{"name": "cast-precision", "dtype": "bfloat16", "emulate": True}], calibration)
    added = [n for n in emulated.graph if n.name not in before]
    assert added and all(n.op_type == "Cast" for n in added)  # round trips only: the arithmetic stays fp32
    assert {v.name for v in emulated.graph.outputs} == {v.name for v in model.graph.outputs}
    got = next(iter(OrtRunnable(emulated, device="cpu", optimization="none").run(feeds).values()))
    assert 1e-4 < np.abs(got - ref).max() / scale < 2e-2
    _, again = bitfold.optimize(emulated, [{"name": "cast-precision", "dtype": "bfloat16", "emulate": True}], calibration)
    assert not again.passes[0].modified
    _, again = bitfold.optimize(converted, [{"name": "cast-precision", "dtype": "bfloat16"}], calibration)
    assert not again.passes[0].modified


def test_islands_chosen_in_slices_of_exposed_tensors_are_the_same(zoo_protos, monkeypatch):
    """Bounded memory on large graphs: the precision search exposes a slice of the tensors per run, same result."""
    from bitfold.quant import calibration

    model, _ = bitfold.optimize(fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope"), list(CANONICAL))
    options = [{"name": "cast-precision", "tolerance": 2e-4}]
    whole, _ = bitfold.optimize(bitfold.clone(model), options, _calibration((1, 8, 32)))
    monkeypatch.setattr(calibration, "EXPOSED_PER_RUN", 2)
    sliced, _ = bitfold.optimize(bitfold.clone(model), options, _calibration((1, 8, 32)))

    def islands(m):
        return sorted(n.name for n in m.graph if n.metadata_props.get(ISLAND_KEY) == "float32")

    assert islands(whole) == islands(sliced) and islands(whole)  # some node is kept fp32 at this tolerance
