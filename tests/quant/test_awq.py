"""AWQ scale search: the reported error is the exact layer-output error of the returned scale, the search is never
worse than RTN nor than the activation-only family alone, and the weight term wins where weight rows dominate."""

from __future__ import annotations

import numpy as np

from bitfold.quant.awq import awq_scale
from bitfold.quant.formats import format_from, granularity_from, rtn


def _quantizer(bits=3, group=16):
    fmt, granularity = format_from(f"int{bits}"), granularity_from(group)
    return lambda w: rtn(w.T, fmt, granularity)[0].T


def _error(weights, H, s, quantize):
    return sum(float(np.sum(d * (H @ d))) for d in (w - quantize(w * s[:, None]) / s[:, None] for w in weights))


def test_search_returns_its_exact_error_and_is_never_worse_than_rtn_or_activation_only_scales():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 32)) * np.exp(rng.standard_normal(32))
    H = x.T @ x
    weights = [rng.standard_normal((32, 24)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)]
    quantize = _quantizer()
    found = awq_scale(weights, H, np.abs(x).mean(axis=0), quantize, grid=10, group_size=16)
    rtn_error = _error(weights, H, np.ones(32), quantize)
    assert found.relative_error <= 1.0
    assert np.isclose(_error(weights, H, found.scale.astype(np.float64), quantize), found.relative_error * rtn_error, rtol=1e-4)
    mean_abs = np.abs(x).mean(axis=0)
    activation_only = min(_error(weights, H, (s := mean_abs**a) / np.sqrt(s.max() * s.min()), quantize) for a in np.linspace(0, 1, 11))
    assert found.relative_error * rtn_error <= activation_only * (1 + 1e-9)


def test_weight_term_is_chosen_when_one_input_row_dominates_its_group():
    """Row 0 is 20x larger than its group: group scales follow it and the other rows round coarsely; equal activation
    magnitudes give the activation-only family nothing to work with, the weight term shrinks row 0."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    w[[0, 16]] *= 20
    x = rng.standard_normal((512, 32))
    found = awq_scale([w], x.T @ x, np.ones(32), _quantizer(), grid=10, group_size=16)
    assert found.weight_term and found.relative_error < 0.9
    assert found.scale[0] < found.scale[1:16].min()
