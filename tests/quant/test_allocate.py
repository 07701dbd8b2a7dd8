"""The bit-allocation integer program returns the brute-force optimum and refuses impossible budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitfold.quant.allocate import allocate


def _brute_force(s, c, budget):
    best, pick = np.inf, None
    for choice in itertools.product(range(s.shape[1]), repeat=s.shape[0]):
        rows = np.arange(s.shape[0])
        if c[rows, choice].sum() <= budget and s[rows, choice].sum() < best:
            best, pick = s[rows, choice].sum(), choice
    return best, pick


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    layers, formats = 5, 4
    bits = np.array([8.0, 4.0, 3.0, 2.0])
    size = rng.integers(1, 10, layers)[:, None]
    cost = size * bits[None, :]
    sens = rng.random((layers, formats)) * 2.0 ** np.arange(formats)[None, :]  # fewer bits, more error
    budget = float(cost.min(axis=1).sum() + rng.random() * (cost.max(axis=1).sum() - cost.min(axis=1).sum()))
    best, _ = _brute_force(sens, cost, budget)
    choice = allocate(sens, cost, budget)
    rows = np.arange(layers)
    assert cost[rows, choice].sum() <= budget + 1e-9
    assert sens[rows, choice].sum() == pytest.approx(best)


def test_budget_extremes():
    sens = np.array([[0.0, 1.0], [0.0, 5.0]])
    cost = np.array([[8.0, 4.0], [8.0, 4.0]])
    assert allocate(sens, cost, 16.0).tolist() == [0, 0]
    assert allocate(sens, cost, 12.0).tolist() == [1, 0]  # the less sensitive layer gives up its bits
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(sens, cost, 7.0)
