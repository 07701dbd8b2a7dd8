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
    for node in out.graph:
        if node.name in before and node.metadata_props.get("bitfold.pass") == "split-outliers":
            w = node.inputs[1].const_value.numpy()
            for g in range(0, w.shape[0], 16):  # per output and 16-group: ≤ 8 grid levels + float16 outliers
                levels = [len(np.unique(col)) for col in w[g : g + 16].T]
                assert max(levels) <= 8 + int(np.ceil(0.02 * w.size))
    _, second = bitfold.optimize(out, [step], calibration)
    assert not second.passes[0].modified
    with pytest.raises(PassParameterError, match="ratio"):
        bitfold.passes.create("split-outliers", {"ratio": 0.0})
