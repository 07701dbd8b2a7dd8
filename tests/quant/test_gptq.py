"""GPTQ's blocked, Cholesky-based solver against a direct implementation of the same sequential OBS updates."""

from __future__ import annotations

import numpy as np
import pytest

from bitfold.quant.formats import IntFormat, PerChannel, PerGroup, fake_quantize
from bitfold.quant.gptq import gptq


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
    np.testing.assert_allclose(fmt.dequantize(codes, scale, zero), Q, atol=1e-5), "Q lies on its own grid"


def test_dead_inputs_get_zero_weight():
    W, H, _ = _problem(3)
    H[5, :] = H[:, 5] = 0
    Q, _, _ = gptq(W, H, IntFormat(4), PerChannel())
    assert np.all(Q[:, 5] == 0)
