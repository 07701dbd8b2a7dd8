"""Bit-plane packing and the four multiplication-less MatMul ops: reference == ONNX function under ORT == dense."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import bitfold
from bitfold.errors import BitfoldError
from bitfold.ops import bcq, binary, bitplanes, shift, ternary

SHAPES = [(1, 1), (5, 3), (13, 7), (64, 4), (100, 9)]


def _run(module, k: int, arrays: list[np.ndarray], x: np.ndarray, opset: int = 18, **attributes) -> np.ndarray:
    xv = ir.val("x", ir.DataType.FLOAT, list(x.shape))
    consts = [ir.Value(name=f"w{i}", const_value=ir.tensor(a)) for i, a in enumerate(arrays)]
    node = ir.node(module.OP_TYPE, [xv, *consts], domain="bitfold", name="op", attributes=attributes)
    y = node.outputs[0]
    y.name, y.dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([xv], [y], nodes=[node], initializers=consts, opset_imports={"": opset}, name="g")
    model = ir.Model(graph, ir_version=10)
    module.ensure_function(model)
    return next(iter(bitfold.compile(model, "ort", "cpu").run({"x": x}).values()))


def _close(a, b):
    scale = max(np.abs(b).max(), 1e-6)
    assert np.abs(np.asarray(a, np.float64) - b).max() <= 1e-5 * scale


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bitplanes_round_trip_and_cost_exactly_b_bits(k, n, bits):
    codes = np.random.default_rng(k * n + bits).integers(0, 1 << bits, (k, n))
    packed = bitplanes.pack(codes, bits)
    assert packed.shape == (bits, -(-k // 8), n) and packed.dtype == np.uint8
    np.testing.assert_array_equal(bitplanes.unpack(packed, k), codes)
    with pytest.raises(ValueError, match="lie in"):
        bitplanes.pack(codes + (1 << bits), bits)


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_bitplanes_refuse_codes_wider_than_a_byte(bits):
    """uint8 planes of codes with more than 8 bits would lose the high bits (code 300 at 9 bits read back as 44)."""
    codes = np.array([[300], [5]]) if bits > 8 else np.zeros((2, 1), np.int64)
    with pytest.raises(BitfoldError, match=f"bit planes hold codes of 1 to 8 bits, got bits = {bits}"):
        bitplanes.pack(codes, bits)


def test_bitplane_layout_is_lsb_first_along_k():
    codes = np.zeros((10, 1), np.int64)
    codes[1, 0], codes[9, 0] = 1, 3  # k = 1 → byte 0 bit 1; k = 9 → byte 1 bit 1, both planes
    packed = bitplanes.pack(codes, 2)
    assert packed[:, :, 0].tolist() == [[2, 2], [0, 2]]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("bits,zero", [(3, 1), (3, 0), (4, 1), (4, 0)])
def test_shift_reference_equals_ort_function_equals_dense(k, n, bits, zero):
    rng = np.random.default_rng(k + n + bits)
    units = shift.decode(rng.integers(0, 1 << bits, (k, n)), bits, zero)
    assert (units == 0).any() == bool(zero) or k * n < 8
    p, s = shift.pack(units, rng.random(n) + 0.5, bits, zero)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    dense = x.astype(np.float64) @ shift.unpack(p, s, k, zero)
    _close(shift.evaluate(x, p, s, zero), dense)
    _close(_run(shift, k, [p, s], x, zero=zero), dense)
    with pytest.raises(ValueError, match="powers of two"):
        shift.pack(units * 0.7 + 0.01, s, bits, zero)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("q,group", [(1, 8), (2, 16), (3, 128), (4, 8)])
def test_bcq_lut_path_equals_reference_equals_ort_function(k, n, q, group):
    rng = np.random.default_rng(k * 7 + q)
    signs = rng.choice([-1, 1], (q, k, n))
    alpha = rng.random((q, -(-k // group), n)) + 0.1
    p, a = bcq.pack(signs, alpha)
    assert a.dtype == np.float16
    w = (signs * bcq.expand(a, k, group)).sum(axis=0)
    np.testing.assert_allclose(bcq.unpack(p, a, k, group), w, rtol=1e-6)
    x = rng.standard_normal((2, k)).astype(np.float32)
    dense = x.astype(np.float64) @ w
    _close(bcq.evaluate(x, p, a, group), dense)
    _close(bcq.evaluate_lut(x, p, a, group), dense)
    _close(_run(bcq, k, [p, a], x, group_size=group), dense)


def test_bcq_refuses_groups_that_split_a_byte():
    with pytest.raises(ValueError, match="multiple of 8"):
        bcq.expand(np.ones((1, 1, 1)), 8, 12)


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("planes,salient,binarize_input", [(1, False, 0), (2, False, 0), (1, True, 0), (1, False, 1), (2, True, 1)])
def test_binary_reference_equals_ort_function_equals_dense(k, n, planes, salient, binarize_input):
    rng = np.random.default_rng(k + 3 * n + planes)
    signs = rng.choice([-1, 1], (planes, k, n))
    alpha, mean = rng.random((planes, n)) + 0.1, rng.standard_normal(n) * 0.1
    mask = rng.random((k, n)) < 0.2 if salient else None
    codes = rng.integers(-127, 128, (k, n)) if salient else None
    tensors = binary.pack(signs, alpha, mean, mask, codes, rng.random(n) * 0.01 if salient else None)
    w = (signs * alpha[:, None, :]).sum(axis=0) + mean
    if salient:
        w = np.where(mask, codes * tensors[5].astype(np.float64), w)
    np.testing.assert_allclose(binary.unpack(*tensors, k), w, rtol=1e-5, atol=1e-6)
    x = rng.standard_normal((3, k)).astype(np.float32)
    xin = binary.binarize_activations(x.astype(np.float64)) if binarize_input else x.astype(np.float64)
    dense = xin @ w
    _close(binary.evaluate(x, *tensors, binarize_input=binarize_input), dense)
    _close(_run(binary, k, list(tensors), x, binarize_input=binarize_input), dense)


@pytest.mark.parametrize("k,n", SHAPES)
def test_ternary_reference_equals_ort_function_equals_dense(k, n):
    rng = np.random.default_rng(k + n)
    trits = rng.integers(-1, 2, (k, n))
    p, g = ternary.pack(trits, rng.random(n) + 0.5)
    assert p.shape[0] == 2
    np.testing.assert_array_equal(ternary.trits(p, k), trits)
    x = rng.standard_normal((2, 2, k)).astype(np.float32)
    dense = x.astype(np.float64) @ (trits * g.astype(np.float64))
    _close(ternary.evaluate(x, p, g), dense)
    _close(_run(ternary, k, [p, g], x), dense)
    with pytest.raises(ValueError, match="−1, 0 or \\+1"):
        ternary.pack(trits * 2, g)


def test_functions_import_the_model_opset():
    x = np.ones((1, 8), np.float32)
    p, s = shift.pack(np.ones((8, 2)), np.ones(2), 3, True)
    got = _run(shift, 8, [p, s], x, opset=13, zero=1)
    np.testing.assert_allclose(got, np.full((1, 2), 8.0))


@pytest.mark.parametrize("k,n_out", [(8, 3), (13, 5), (64, 4), (101, 2)])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3)])
def test_sparse_nm_layout_reference_equals_ort_function_equals_dense(k, n_out, n, m):
    from bitfold.ops import sparse
    from bitfold.quant.sparse import NM, select

    rng = np.random.default_rng(k + n + m)
    w = rng.standard_normal((n_out, k))
    w = (w * select(np.abs(w), NM(n, m), per_row=True)).T.astype(np.float32)  # [K, N]
    w[0, 0] = 0.0  # a group with fewer non-zeros than n
    values, index = sparse.pack(w, n, m)
    assert values.shape == (-(-k // m) * n, n_out) and index.shape[0] == sparse.index_bits(m)
    np.testing.assert_array_equal(sparse.unpack(values, index, k, n, m), w)
    x = rng.standard_normal((2, k)).astype(np.float32)
    dense = x.astype(np.float64) @ w
    _close(sparse.evaluate(x, values, index, n, m), dense)
    _close(_run(sparse, k, [values, index], x, n=n, m=m), dense)
    with pytest.raises(ValueError, match="sparse"):
        sparse.pack(np.ones((8, 2), np.float32), n, m)


@pytest.mark.parametrize("k,n_out", [(1, 1), (13, 5), (64, 7), (100, 3)])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5])
def test_csr_reference_equals_ort_function_equals_dense(k, n_out, density):
    from bitfold.ops import csr

    rng = np.random.default_rng(k + n_out)
    w = (rng.standard_normal((k, n_out)) * (rng.random((k, n_out)) < density)).astype(np.float32)
    if n_out > 2:
        w[:, 1] = 0.0  # an empty row between non-empty ones
    values, cols, pointers = csr.pack(w)
    assert len(values) == np.count_nonzero(w) and pointers[-1] == len(values)
    np.testing.assert_array_equal(csr.unpack(values, cols, pointers, k), w)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    dense = x.astype(np.float64) @ w
    _close(csr.evaluate(x, values, cols, pointers), dense)
    _close(_run(csr, k, [values, cols, pointers], x), dense)


@pytest.mark.parametrize("k,n_out,block", [(16, 3, 16), (40, 5, 16), (64, 4, 64)])
@pytest.mark.parametrize("bits", [3, 8])
def test_dense_sparse_reference_equals_ort_function_equals_dense(k, n_out, block, bits):
    from bitfold.ops import dense_sparse

    rng = np.random.default_rng(k + bits)
    top = (1 << (bits - 1)) - 1
    codes = rng.integers(-top, top + 1, (k, n_out))
    outliers = (rng.random((k, n_out)) < 0.05) * rng.standard_normal((k, n_out)) * 10
    codes[outliers != 0] = 0
    scale = rng.random((-(-k // block), n_out)) * 0.1 + 0.01
    tensors = dense_sparse.pack(codes, scale, outliers, bits)
    w = codes * np.repeat(scale, block, axis=0)[:k] + outliers.astype(np.float16)
    np.testing.assert_allclose(dense_sparse.unpack(*tensors, block), w, rtol=1e-6, atol=1e-6)
    x = rng.standard_normal((2, k)).astype(np.float32)
    dense = x.astype(np.float64) @ w
    _close(dense_sparse.evaluate(x, *tensors, block), dense)
    _close(_run(dense_sparse, k, list(tensors), x, opset=21, block_size=block), dense)


@pytest.mark.parametrize("k,n_out,r,c", [(16, 8, 4, 4), (13, 7, 2, 3), (64, 5, 4, 8)])
@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9])
def test_block_csr_reference_equals_ort_function_equals_dense(k, n_out, r, c, ratio):
    from bitfold.ops import block_csr
    from bitfold.quant.sparse import Block, select

    rng = np.random.default_rng(k + r)
    wt = rng.standard_normal((n_out, k))
    wt = wt * select(np.abs(wt), Block(r, c, ratio), per_row=False)
    w = wt.T.astype(np.float32)
    values, cols, pointers = block_csr.pack(w, r, c)
    np.testing.assert_array_equal(block_csr.unpack(values, cols, pointers, k, n_out), w)
    x = rng.standard_normal((2, k)).astype(np.float32)
    dense = x.astype(np.float64) @ w
    _close(block_csr.evaluate(x, values, cols, pointers, n_out), dense)
    _close(_run(block_csr, k, [values, cols, pointers], x, n=n_out), dense)
