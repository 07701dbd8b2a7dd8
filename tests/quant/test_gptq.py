"""GPTQ's blocked, Cholesky-based solver against a direct implementation of the same sequential OBS updates."""

from __future__ import annotations

import numpy as np
import pytest

from bitfold.errors import BitfoldError
from bitfold.quant.formats import IntFormat, PerChannel, PerGroup, fake_quantize
from bitfold.quant.gptq import FormatGrid, gptq, gptq_loop


def direct_gptq(W, H, fmt, granularity, damp):
    """Column by column with the explicit inverse Hessian, eliminated one row/column at a time (no Cholesky,
    no blocking): quantize w_i, spread (w_i - q_i) / Hinv_ii along Hinv's row, remove i from Hinv."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    n, k = W.shape
    H += np.eye(k) * damp * np.mean(np.diag(H))
    Hinv = np.linalg.inv(H)
    Q = np.zeros_like(W)
    scale = zero = None
    for i in range(k):
        if isinstance(granularity, PerChannel) and i == 0:
            scale, zero = fmt.params(W.min(1), W.max(1))
        elif isinstance(granularity, PerGroup) and i % granularity.size == 0:
            block = W[:, i : i + granularity.size]
            scale, zero = fmt.params(block.min(1), block.max(1))
        q = fmt.dequantize(fmt.quantize(W[:, i].astype(np.float32), scale, zero), scale, zero)
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= np.outer(err, Hinv[i, i:])
        Hinv -= np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return Q


def _problem(seed, n=24, k=96, samples=512):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, k)).astype(np.float32)
    X = rng.standard_normal((samples, k)) @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)))
    return W, X.T @ X, X


@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(32)])
@pytest.mark.parametrize("bits", [4, 3])
def test_blocked_cholesky_gptq_equals_direct(granularity, bits):
    W, H, _ = _problem(bits)
    fmt = IntFormat(bits)
    Q, _, _ = gptq(W, H, fmt, granularity, block_size=32, damp=0.01)
    expected = direct_gptq(W, H, fmt, granularity, 0.01)
    mismatch = np.mean(~np.isclose(Q, expected, atol=1e-5))
    assert mismatch <= 0.002, f"{mismatch:.3%} of weights differ"


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_beats_rtn(act_order):
    W, H, X = _problem(7)
    fmt, g = IntFormat(4), PerGroup(32)
    Q, scale, zero = gptq(W, H, fmt, g, act_order=act_order)
    rtn = fake_quantize(W, fmt, g)
    err = lambda A: np.linalg.norm((W - A) @ X.T)  # noqa: E731
    assert err(Q) < 0.8 * err(rtn)
    codes = fmt.quantize(Q, scale, zero)
    np.testing.assert_allclose(fmt.dequantize(codes, scale, zero), Q, atol=1e-5, err_msg="Q does not lie on its own grid")


def test_dead_inputs_get_zero_weight():
    W, H, _ = _problem(3)
    H[5, :] = H[:, 5] = 0
    Q, _, _ = gptq(W, H, IntFormat(4), PerChannel())
    assert np.all(Q[:, 5] == 0)


@pytest.mark.parametrize("damp", [0.0, -0.01, float("nan"), float("inf"), 1.5])
def test_damp_outside_its_range_is_refused_naming_the_field(damp):
    W, H, _ = _problem(1, n=4, k=8, samples=32)
    with pytest.raises(BitfoldError, match=r"^damp must be a finite number in \(0, 1\]"):
        gptq(W, H, IntFormat(4), PerChannel(), damp=damp)
    grid = FormatGrid(IntFormat(4), W.shape)
    with pytest.raises(BitfoldError, match="^damp must"):
        gptq_loop(W, H, grid, damp=damp)


def test_non_finite_hessian_is_refused():
    W, H, _ = _problem(1, n=4, k=8, samples=32)
    H[2, 3] = H[3, 2] = np.nan
    with pytest.raises(BitfoldError, match="inf or NaN"):
        gptq(W, H, IntFormat(4), PerChannel())


def _indefinite(H, margin):
    """H shifted so that its smallest eigenvalue is -margin · mean(diag) of the result (a non-PD, NaN-free H)."""
    k = len(H)
    low = np.linalg.eigvalsh(H)[0]
    mean = np.mean(np.diag(H)) - low  # mean diagonal after subtracting low · I
    return H - (low + margin * mean / (1 + margin)) * np.eye(k)


def test_indefinite_hessian_gets_ten_times_the_dampening_and_says_so():
    W, H, _ = _problem(5, n=16, k=64, samples=256)
    H = _indefinite(H, 0.05)  # damp 0.01 leaves it indefinite, damp 0.1 does not
    assert np.linalg.eigvalsh(H + 0.01 * np.mean(np.diag(H)) * np.eye(len(H)))[0] < 0
    notes = []
    Q, _, _ = gptq(W, H, IntFormat(4), PerGroup(32), damp=0.01, notes=notes)
    assert notes == ["H is not positive definite with damp 0.01; used damp 0.1"]
    again = []
    expected, _, _ = gptq(W, H, IntFormat(4), PerGroup(32), damp=0.1, notes=again)
    assert again == []
    np.testing.assert_array_equal(Q, expected)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(16)])
def test_hessian_no_dampening_repairs_falls_back_to_round_to_nearest(granularity, act_order):
    k = 64
    H = np.eye(k) + 100.0 * (np.ones((k, k)) - np.eye(k))  # diagonal 1, an eigenvalue of -99
    W = np.random.default_rng(2).standard_normal((12, k)).astype(np.float32)
    notes = []
    Q, _, _ = gptq(W, H, IntFormat(4), granularity, act_order=act_order, notes=notes)
    assert notes == ["H is not positive definite even with damp 10; rounded to nearest (no GPTQ error feedback)"]
    np.testing.assert_array_equal(Q, fake_quantize(W, IntFormat(4), granularity))


@pytest.mark.parametrize("case", ["zero-column", "duplicate-columns", "fewer-samples-than-inputs"])
def test_singular_calibration_hessians_need_no_fallback(case):
    rng = np.random.default_rng(11)
    k = 48
    X = rng.standard_normal((256, k)) @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)))  # correlated inputs
    if case == "zero-column":
        X[:, [4, 30]] = 0.0
    elif case == "duplicate-columns":
        X[:, 10:20] = X[:, :10]
    else:
        X = X[:16]
    W = rng.standard_normal((8, k)).astype(np.float32)
    notes = []
    Q, _, _ = gptq(W, X.T @ X, IntFormat(4), PerGroup(16), notes=notes)
    assert notes == [] and np.isfinite(Q).all()
    if case == "zero-column":
        assert np.all(Q[:, [4, 30]] == 0)
    err = lambda A: np.linalg.norm((W - A) @ X.T)  # noqa: E731
    assert err(Q) < 0.8 * err(fake_quantize(W, IntFormat(4), PerGroup(16)))


@pytest.mark.parametrize("act_order", [False, True])
def test_scales_come_back_per_element_constant_within_groups(act_order):
    """Held per group while the loop runs, returned per element: K not a multiple of the group, the last group
    short; with act_order the groups keep their columns and take the unquantized weights' ranges."""
    from bitfold.quant.clip import group_params

    W, H, _ = _problem(5, n=8, k=100)
    fmt = IntFormat(4, symmetric=False)
    Q, scale, zero = gptq(W, H, fmt, PerGroup(32), act_order=act_order)
    assert scale.shape == zero.shape == W.shape and scale.flags.c_contiguous
    for start in range(0, 100, 32):
        group = scale[:, start : start + 32]
        assert (group == group[:, :1]).all()
    codes = np.round(Q / scale + zero)
    np.testing.assert_allclose(fmt.dequantize(codes, scale, zero), Q, atol=1e-6)
    assert codes.min() >= 0 and codes.max() <= 15
    if act_order:
        expected = group_params(W, fmt, PerGroup(32))
        np.testing.assert_array_equal(scale, expected[0])
        np.testing.assert_array_equal(zero, expected[1])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("clip", ["none", "output"])
def test_solving_in_the_gram_matrix_own_memory_gives_the_same_bits(act_order, clip):
    # 1100 inputs: the in-place transpose's 512 x 512 tiles, a partial one included; a Gram matrix summed in blocks
    # is not exactly symmetric (perturbed here), and a dead input keeps its place in the permutation
    rng = np.random.default_rng(11)
    W, H, _ = _problem(11, n=8, k=1100, samples=1200)
    H += 1e-9 * rng.standard_normal(H.shape) * np.mean(np.diag(H))
    H[7, :] = H[:, 7] = 0.0
    fmt, g = IntFormat(3), PerGroup(64)
    expected = gptq(W, H, fmt, g, act_order=act_order, clip=clip)
    found = gptq(W, H.copy(), fmt, g, act_order=act_order, clip=clip, overwrite_h=True)
    for e, f in zip(expected, found, strict=True):
        np.testing.assert_array_equal(f, e)


def test_a_dampening_retry_in_the_gram_matrix_own_memory_starts_from_the_same_matrix():
    W, H, _ = _problem(5, n=16, k=64, samples=256)
    H = _indefinite(H, 0.05)  # damp 0.01 fails, damp 0.1 does not: the second attempt needs H again
    notes, again = [], []
    expected, _, _ = gptq(W, H, IntFormat(4), PerGroup(32), damp=0.01, act_order=True, notes=notes)
    found, _, _ = gptq(W, H.copy(), IntFormat(4), PerGroup(32), damp=0.01, act_order=True, notes=again, overwrite_h=True)
    assert notes == again == ["H is not positive definite with damp 0.01; used damp 0.1"]
    np.testing.assert_array_equal(found, expected)


def test_a_read_only_gram_matrix_is_not_overwritten():
    W, H, _ = _problem(2)
    H.setflags(write=False)
    kept = H.copy()
    Q, _, _ = gptq(W, H, IntFormat(4), PerGroup(32), act_order=True, overwrite_h=True)
    np.testing.assert_array_equal(H, kept)
    np.testing.assert_array_equal(Q, gptq(W, kept, IntFormat(4), PerGroup(32), act_order=True)[0])
