"""Every kernel against its op's numpy reference on odd shapes (CPU), its CUDA code compiled by nvcc (run and
checked where a GPU exists), and the MatMulNBits kernel at ``accuracy_level = 4`` against ONNX Runtime's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm
from cases import NAMES, case, int8_blocks, int8_codes, nbits_weights, run_ort

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
def test_cuda_kernel_compiles(name):
    m, k, n = _shape(name, 3, 100, 37)
    kernel, weights, attrs, _ = case(name, k, n)
    code = build.source(kernel, kernel.prepare([None, *weights], attrs), m, "cuda")
    assert "__global__" in code


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_kernel_matches_numpy_reference_on_a_gpu(name):
    if not tvm.cuda().exist:
        pytest.skip("no CUDA GPU on this machine")
    m, k, n = _shape(name, 3, 100, 37)
    kernel, weights, attrs, reference = case(name, k, n)
    prepared = kernel.prepare([None, *weights], attrs)
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


def _run_plain_llvm(kernel, prepared, m: int, x: np.ndarray) -> np.ndarray:
    """The kernel's TE definition built for llvm without host CPU features (so without the VNNI microkernel)."""
    plain = tvm.target.Target("llvm")
    func = build.prim_func(kernel, prepared, m, plain).with_attr("global_symbol", "main")
    assert "vpdpbusd" not in func.script()
    lib = tvm.compile(tvm.IRModule({"main": func}), target=plain)
    args = [tvm.runtime.tensor(a) for a in (x, *prepared.arrays, np.zeros((m, prepared.n), np.float32))]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("name", ["nbits4-int8", "nbits4-int8-zp"])
def test_int8_nbits_without_vnni_has_the_same_numerics(name):
    """The TE kernel (CPUs without VNNI, CUDA) quantizes activations exactly as the microkernel does."""
    m, k, n = 3, 100, 37
    kernel, weights, attrs, reference = case(name, k, n)
    prepared = kernel.prepare([None, *weights], attrs)
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    got = _run_plain_llvm(kernel, prepared, m, x)
    expected = reference(x.astype(np.float64))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert np.abs(got - x @ _float_weights(weights, attrs, k)).max() > 1e-3 * np.abs(expected).max()


def _float_weights(weights, attrs, k):
    from bitfold.quant import matmulnbits

    b, s, z = weights[:3]
    return matmulnbits.unpack(b, s, z, attrs["bits"], attrs["block_size"], k)


def _level4_bound(x: np.ndarray, weights, attrs) -> np.ndarray:
    """Largest |bitfold − ORT| per output [M, N] that float32 rounding allows when both compute the same products.

    ORT's CompInt8 (MLAS) and bitfold quantize every row's block of activations alike, codes
    q = rint(x · (127 / max|x|)) with scale max|x| / 127 in fp32 (``cases.int8_codes``; MLAS's AVX-512 quantizer
    computes 127 / amax and rounds to nearest even), and their per-block dots Σ q·(c − z) are exact integers. They
    differ only in the order and rounding of the float32 work around them: scales times dots, zero-point
    corrections, the sum over blocks, the bias. Codes, zero points and the kernel's offset are below 2^bits, so
    with T = Σ_k max(|x_k|, |x̂_k|) · |s_k| · 2^(bits+1) + |bias| (x̂ the dequantized activation, s_k the scale of
    k's block) the magnitudes of each kind of intermediate, summed over an output's terms, stay below T. An output
    is a float32 sum of n ≤ K + 2·blocks + 1 terms (K only where activations stay float) made with up to three
    roundings each, so each side is within (n + 2)·u·T of the exact value, u = 2^−24, and the two sides within
    (2K + 4·blocks + 8)·u·T of each other."""
    k, bits, block = attrs["K"], attrs["bits"], attrs["block_size"]
    codes, scale = int8_codes(x, block)
    dequantized = (codes * scale).reshape(x.shape[0], -1)[:, :k]
    magnitude = np.maximum(np.abs(x), np.abs(dequantized)).astype(np.float64)
    scales = np.repeat(np.abs(weights[1].astype(np.float64)), block, axis=1)[:, :k]  # [N, K]
    total = magnitude @ scales.T * (2 << bits)
    if len(weights) > 4 and weights[4] is not None:
        total += np.abs(weights[4])
    blocks = -(-k // block)
    return (2 * k + 4 * blocks + 8) * 2.0**-24 * total


def _check_against_ort(bits, block, zero, bias, shape):
    m, k, n = shape
    rng = np.random.default_rng(bits + block + 7 * m + k)
    weights, attrs = nbits_weights(k, n, bits, block, zero, 4, rng, bias=bias)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, ::7] *= 8.0  # uneven magnitudes within a block: the small activations lose relative precision in int8
    theirs = run_ort("MatMulNBits", "com.microsoft", weights, attrs, x)
    bound = _level4_bound(x, weights, attrs)
    kernel = find("com.microsoft", "MatMulNBits")
    prepared = kernel.prepare([None, *weights], attrs)
    w = _float_weights(weights, attrs, k)
    separation = np.abs(x.astype(np.float64) @ w - int8_blocks(x, block) @ w)
    assert (separation > 10 * bound).any(), "the bound cannot tell int8 from float activations"
    for got in (build.build(kernel, prepared, m, "cpu")(x), _run_plain_llvm(kernel, prepared, m, x)):
        excess = np.abs(got - theirs) / bound
        worst = tuple(int(i) for i in np.unravel_index(excess.argmax(), excess.shape))
        assert excess.max() <= 1, f"|bitfold − ORT| reaches {excess.max():.2f}× the rounding bound at output {worst}"


@pytest.mark.parametrize("shape", [(1, 200, 37), (3, 100, 64)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("zero,bias", [(False, False), (True, False), (True, True)], ids=["symmetric", "zero-points", "zero-points-bias"])
@pytest.mark.parametrize("block", [16, 32, 128])
def test_int8_nbits_matches_onnx_runtime_at_accuracy_level_4(block, zero, bias, shape):
    """bitfold's 4-bit ``accuracy_level = 4`` kernel (the VNNI microkernel where the CPU has it, and the TE
    kernel) against ONNX Runtime's MatMulNBits at level 4 on the CPU, within ``_level4_bound``; the products with
    float and with int8 activations lie further apart than that bound, so a kernel that did not quantize
    activations as ORT does would fail."""
    _check_against_ort(4, block, zero, bias, shape)
