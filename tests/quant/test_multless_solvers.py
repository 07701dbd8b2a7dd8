"""Solvers behind the multiplication-less passes: grids, orderings between methods, and GPTQ compensation."""

from __future__ import annotations

import numpy as np
import pytest
from models import correlated_layer, output_error

from bitfold.quant import bcq, binary, shift


@pytest.fixture(scope="module")
def layer():
    return correlated_layer(48, 256, 1024)


def _dense(signs, alpha, group):
    return (signs * np.repeat(alpha, group, axis=2)[:, :, : signs.shape[2]]).sum(axis=0)


def test_bcq_error_falls_with_q_and_gptq_beats_plain_rounding(layer):
    w, x, h = layer
    plain = [output_error(w, _dense(*bcq.bcq(w, None, q, 64), 64), x) for q in (1, 2, 3, 4)]
    loop = [output_error(w, _dense(*bcq.bcq(w, h, q, 64), 64), x) for q in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(plain, plain[1:])) and all(a > b for a, b in zip(loop, loop[1:]))
    assert all(g < p for g, p in zip(loop, plain))


def test_bcq_alternating_least_squares_beats_its_starts_and_weights_columns(layer):
    w, _, h = layer
    w = w[:, :64]
    start, als = bcq.fit(w, 3, iters=0), bcq.fit(w, 3, iters=10)
    err = [np.linalg.norm(w - bcq.nearest(w, a)[0]) for a in (start, als)]
    assert err[1] < err[0] * 0.95
    d = np.diag(h)[:64]
    weighted = bcq.fit(w, 3, importance=d)
    werr = [(((w - bcq.nearest(w, a)[0]) ** 2) * d).sum() for a in (als, weighted)]
    assert werr[1] < werr[0]


def test_bcq_act_order_uses_static_groups_and_still_beats_rounding(layer):
    w, x, h = layer
    static = output_error(w, _dense(*bcq.bcq(w, h, 3, 64, act_order=True), 64), x)
    plain = output_error(w, _dense(*bcq.bcq(w, None, 3, 64), 64), x)
    assert static < plain


def test_bcq_signs_and_scales_reproduce_the_rounded_columns(layer):
    w, _, h = layer
    grid = bcq.BCQGrid(w.shape, 3, 64, 10, 2, np.diag(h).copy())
    from bitfold.quant.gptq import gptq_loop

    q = gptq_loop(w, h, grid, group=64)
    np.testing.assert_allclose(_dense(grid.signs, grid.alpha, 64), q, rtol=1e-5, atol=1e-7)


def test_pow2_sum_terms_are_powers_of_two_and_converge():
    a = np.random.default_rng(1).random(1000) * 0.1 + 1e-4
    errors = []
    for terms in (1, 2, 3):
        r = bcq.pow2_sum(a, terms)
        errors.append(np.abs(r - a).max() / a.max())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05
    one = bcq.pow2_sum(a, 1)
    assert np.allclose(np.log2(one), np.round(np.log2(one)))


def test_pow2_round_uses_log_domain_thresholds_and_zero_code():
    u = np.array([0.72, 0.70, -0.3, 0.0, 1e-4, 2.0])
    assert shift.pow2_round(u, 4, zero=False).tolist() == [1.0, 0.5, -0.25, 2.0**-7, 2.0**-7, 1.0]
    assert shift.pow2_round(u, 4, zero=True).tolist() == [1.0, 0.5, -0.25, 0.0, 0.0, 1.0]
    assert shift.exponent_range(3, True) == 2 and shift.exponent_range(3, False) == 3


def test_shift_scale_search_and_gptq_reduce_error(layer):
    w, x, h = layer
    units, s = shift.shift(w, None, 4, True)
    at_max = np.abs(w).max(axis=1)
    naive = at_max[:, None] * shift.pow2_round(w / at_max[:, None], 4, True)
    assert output_error(w, units * s[:, None], x) < output_error(w, naive, x)
    units_g, s_g = shift.shift(w, h, 4, True)
    assert output_error(w, units_g * s_g[:, None], x) < output_error(w, units * s[:, None], x)


def test_binary_orderings_pbllm_and_residual_beat_plain(layer):
    w, x, h = layer
    plain = output_error(w, binary.binarize(w, h).dequantized, x)
    pb = binary.binarize(w, h, salient_ratio=0.1, salience="hessian", gptq=True)
    residual = output_error(w, binary.binarize(w, h, planes=2).dequantized, x)
    assert output_error(w, pb.dequantized, x) < plain and residual < plain
    assert pb.salient.mean() == pytest.approx(0.1, abs=1e-3)
    assert np.abs(pb.codes[pb.salient]).max() <= 127
    alpha = np.abs(w).mean(axis=1)
    np.testing.assert_allclose(binary.binarize(w, None).alpha[0], alpha)  # XNOR scaling: α = mean|W|


def test_salience_that_reads_activations_needs_calibration(layer):
    with pytest.raises(ValueError, match="calibration"):
        binary.salient_mask(layer[0], None, 0.1, "hessian")


def test_ternary_is_absmean_and_gptq_helps(layer):
    w, x, h = layer
    trits, gamma = binary.ternarize(w, None)
    assert np.allclose(gamma, np.abs(w).mean()) and set(np.unique(trits)) <= {-1.0, 0.0, 1.0}
    np.testing.assert_array_equal(trits, np.clip(np.round(w / gamma[:, None]), -1, 1))
    trits_g, _ = binary.ternarize(w, h)
    assert output_error(w, trits_g * gamma[:, None], x) < output_error(w, trits * gamma[:, None], x)
