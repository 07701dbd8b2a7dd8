from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.ops import hadamard
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.quant.quantize_tokens import token_quant
from bitfold.passes.transforms.rotate import Rotate, learn_rotation
from bitfold.passes.transforms.structure import residual_stream
from bitfold.quant.calibration import CalibrationData


@pytest.fixture(scope="module")
def folded(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), [*CANONICAL, "fold-norm-affine"])
    return bitfold.clone(model)


@pytest.mark.parametrize("online", [True, False])
def test_rotation_keeps_outputs(folded, online):
    model, report = bitfold.optimize(bitfold.clone(folded), [{"name": "rotate", "online": online}], verify=True)
    record = report.passes[0]
    assert record.modified and record.max_rel <= 1e-5
    assert record.ops_added == ({"bitfold::Hadamard": 4} if online else {})
    assert model.graph.metadata_props["bitfold.rotated"] == "seed=0"


def test_weights_really_rotate_and_the_seed_matters(folded):
    a, _ = bitfold.optimize(bitfold.clone(folded), [{"name": "rotate", "seed": 0}])
    b, _ = bitfold.optimize(bitfold.clone(folded), [{"name": "rotate", "seed": 1}])
    table = lambda m: next(n for n in m.graph if n.op_type == "Gather").inputs[0].const_value.numpy()  # noqa: E731
    original = table(folded)
    ta, tb = table(a), table(b)
    assert not np.allclose(ta, original) and not np.allclose(ta, tb)
    assert np.allclose(np.linalg.norm(ta, axis=1), np.linalg.norm(original, axis=1), rtol=1e-5)  # orthogonal
    c, _ = bitfold.optimize(bitfold.clone(folded), [{"name": "rotate", "seed": 0}])
    assert np.array_equal(table(c), ta)


def test_rerun_and_unfolded_norms_are_refused_with_a_reason(zoo_protos, folded):
    rotated, _ = bitfold.optimize(bitfold.clone(folded), ["rotate"])
    _, again = bitfold.optimize(rotated, ["rotate"])
    assert not again.passes[0].modified and "already rotated" in again.passes[0].notes[0]
    raw, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    _, report = bitfold.optimize(raw, ["rotate"])
    assert not report.passes[0].modified and "fold-norm-affine first" in report.passes[0].notes[0]
    assert not isinstance(residual_stream(raw.graph), str)


def test_graph_without_a_stream_is_refused(zoo_protos):
    from bitfold.errors import PassPreconditionError

    model = fresh(zoo_protos, "encoder-layernorm")
    with pytest.raises(PassPreconditionError, match="embedding Gather"):
        bitfold.optimize(model, [*CANONICAL, "fold-norm-affine", "rotate"])


def _ids(n: int = 4, seed: int = 0) -> CalibrationData:
    rng = np.random.default_rng(seed)
    return CalibrationData([{"input_ids": rng.integers(0, 96, (1, 8)).astype(np.int64)} for _ in range(n)])


def test_learned_rotation_keeps_outputs_and_lowers_its_loss(folded):
    steps = [{"name": "rotate", "learn_steps": 20, "learn_rows": 32, "learn_lr": 0.01}]
    model, report = bitfold.optimize(bitfold.clone(folded), steps, _ids(), verify=True)
    assert report.passes[0].modified and report.passes[0].max_rel <= 1e-5
    before, after = map(float, model.graph.metadata_props["bitfold.rotated"].split("learned ")[1].split(" -> "))
    assert after < before


@pytest.mark.parametrize("symmetric", [False, True])
def test_learned_stream_rotation_beats_its_start_on_an_independent_oracle(symmetric):
    """The loss of the module doc, computed with quantize-tokens' numpy rounding, falls from Q to the learned R."""
    rng = np.random.default_rng(1)
    k = 32
    rows = [rng.standard_normal((64, k)) * np.where(np.arange(k) < 2, 25.0, 1.0) for _ in range(3)]  # outlier channels
    weights = [rng.standard_normal((k, n)) for n in (48, 16, 96)]
    q = Rotate.solve(k, np.random.default_rng(0))
    r, before, after = learn_rotation(rows, weights, q, 1, True, 4, symmetric, 60, 0.01, 0)
    assert np.allclose(r.T @ r, np.eye(k), atol=1e-10)
    assert before == pytest.approx(_oracle(rows, weights, [q] * 3, symmetric), rel=1e-3)
    assert after == pytest.approx(_oracle(rows, weights, [r] * 3, symmetric), rel=1e-3)
    assert after < 0.95 * before


def test_learned_online_blocks_are_hadamard_kronecker_factors_that_lower_the_loss():
    rng = np.random.default_rng(2)
    k, p = 48, 8  # blocks of 6 (n = 6 · 8)
    rows = [rng.standard_normal((64, k)) * np.where(np.arange(k) % 7 == 0, 15.0, 1.0) for _ in range(2)]
    weights = [rng.standard_normal((k, 24)) for _ in range(2)]
    block = hadamard.random_block(k // p, np.random.default_rng(0))
    _, before, after, factors = learn_rotation(rows, weights, hadamard.matrix(block, p), p, False, 4, False, 60, 0.01, 0, factors=True)
    learned = [hadamard.matrix(block @ e, p) for e in factors]
    assert len(factors) == 2 and not np.allclose(factors[0], factors[1])  # one block per writer
    assert all(np.allclose(r.T @ r, np.eye(k), atol=1e-10) for r in learned)
    assert before == pytest.approx(_oracle(rows, weights, [hadamard.matrix(block, p)] * 2, False), rel=1e-3)
    assert after == pytest.approx(_oracle(rows, weights, learned, False), rel=1e-3)
    assert after < 0.9 * before


def _oracle(rows, weights, rotations, symmetric):
    return sum(
        np.sum(((token_quant(x @ r, 4, 1.0, symmetric) - x @ r) @ r.T @ w) ** 2) / np.sum((x @ w) ** 2)
        for x, w, r in zip(rows, weights, rotations, strict=True)
    )


def test_larger_online_blocks_keep_outputs(folded):
    model, report = bitfold.optimize(bitfold.clone(folded), [{"name": "rotate", "online_block": 5}], verify=True)
    assert report.passes[0].max_rel <= 1e-5
    sizes = {n.inputs[1].const_value.shape[0] for n in model.graph if n.op_type == "Hadamard"}
    assert min(sizes) >= 5 and all(s & (s - 1) for s in sizes)  # grown from the odd part, never a power of two


def test_learning_needs_calibration_and_valid_settings(folded):
    with pytest.raises(BitfoldError, match="calibration"):
        bitfold.optimize(bitfold.clone(folded), [{"name": "rotate", "learn_steps": 5}])
    with pytest.raises(BitfoldError, match="learn_bits"):
        bitfold.optimize(bitfold.clone(folded), [{"name": "rotate", "learn_steps": 5, "learn_bits": 1}], _ids())
