"""QuantEase's coordinate descent: exact objective tracking, monotone descent, coordinate-wise optimality on the
grid, never worse than its GPTQ start; and the quantize-weights method on a model."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.quant.formats import IntFormat, PerChannel, PerGroup
from bitfold.quant.gptq import gptq
from bitfold.quant.quantease import coordinate_descent, objective, quantease


def _problem(seed, n=24, k=96, samples=512):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((n, k)).astype(np.float32)
    X = rng.standard_normal((samples, k)) @ (np.eye(k) + 0.5 * rng.standard_normal((k, k)))
    return W, X.T @ X


def _damped(H, damp=0.01):
    return H + np.eye(len(H)) * damp * np.mean(np.diag(H))


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("granularity", [PerChannel(), PerGroup(32)])
def test_descent_is_monotone_tracks_the_objective_and_beats_its_gptq_start(bits, granularity):
    W, H = _problem(bits)
    fmt = IntFormat(bits)
    history: list[float] = []
    Q, scale, zero = quantease(W, H, fmt, granularity, history=history)
    start, _, _ = gptq(W, H, fmt, granularity, damp=0.01)
    Hd = _damped(H)
    assert history[0] == pytest.approx(objective(W, start, Hd), rel=1e-9)
    assert history[-1] == pytest.approx(objective(W, Q, Hd), rel=1e-9)  # tracked step by step, not recomputed
    assert all(b <= a * (1 + 1e-12) for a, b in zip(history, history[1:], strict=False))
    assert history[-1] < 0.95 * history[0], f"{bits}-bit: {history[-1] / history[0]:.3f} of GPTQ's objective"
    np.testing.assert_array_equal(Q, fmt.dequantize(fmt.quantize(Q, scale, zero), scale, zero))  # on the grid


def test_converged_solution_is_coordinate_wise_optimal():
    """No single weight moved one grid step up or down lowers the objective."""
    W, H = _problem(5, n=6, k=32, samples=256)
    fmt = IntFormat(3)
    Q, scale, zero = quantease(W, H, fmt, PerChannel(), sweeps=200, tol=0.0)
    Hd = _damped(H)
    best = objective(W, Q, Hd)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            for step in (-1.0, 1.0):
                moved = Q.copy()
                moved[i, j] += step * scale[i, j]
                on_grid = fmt.dequantize(fmt.quantize(moved[i : i + 1, j], scale[i : i + 1, j], zero[i : i + 1, j]),
                                         scale[i : i + 1, j], zero[i : i + 1, j])  # fmt: skip
                if on_grid[0] != moved[i, j]:  # clipped: off the grid
                    continue
                assert objective(W, moved, Hd) >= best * (1 - 1e-12)


def test_dead_inputs_get_zero_weight_and_zero_sweeps_return_the_start():
    W, H = _problem(2)
    H[:, 7] = H[7, :] = 0.0
    fmt = IntFormat(4)
    Q, _, _ = quantease(W, H, fmt, PerGroup(32))
    assert not Q[:, 7].any()
    start, _, _ = gptq(W, H, fmt, PerGroup(32), damp=0.01)
    same, _, _ = quantease(W, H, fmt, PerGroup(32), sweeps=0)
    np.testing.assert_array_equal(same, start)
    with pytest.raises(ValueError, match="start"):
        quantease(W, H, fmt, PerGroup(32), start="awq")


def test_blocked_updates_equal_one_block():
    """The lazy per-block residual update gives the same descent as updating every column of R at every step."""
    W, H = _problem(9, k=64)
    fmt = IntFormat(3)
    scale, zero = (np.broadcast_to(p, W.shape).copy() for p in fmt.params(W.min(1, keepdims=True), W.max(1, keepdims=True)))
    Q0 = fmt.dequantize(fmt.quantize(W, scale, zero), scale, zero)
    Hd = _damped(H)
    a, ha = coordinate_descent(W, Hd, Q0, fmt, scale, zero, sweeps=5, tol=0.0, block_size=16)
    b, hb = coordinate_descent(W, Hd, Q0, fmt, scale, zero, sweeps=5, tol=0.0, block_size=64)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ha, hb, rtol=1e-9)


def test_quantease_method_lowers_the_output_error_of_gptq_on_a_decoder(zoo_protos):
    """quantize-weights method = quantease against gptq on the same decoder, grid and calibration data: the
    layer objective is lower by construction, and so is the model's output error on held-out inputs."""
    rng = np.random.default_rng(0)
    calib = CalibrationData([{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(128)])
    held = [{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(16)]
    model, _ = bitfold.optimize(fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope"), list(CANONICAL))
    run = lambda m, feeds: next(iter(OrtRunnable(m, device="cpu").run(feeds).values()))  # noqa: E731
    reference = [run(model, feeds) for feeds in held]
    errors = {}
    for method in ("gptq", "quantease"):
        step = {"name": "quantize-weights", "method": method, "bits": 3, "group_size": 16, "format": "fake"}
        out, report = bitfold.optimize(bitfold.clone(model), [step], calib)
        assert report.passes[0].ops_removed.get("MatMul", 0) == 0 and report.passes[0].modified
        errors[method] = sum(float(np.sum((run(out, f) - r) ** 2)) for f, r in zip(held, reference, strict=True))
    assert errors["quantease"] < errors["gptq"], errors


def test_outlier_aware_descent_moves_outliers_in_float16_and_codes_on_the_grid():
    """split-outliers' dense-and-sparse solution, then QuantEase's outlier-aware descent: the objective falls below
    GPTQ's, the outliers stay where the mask says and are float16 values, every other weight is on its grid."""
    from bitfold.quant.sparse import dense_and_sparse

    W, H = _problem(11, n=32, k=128)
    W[0, :4] *= 20  # a few outliers
    fmt = IntFormat(3)
    Hd = _damped(H)
    q, outliers, scale = dense_and_sparse(W, H, fmt, PerGroup(32), 0.02, damp=0.01, block_size=128, act_order=True)
    zero = np.zeros_like(scale)
    moved, history = coordinate_descent(W, Hd, q, fmt, scale, zero, free=outliers)
    assert history[-1] < 0.95 * history[0] and history[0] == pytest.approx(objective(W, q, Hd), rel=1e-9)
    assert history[-1] == pytest.approx(objective(W, moved, Hd), rel=1e-9)
    np.testing.assert_array_equal(moved[outliers], moved[outliers].astype(np.float16).astype(np.float32))
    assert not np.array_equal(moved[outliers], q[outliers].astype(np.float32))  # the outliers moved too
    dense = np.where(outliers, 0.0, moved)
    np.testing.assert_array_equal(dense, np.where(outliers, 0.0, fmt.dequantize(fmt.quantize(dense, scale, zero), scale, zero)))


def test_split_outliers_quantease_solver_lowers_the_output_error(zoo_protos):
    """split-outliers at 2 bits with solver quantease against gptq: lower model output error on the calibration
    inputs (what the layer objectives measure); quantease without the GPTQ start is refused."""
    rng = np.random.default_rng(4)
    calib = CalibrationData([{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(32)])
    model, _ = bitfold.optimize(fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope"), list(CANONICAL))
    feeds = list(calib)
    run = lambda m, f: next(iter(OrtRunnable(m, device="cpu").run(f).values()))  # noqa: E731
    reference = [run(model, f) for f in feeds]
    errors = {}
    for solver in ("gptq", "quantease"):
        step = {"name": "split-outliers", "solver": solver, "bits": 2, "group_size": 16, "ratio": 0.02, "keep_ends": False, "format": "fake"}
        out, _ = bitfold.optimize(bitfold.clone(model), [step], calib)
        errors[solver] = sum(float(np.sum((run(out, f) - r) ** 2)) for f, r in zip(feeds, reference, strict=True))
    assert errors["quantease"] < errors["gptq"], errors
    with pytest.raises(bitfold.BitfoldError, match="needs gptq|gptq = true"):
        bitfold.optimize(bitfold.clone(model), [{"name": "split-outliers", "solver": "quantease", "gptq": False}], calib)
