"""Mixed-precision bit allocation as an integer program (scipy.optimize.milp).

Given, for L layers and F candidate formats, a sensitivity S[l, f] (the model error when only layer l takes
format f) and a cost C[l, f] (the bits layer l occupies in format f), pick one format per layer minimising
Σ S[l, f(l)] subject to Σ C[l, f(l)] <= budget. Variables x[l, f] ∈ {0, 1}, one per layer summing to 1. Additive
sensitivity is the usual first-order assumption (HAWQ, MixPrec); the solver is exact for it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


def allocate(sensitivity: np.ndarray, cost: np.ndarray, budget: float) -> np.ndarray:
    """Format index per layer (L,) minimising total sensitivity within ``budget``; ValueError if infeasible."""
    s, c = np.asarray(sensitivity, np.float64), np.asarray(cost, np.float64)
    if s.shape != c.shape or s.ndim != 2:
        raise ValueError(f"sensitivity {s.shape} and cost {c.shape} must both be (layers, formats)")
    layers, formats = s.shape
    cheapest = c.min(axis=1).sum()
    if budget < cheapest:
        raise ValueError(f"budget {budget:g} is below the cheapest allocation ({cheapest:g}); raise it or add cheaper formats")
    one_each = np.kron(np.eye(layers), np.ones(formats))
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(c.reshape(1, -1), -np.inf, budget)]
    result = milp(s.ravel(), constraints=constraints, integrality=np.ones(s.size), bounds=Bounds(0, 1))
    if not result.success:
        raise ValueError(f"the integer program found no allocation: {result.message}")
    return np.round(result.x).reshape(layers, formats).argmax(axis=1)
