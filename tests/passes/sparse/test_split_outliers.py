"""split-outliers on the zoo: outliers stay float16, the rest lies on a 3-bit grid, the report counts the bits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import PassParameterError
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData


def test_dense_and_sparse_weights_and_the_contract(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    rng = np.random.default_rng(0)
    calibration = CalibrationData([{"input_ids": rng.integers(0, 96, (1, 8)).astype(np.int64)} for _ in range(8)])
    step = {"name": "split-outliers", "ratio": 0.02, "bits": 3, "group_size": 16, "format": "fake"}
    out, report = bitfold.optimize(bitfold.clone(model), [step], calibration, verify=True)
    assert report.passes[0].notes[0].startswith(f"14 weights, {3 + 32 / 16 + 0.02 * 48:.3f} bits per weight")
    emitted, report = bitfold.optimize(bitfold.clone(model), [{**step, "format": "op"}], calibration, verify=True)
    assert report.output["ops"]["bitfold::DenseSparseMatMul"] == 14 and emitted.opset_imports[""] >= 21
    feeds = bitfold.sample_feeds(model)
    got, want = (next(iter(bitfold.compile(m, "ort", "cpu").run(feeds).values())) for m in (emitted, out))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    before = {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None}
    checked = 0
    for node in out.graph:
        if node.name in before and node.metadata_props.get("bitfold.pass") == "split-outliers":
            w0, w = before[node.name], node.inputs[1].const_value.numpy()
            outlier = np.zeros(w0.size, bool)  # the round(ratio · size) largest original weights
            outlier[np.argsort(-np.abs(w0), axis=None, kind="stable")[: round(0.02 * w0.size)]] = True
            outlier = outlier.reshape(w0.shape)
            np.testing.assert_array_equal(w[outlier], w[outlier].astype(np.float16).astype(w.dtype), err_msg=node.name)
            for g in range(0, w.shape[0], 16):  # the rest: per output and 16-group along K, at most 2³ grid levels
                for col in range(w.shape[1]):
                    dense = w[g : g + 16, col][~outlier[g : g + 16, col]]
                    assert len(np.unique(dense)) <= 8, (node.name, g, col)
            checked += 1
    assert checked == 14
    _, second = bitfold.optimize(out, [step], calibration)
    assert not second.passes[0].modified
    with pytest.raises(PassParameterError, match="ratio"):
        bitfold.passes.create("split-outliers", {"ratio": 0.0})
