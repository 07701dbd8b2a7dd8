from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import bitfold
from bitfold.ops import functions, hadamard


def _model(n: int, block: np.ndarray, opset: int = 18) -> ir.Model:
    x = ir.val("x", ir.DataType.FLOAT, [2, 3, n])
    b = ir.Value(name="b", const_value=ir.tensor(block.astype(np.float32)))
    node = hadamard.make_node(x, b, "h")
    y = node.outputs[0]
    y.name, y.dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], [y], nodes=[node], initializers=[b], opset_imports={"": opset}, name="g")
    model = ir.Model(graph, ir_version=10)
    hadamard.ensure_function(model)
    return model


@pytest.mark.parametrize("n", [1, 2, 12, 40, 64, 576, 1536])
def test_reference_equals_ort_function_equals_dense(n):
    rng = np.random.default_rng(n)
    m, p = hadamard.split(n)
    assert m * p == n and p & (p - 1) == 0 and m % 2 == 1
    block = hadamard.random_block(m, rng)
    x = rng.standard_normal((2, 3, n)).astype(np.float32)
    ref = hadamard.evaluate(x, block)
    dense = x.astype(np.float64) @ hadamard.matrix(block, p)
    got = next(iter(bitfold.compile(_model(n, block), "ort", "cpu").run({"x": x}).values()))
    assert np.abs(ref - dense).max() <= 1e-5 * np.abs(dense).max()
    assert np.abs(got - dense).max() <= 1e-5 * np.abs(dense).max()


def test_matrix_is_orthogonal_and_blocks_are_seeded():
    for n in (24, 576):
        m, p = hadamard.split(n)
        r = hadamard.matrix(hadamard.random_block(m, np.random.default_rng(0)), p)
        assert np.allclose(r @ r.T, np.eye(n), atol=1e-12)
    a, b = (hadamard.random_block(9, np.random.default_rng(3)) for _ in range(2))
    assert np.array_equal(a, b)


def test_function_takes_the_model_opset_and_raises_old_models():
    model = _model(8, np.ones((1, 1)), opset=20)
    (function,) = model.functions.values()
    assert function.opset_imports[""] == 20 and model.opset_imports["bitfold"] == 1
    old = _model(8, np.ones((1, 1)), opset=13)
    assert old.opset_imports[""] == functions.MIN_OPSET


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        hadamard.split(0)
    with pytest.raises(ValueError, match="power of two"):
        hadamard.evaluate(np.zeros((2, 12), np.float32), np.eye(5))
