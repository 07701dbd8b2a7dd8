from __future__ import annotations

import numpy as np

from bitfold.quant.eora import eora


def test_a_gram_with_no_energy_gives_a_zero_branch():
    """An input that is always zero: nothing to fit, and no 1/√λ blow-up."""
    delta = np.random.default_rng(2).standard_normal((8, 6))
    l1, l2 = eora(delta, np.zeros((8, 8)), 3)
    assert l1.shape == (8, 3) and l2.shape == (3, 6)
    assert not l1.any() and not l2.any()
