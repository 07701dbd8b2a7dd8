"""Graph edits shared by the transform passes keep a float16 graph in float16."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

import bitfold
from bitfold.passes.transforms.weights import float_dtype, insert_scale


def _fp16_linear(k: int = 32, n: int = 24, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    """y = x · W in float16, x (4, k)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float16)
    x = ir.val("x", ir.DataType.FLOAT16, [4, k])
    weight = ir.Value(name="W", const_value=ir.tensor(w, name="W"))
    matmul = ir.node("MatMul", [x, weight], name="linear")
    y = matmul.outputs[0]
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT16, ir.Shape([4, n])
    graph = ir.Graph([x], [y], nodes=[matmul], initializers=[weight], opset_imports={"": 21}, name="fp16")
    return ir.Model(graph, ir_version=10), w


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("op_type", ["Mul", "Add"])
def test_inserted_scale_takes_the_dtype_of_its_input(op_type):
    model, w = _fp16_linear()
    factor = np.random.default_rng(1).uniform(0.5, 2.0, 32)
    insert_scale(model.graph, model.graph.inputs[0], factor, "scale", op_type=op_type)
    node = next(n for n in model.graph if n.op_type == op_type)
    assert node.inputs[1].const_value.dtype == ir.DataType.FLOAT16
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float16)
    got = _run(model, x)
    moved = x.astype(np.float32) * factor if op_type == "Mul" else x.astype(np.float32) + factor
    want = moved @ w.astype(np.float32)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=1e-2 * np.abs(want).max())


def test_lowrank_split_of_an_fp16_linear_stays_fp16_and_equivalent():
    model, w = _fp16_linear()
    x = np.random.default_rng(3).standard_normal((4, 32)).astype(np.float16)
    want = _run(model, x)
    split, report = bitfold.optimize(model, [{"name": "lowrank-split", "rank": 4}])
    assert report.passes[0].ops_added == {"MatMul": 2, "Add": 1}
    for node in split.graph:
        assert all(v.dtype == ir.DataType.FLOAT16 for v in node.inputs if v.const_value is not None), node.name
    got = _run(split, x)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=1e-2 * np.abs(want).max())


def test_float_dtype_of_an_untyped_value_comes_from_its_producers():
    table = ir.Value(name="table", const_value=ir.tensor(np.zeros((8, 4), np.float16), name="table"))
    ids = ir.val("ids", ir.DataType.INT64, [2])
    gathered = ir.node("Gather", [table, ids]).outputs[0]  # untyped
    assert gathered.dtype is None and float_dtype(gathered) == np.float16
    cast = ir.node("Cast", [ids], attributes={"to": ir.DataType.BFLOAT16}).outputs[0]
    assert float_dtype(ir.node("Relu", [cast]).outputs[0]) == np.dtype(ir.DataType.BFLOAT16.numpy())
    assert float_dtype(ir.node("Relu", [ids]).outputs[0]) == np.float32  # no floating source: the default


def test_inserted_rotation_takes_the_dtype_of_its_input():
    from bitfold.passes.transforms.affine import insert_matrix

    model, w = _fp16_linear()
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((32, 32)))
    insert_matrix(model.graph, model.graph.inputs[0], q)
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float16)
    got = _run(model, x)
    want = x.astype(np.float32) @ q @ w.astype(np.float32)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=0, atol=1e-2 * np.abs(want).max())
