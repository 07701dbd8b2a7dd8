from __future__ import annotations

import numpy as np
from conftest import fresh

import bitfold
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.transforms.affine import learn_scale
from bitfold.quant.calibration import CalibrationData


def _ids(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return CalibrationData([{"input_ids": rng.integers(0, 96, (1, 8)).astype(np.int64)} for _ in range(n)])


def test_affine_keeps_outputs_and_covers_every_projection(zoo_protos):
    steps = [*CANONICAL, "fold-norm-affine", {"name": "affine", "steps": 20, "rows": 64}]
    model, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), steps, _ids(), verify=True)
    record = report.passes[-1]
    assert record.modified and record.max_rel <= 1e-5
    # q/k/v, o, gate/up, down per block and the head: 9 groups; o_proj's input has no absorber: 2 explicit Muls
    assert sum(1 for n in model.graph if "bitfold.affine" in n.metadata_props) == 2 * 7 + 1
    assert sum("explicit per-channel Mul" in note for note in record.notes) == 2
    _, again = bitfold.optimize(model, [{"name": "affine", "steps": 20, "rows": 64}], _ids())
    assert not again.passes[0].modified


def test_learned_scale_lowers_the_quantized_error_on_outlier_channels():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)) * np.exp(rng.standard_normal(64) * 1.5)  # a few channels carry outliers
    w = rng.standard_normal((64, 32)) * 0.1
    s, before, after = learn_scale(x, [w], np.ones(64), 4, 4, steps=150, lr=0.05, seed=0)
    assert after < 0.7 * before and np.all(s > 0)
    again = learn_scale(x, [w], np.ones(64), 4, 4, steps=150, lr=0.05, seed=0)
    assert np.array_equal(again[0], s)  # seeded


def test_block_affine_keeps_outputs_with_an_explicit_float_rotation(zoo_protos):
    steps = [*CANONICAL, "fold-norm-affine", {"name": "affine", "steps": 10, "rows": 64, "block": 8}]
    model, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), steps, _ids(), verify=True)
    record = report.passes[-1]
    assert record.modified and record.max_rel <= 1e-4
    inverses = [n for n in model.graph if n.name.endswith("_affine_rotation")]
    assert inverses and len(inverses) == sum("explicit float32 MatMul" in note for note in record.notes)
    for node in inverses:
        assert node.metadata_props["bitfold.precision"] == "float32"
        matrix = node.inputs[1].const_value.numpy()
        off_block = matrix.copy()
        for start in range(0, matrix.shape[0], 8):
            off_block[start : start + 8, start : start + 8] = 0
        assert np.all(off_block == 0) and not np.allclose(matrix, np.diag(np.diag(matrix)))  # blocks, not a diagonal
        np.testing.assert_allclose(matrix @ matrix.T, np.eye(len(matrix)), atol=1e-5)  # orthogonal
    kept = {n.name: n.inputs[1].const_value.numpy().copy() for n in inverses}
    quantized, _ = bitfold.optimize(model, [{"name": "quantize-weights", "bits": 4, "format": "fake"}])
    after = {n.name: n.inputs[1].const_value.numpy() for n in quantized.graph if n.name in kept}
    assert after.keys() == kept.keys() and all(np.array_equal(after[k], kept[k]) for k in kept)  # quantizers skip R


def test_block_rotation_beats_the_diagonal_on_correlated_outliers():
    from bitfold.passes.transforms.affine import learn_rotation

    rng = np.random.default_rng(0)
    mix = np.kron(np.eye(4), rng.standard_normal((16, 16)))  # outliers shared inside blocks of 16 channels
    x = (rng.standard_normal((256, 64)) * np.exp(rng.standard_normal(64) * 1.5)) @ mix
    w = rng.standard_normal((64, 32)) * 0.1
    s, _, diagonal = learn_scale(x, [w], np.ones(64), 4, 4, steps=100, lr=0.05, seed=0)
    _, block = learn_rotation(x / s, [s[:, None] * w], 16, 4, 4, steps=100, lr=0.05, seed=0)
    assert block < 0.9 * diagonal
