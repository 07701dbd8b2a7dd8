from __future__ import annotations

import numpy as np
from conftest import fresh

import bitfold
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.transforms.lowrank_split import LowrankSplit


def test_split_keeps_outputs_and_branches_stay_float(zoo_protos):
    model, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), [*CANONICAL, {"name": "lowrank-split", "rank": 8}], verify=True)
    record = report.passes[-1]
    # every projection (q, k, v, o, gate, up, down per block, and the head): 15 splits, min(K, N) = 48 > 16
    assert record.modified and record.max_rel <= 1e-5
    assert record.ops_added == {"MatMul": 30, "Add": 15}
    quantized, q_report = bitfold.optimize(model, [{"name": "quantize-weights", "format": "fake", "bits": 4, "group_size": -1}])
    assert sum("bitfold.quantized" in n.metadata_props for n in quantized.graph) == 15  # only the residuals
    branches = [n for n in quantized.graph if n.metadata_props.get("bitfold.precision") == "float32"]
    assert len(branches) == 30 and not any("bitfold.quantized" in n.metadata_props for n in branches)
    _, again = bitfold.optimize(model, [{"name": "lowrank-split", "rank": 8}])
    assert not again.passes[0].modified


def test_residual_quantizes_better_than_the_weight_with_an_outlier_direction():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)) * 0.05
    w += 3.0 * np.outer(rng.standard_normal(96), rng.standard_normal(64))  # a dominant rank-1 direction
    l1, l2 = LowrankSplit.solve(w, 4)
    r = w - l1 @ l2
    assert np.linalg.matrix_rank(l1 @ l2) == 4
    assert np.linalg.norm(r, 2) < 0.1 * np.linalg.norm(w, 2)

    def rtn4(a):
        s = np.abs(a).max(axis=0, keepdims=True) / 7
        return np.clip(np.round(a / s), -8, 7) * s

    assert np.linalg.norm(rtn4(r) + l1 @ l2 - w) < 0.5 * np.linalg.norm(rtn4(w) - w)
