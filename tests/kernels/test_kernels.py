"""Every kernel against its op's numpy reference on odd shapes (CPU), and its CUDA code compiled by nvcc (run and
checked where a GPU exists)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm
from cases import NAMES, case

from bitfold.kernels import build, find

# (M, K, N): K and N not multiples of a vector, a group or a 64-output task
SHAPES = [(1, 64, 32), (3, 100, 37), (2, 72, 19), (2, 196, 128)]


def _shape(name, m, k, n):
    if name == "hadamard":
        return {100: (m, 9 * 16, 9 * 16), 196: (m, 3 * 64, 3 * 64)}.get(k, (m, 72, 72))
    return m, k, n


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cpu_kernel_matches_numpy_reference(name, shape):
    m, k, n = _shape(name, *shape)
    kernel, weights, attrs, reference = case(name, k, n)
    prepared = kernel.prepare([None, *weights], attrs)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    expected = reference(x.astype(np.float64))
    got = build.build(kernel, prepared, m, "cpu")(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_kernel_compiles_and_runs_where_a_gpu_exists(name):
    m, k, n = _shape(name, 3, 100, 37)
    kernel, weights, attrs, reference = case(name, k, n)
    prepared = kernel.prepare([None, *weights], attrs)
    code = build.source(kernel, prepared, m, "cuda")
    assert "__global__" in code
    if not tvm.cuda().exist:
        return
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    expected = reference(x.astype(np.float64))
    np.testing.assert_allclose(build.build(kernel, prepared, m, "cuda")(x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_registry_covers_every_bitfold_op_and_matmulnbits():
    from bitfold import ops

    for module in (ops.bcq, ops.binary, ops.block_csr, ops.csr, ops.dense_sparse, ops.hadamard, ops.shift, ops.sparse, ops.ternary):
        assert find("bitfold", module.OP_TYPE) is not None, module.OP_TYPE
    assert find("com.microsoft", "MatMulNBits") is not None


def test_dense_kernel_takes_only_large_fp32_weights_on_the_cpu():
    """Plain MatMuls with weights that stay in cache remain standard ops, and so do CUDA's and non-fp32 ones."""
    dense = find("", "MatMul")
    large, small = np.zeros((576, 192), np.float32), np.zeros((128, 128), np.float32)
    assert dense.select([None, large], {}, "cpu")
    assert not dense.select([None, small], {}, "cpu")
    assert not dense.select([None, large], {}, "cuda")
    assert not dense.select([None, large.astype(np.float16)], {}, "cpu")


def test_dense_strips_hold_each_tasks_columns_contiguous():
    from bitfold.kernels import dense, schedule

    w = np.arange(24 * 16384, dtype=np.float32).reshape(24, 16384)
    strips = dense.strips(w)
    width = schedule.tile(16384)
    assert strips.shape == (16384 // width, 24, width)
    assert strips[3, 5, 7] == w[5, 3 * width + 7]
    assert dense.strips(w[:, :37]).shape == (1, 24, 37)  # a width the tile does not divide: one strip


def test_nbits_layout_puts_outputs_innermost():
    from bitfold.kernels import nbits

    codes = np.arange(2 * 64).reshape(2, 64) % 16  # N = 2, K = 64
    packed = nbits.relayout(codes, 4, 32)
    assert packed.shape == (1, 2, 16, 2)
    assert packed[0, 0, 0, 1] == (codes[1, 0] | (codes[1, 1] << 4))
    wide = nbits.relayout(np.zeros((4096, 64), np.uint8), 4, 32)
    assert wide.shape[0] * wide.shape[3] == 4096 and wide.shape[3] % 16 == 0 and wide.shape[0] > 1


@pytest.mark.parametrize("name", ["bcq3", "binary", "ternary"])
def test_lookup_microkernel_serves_wide_layers_on_avx512(name):
    from bitfold.kernels import lut

    target = build.target("cpu")
    if not lut.available(target):
        pytest.skip("the CPU has no AVX-512")
    kernel, weights, attrs, _ = case(name, 196, 128)
    script = build.prim_func(kernel, kernel.prepare([None, *weights], attrs), 2, target).script()
    assert "permvar" in script and "gemv" not in script


def test_int8_nbits_takes_the_vnni_microkernel_where_present():
    from bitfold.kernels import vnni

    target = build.target("cpu")
    if not vnni.available(target):
        pytest.skip("the CPU has no AVX-512 VNNI")
    kernel, weights, attrs, _ = case("nbits4-int8-zp", 196, 128)
    script = build.prim_func(kernel, kernel.prepare([None, *weights], attrs), 2, target).script()
    assert "vpdpbusd" in script and "gemv" not in script


@pytest.mark.parametrize("name", ["nbits4-int8", "nbits4-int8-zp"])
def test_int8_nbits_without_vnni_has_the_same_numerics(name):
    """The TE kernel (CPUs without VNNI, CUDA) quantizes activations exactly as the microkernel does."""
    m, k, n = 3, 100, 37
    kernel, weights, attrs, reference = case(name, k, n)
    prepared = kernel.prepare([None, *weights], attrs)
    plain = tvm.target.Target("llvm")
    func = build.prim_func(kernel, prepared, m, plain).with_attr("global_symbol", "main")
    assert "vpdpbusd" not in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func}), target=plain)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    args = [tvm.runtime.tensor(a) for a in (x, *prepared.arrays, np.zeros((m, n), np.float32))]
    lib["main"](*args)
    expected = reference(x.astype(np.float64))
    np.testing.assert_allclose(args[-1].numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(args[-1].numpy() - x @ _float_weights(weights, attrs, k)).max() > 1e-3 * np.abs(expected).max()


def _float_weights(weights, attrs, k):
    from bitfold.quant import matmulnbits

    b, s, z = weights
    return matmulnbits.unpack(b, s, z, attrs["bits"], attrs["block_size"], k)
