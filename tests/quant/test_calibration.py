from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh

from bitfold.errors import BitfoldError
from bitfold.quant.calibration import CalibrationData


def _samples(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 32)).astype(np.float32) * 3} for _ in range(n)]


def test_streamed_statistics_match_numpy_on_all_activations(zoo_protos):
    model = fresh(zoo_protos, "mlp")
    samples = _samples()
    relu = next(n for n in model.graph if n.op_type == "Relu").outputs[0].name
    stats = CalibrationData(samples).collect(model, ["x", relu], gram=["x", relu], progress=False)
    xs = np.concatenate([s["x"] for s in samples])
    s = stats["x"]
    assert s.min == xs.min() and s.max == xs.max() and s.rows == 40
    np.testing.assert_allclose(s.absmax, np.abs(xs).max(0))
    np.testing.assert_allclose(s.mean_abs, np.abs(xs).mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.gram, xs.astype(np.float64).T @ xs, rtol=1e-9)
    assert s.percentile(100) == pytest.approx(np.abs(xs).max())
    assert stats[relu].min >= 0 and stats[relu].gram.shape == (64, 64)


def test_sink_weight_scales_the_first_row_of_each_sequence(zoo_protos):
    model = fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(3)]
    plain = CalibrationData(samples).collect(model, ["x"], gram=["x"], progress=False)["x"].gram
    weighted = CalibrationData(samples).collect(model, ["x"], gram=["x"], sink_weight=5.0, progress=False)["x"].gram
    firsts = np.stack([s["x"][0, 0] for s in samples]).astype(np.float64)
    np.testing.assert_allclose(weighted - plain, 4.0 * firsts.T @ firsts, rtol=1e-9, atol=1e-9)


def test_npz_source_and_errors(zoo_protos, tmp_path):
    model = fresh(zoo_protos, "mlp")
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.stack([s["x"] for s in _samples(5)]))
    data = CalibrationData.from_source(str(path), model)
    assert len(data) == 5 and next(iter(data))["x"].shape == (4, 32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((5, 4, 32), np.float32), y=np.zeros((3, 2), np.float32))
    with pytest.raises(BitfoldError, match="same number of samples"):
        CalibrationData.from_npz(bad)
    with pytest.raises(BitfoldError, match="unknown calibration source 'imagenet'"):
        CalibrationData.from_source("imagenet", model)
    with pytest.raises(BitfoldError, match="does not compute"):
        data.collect(model, ["nope"], progress=False)
    with pytest.raises(BitfoldError, match="yields no samples"):
        CalibrationData([]).collect(model, ["x"], progress=False)
