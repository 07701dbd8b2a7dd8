"""``bitfold.kernels.shift``: the exponent-subtraction product against float arithmetic on every code and on
inf, NaN, signed zeros, denormals and values at the edges of the float32 range, one product at a time and through
the whole kernel."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from bitfold.kernels import build
from bitfold.kernels import shift as k_shift
from bitfold.ops import shift

TINY = np.finfo(np.float32).tiny  # 2^-126, the smallest normal float32
SPECIAL = np.array(
    [np.inf, -np.inf, np.nan, -np.nan, 0.0, -0.0, 1e-45, -1e-45, TINY * (1 - 2.0**-23), TINY, -TINY, 1.5 * TINY, 1.5 * 2.0**-125,
     -(2.0**-120), 2.0**-119 * 1.75, 1.0, -3.5, 6.0e20, 3.0e38, -np.finfo(np.float32).max, np.finfo(np.float32).max],
    np.float32,
)  # fmt: skip


def _flushed(products: np.ndarray) -> np.ndarray:
    """float32 products with every finite value below the smallest normal replaced by a zero of its sign."""
    small = np.isfinite(products) & (np.abs(products) < TINY)
    return np.where(small, np.copysign(np.float32(0), products), products).astype(np.float32)


def _run_products(x: np.ndarray, codes: np.ndarray, bits: int, zero: int) -> np.ndarray:
    n = x.size
    xs, cs = te.placeholder((n,), "float32", "x"), te.placeholder((n,), "uint32", "c")
    y = te.compute((n,), lambda i: k_shift._shifted(xs[i], cs[i], bits, zero), name="y")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([xs, cs, y]).with_attr("global_symbol", "main")}), target="llvm")
    args = [tvm.runtime.tensor(a) for a in (x, codes.astype(np.uint32), np.zeros(n, np.float32))]
    lib["main"](*args)
    return args[-1].numpy()


def _assert_same_floats(got: np.ndarray, expected: np.ndarray) -> None:
    """NaN where expected is NaN, and every other value bit for bit (the sign of zero included)."""
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    bad = np.flatnonzero(got[~nan].view(np.uint32) != expected[~nan].view(np.uint32))
    assert bad.size == 0, f"{bad.size} products differ, e.g. {got[~nan][bad[:5]]} for {expected[~nan][bad[:5]]}"


@pytest.mark.parametrize("bits,zero", [(3, 1), (4, 0), (4, 1)])
def test_product_is_the_float_product_with_a_power_of_two_flushed_below_the_smallest_normal(bits, zero):
    """Every code times inf, -inf, NaN, ±0, denormals, normals whose shifted exponent lands on 0 or below, and the
    largest floats: the float32 product x · (−1)^s · 2^(−e) (x · ±0 for the zero code), with results below 2^−126
    flushed to a zero of their sign."""
    rng = np.random.default_rng(0)
    values = np.concatenate([SPECIAL, (rng.standard_normal(40) * 10.0 ** rng.integers(-38, 38, 40)).astype(np.float32)])
    codes = np.arange(1 << bits)
    x, c = (a.ravel() for a in np.meshgrid(values, codes, indexing="ij"))
    with np.errstate(invalid="ignore"):  # inf · 0 and NaN · w are NaN, as in the kernel
        expected = _flushed(x * shift.decode(c, bits, bool(zero)).astype(np.float32))
    _assert_same_floats(_run_products(x, c, bits, zero), expected)


def test_shifts_landing_on_exponent_field_zero_flush_to_signed_zero():
    x = np.array([1.5 * 2.0**-125, -1.5 * 2.0**-125, 2.0**-126, 1.75 * 2.0**-124], np.float32)
    codes = np.array([2, 2, 1, 3])  # 4-bit codes, sign bit clear: exponents 2, 2, 1, 3
    got = _run_products(x, codes, 4, 0)
    np.testing.assert_array_equal(got.view(np.uint32), np.array([0.0, -0.0, 0.0, 0.0], np.float32).view(np.uint32))
    assert np.signbit(got).tolist() == [False, True, False, False]


def _special_case(bits: int, zero: int, k: int = 21, n: int = 24):
    """Codes covering every code in every column's first rows, activations with inf, -inf, NaN, values whose sum or
    scaled sum overflows, denormals and signed zeros; per-output scales 1 and 4."""
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 1 << bits, (k, n))
    codes[0] = np.arange(n) % (1 << bits)
    codes[1] = codes[0]  # rows 0 and 1 carry the same code: two huge equal terms overflow where e = 0
    scale = np.where(np.arange(n) % 2 == 0, 1.0, 4.0).astype(np.float32)
    p, s = shift.pack(shift.decode(codes, bits, bool(zero)), scale, bits, bool(zero))
    x = rng.standard_normal((7, k)).astype(np.float32)
    x[0, 3] = np.inf
    x[1, 5] = -np.inf
    x[2, 7] = np.nan
    x[3, :2] = 2.0e38  # 4e38 where both terms keep e = 0: +-inf; finite at 2^-1 or below
    x[4, 0] = 1.0e38  # 1e38 · 4 overflows in the scale multiply where e = 0
    x[5] = np.where(rng.random(k) < 0.5, 1e-45, 2.0**-127).astype(np.float32)  # denormals: their products flush to zero
    x[6] = np.where(rng.random(k) < 0.5, 0.0, -0.0).astype(np.float32)
    return p, s, x


@pytest.mark.parametrize("bits,zero", [(3, 1), (4, 0)])
def test_kernel_propagates_inf_and_nan_and_overflows_like_the_numpy_reference(bits, zero):
    p, s, x = _special_case(bits, zero)
    k = x.shape[1]
    prepared = k_shift.KERNEL.prepare([None, p, s], {"K": k, "zero": zero})
    got = build.build(k_shift.KERNEL, prepared, x.shape[0], "cpu")(x)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = shift.evaluate(x, p, s, zero)
    assert np.isnan(expected[:3]).any() and np.isinf(expected[:5]).any()  # the case reaches every special
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-30)
    assert (got[5:] == 0).all()  # denormal and zero activations give zeros, never a wrong denormal
