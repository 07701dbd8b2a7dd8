"""prune on the zoo: patterns hold on the graph's weights, overrides and exclusions, orderings, the contract."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh
from models import token_calibration

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.errors import PassParameterError
from bitfold.passes.canonical import CANONICAL


@pytest.fixture(scope="module")
def lm(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    feeds = bitfold.sample_feeds(model)
    return model, feeds, token_calibration(32), _out(model, feeds)


def _out(model, feeds):
    return next(iter(OrtRunnable(model, device="cpu", optimization="none").run(feeds).values()))


def _weights(model):
    return {n.name: n.inputs[1].const_value.numpy() for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured:0.5", "nm:2:4"])
def test_pattern_holds_on_every_pruned_weight_and_rerun_is_a_no_op(lm, method, pattern):
    model, feeds, calibration, _ = lm
    step = {"name": "prune", "method": method, "pattern": pattern}
    pruned, report = bitfold.optimize(bitfold.clone(model), [step], calibration, verify=True)
    before, after = _weights(model), _weights(pruned)
    changed = [name for name in after if not np.array_equal(after[name], before[name])]
    assert len(changed) == 14  # all but the head
    for name in changed:
        w = after[name]  # MatMul layout (K, N): groups run along K
        if pattern == "nm:2:4":
            assert ((w.reshape(-1, 4, w.shape[1]) != 0).sum(axis=1) <= 2).all()
        else:
            assert (w == 0).mean() == pytest.approx(0.5, abs=1 / w.shape[0])
    assert report.passes[0].notes == ["14 weights, 0.5000 of their elements zero"]
    assert np.isfinite(_out(pruned, feeds)).all()
    _, second = bitfold.optimize(pruned, [step], calibration)
    assert not second.passes[0].modified


def test_sparsegpt_beats_wanda_beats_magnitude_on_calibration_outputs(lm):
    """In-sample: the toy model has too few tokens for SparseGPT's Hessian to generalise (the real-model ordering
    is in benchmarks/sparse_table.py)."""
    model, _, calibration, _ = lm
    feeds = next(iter(calibration))
    ref = _out(model, feeds)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned, _ = bitfold.optimize(bitfold.clone(model), [{"name": "prune", "method": method, "pattern": "unstructured:0.6"}], calibration)
        errors[method] = np.linalg.norm(_out(pruned, feeds) - ref) / np.linalg.norm(ref)
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_overrides_and_exclude_pick_layers(lm):
    model, _, calibration, _ = lm
    names = list(_weights(model))
    step = {"name": "prune", "method": "magnitude", "pattern": "nm:2:4", "overrides": [f"{names[0]}=unstructured:0.25"],
            "exclude": [names[1]]}  # fmt: skip
    pruned, _ = bitfold.optimize(bitfold.clone(model), [step], calibration)
    after = _weights(pruned)
    assert (after[names[0]] == 0).mean() == pytest.approx(0.25, abs=0.01)
    assert np.array_equal(after[names[1]], _weights(model)[names[1]])


def test_joint_int4_quantization(lm):
    model, _, calibration, _ = lm
    pruned, _ = bitfold.optimize(bitfold.clone(model), [{"name": "prune", "pattern": "nm:2:4", "bits": 4, "group_size": -1}], calibration)
    for w in list(_weights(pruned).values())[:-1]:
        assert all(len(np.unique(np.round(col, 6))) <= 16 for col in w.T)


@pytest.mark.parametrize(
    "params,match",
    [({"pattern": "nm:4:2"}, "0 < N < M"), ({"overrides": ["nm:2:4"]}, "<glob>=<pattern>"), ({"method": "wanda", "bits": 4}, "sparsegpt")],
)
def test_bad_parameters_name_the_fix(params, match):
    with pytest.raises(PassParameterError, match=match):
        bitfold.passes.create("prune", params)


@pytest.mark.parametrize(
    "params,field",
    [({"pattern": "nm:2:300"}, "pattern 'nm:2:300'"), ({"pattern": "nm:2:4", "overrides": ["*linear*=nm:8:512"]}, "override '[*]linear[*]=nm:8:512'")],
    ids=["pattern", "override"],
)
def test_sparse_format_refuses_groups_wider_than_8_bit_positions(params, field):
    """SparseMatMul stores each kept weight's position in its group as a bit-plane code of at most 8 bits."""
    match = field + r" with format = \"sparse\" needs M <= 256 .*; use M <= 256 or format = \"masked\""
    with pytest.raises(PassParameterError, match=match):
        bitfold.passes.create("prune", {**params, "format": "sparse"})
    bitfold.passes.create("prune", {**params, "format": "masked"})  # the masked format holds any M
    bitfold.passes.create("prune", {"pattern": "nm:2:256", "format": "sparse"})


def test_sparse_format_emits_the_compressed_op_for_nm_layers(lm):
    model, feeds, calibration, _ = lm
    step = {"name": "prune", "method": "wanda", "pattern": "nm:2:4", "overrides": ["*node_linear_3*=unstructured:0.5"]}
    masked, _ = bitfold.optimize(bitfold.clone(model), [step], calibration)
    packed, report = bitfold.optimize(bitfold.clone(model), [{**step, "format": "sparse"}], calibration, verify=True)
    assert report.output["ops"]["bitfold::SparseMatMul"] == 13  # the unstructured override stays masked
    np.testing.assert_allclose(_out(packed, feeds), _out(masked, feeds), rtol=1e-5, atol=1e-5)


def test_refine_and_lowrank_compensation_reduce_the_error(lm):
    model, _, calibration, _ = lm
    feeds = next(iter(calibration))
    ref = _out(model, feeds)

    def err(**params):
        pruned, report = bitfold.optimize(bitfold.clone(model), [{"name": "prune", "method": "wanda", "pattern": "unstructured:0.6", **params}],
                                          calibration, verify=True)  # fmt: skip
        return np.linalg.norm(_out(pruned, feeds) - ref) / np.linalg.norm(ref), report

    base, _ = err()
    refined, report = err(refine_cycles=20)
    assert refined < base and report.passes[0].notes[0].startswith("14 weights, 0.60")
    compensated, report = err(compensate_rank=4)
    assert compensated < base
    assert report.passes[0].ops_added.get("MatMul", 0) == 28  # two branch MatMuls per pruned layer
    with pytest.raises(PassParameterError, match="SparseGPT"):
        bitfold.passes.create("prune", {"method": "sparsegpt", "refine_cycles": 5})


def test_sparse_format_emits_csr_for_unstructured_and_block_csr_for_blocks(lm):
    model, feeds, calibration, _ = lm
    step = {"name": "prune", "method": "magnitude", "pattern": "unstructured:0.7", "overrides": ["*node_linear_3*=block:4x4:0.5"]}
    masked, _ = bitfold.optimize(bitfold.clone(model), [step], calibration)
    packed, report = bitfold.optimize(bitfold.clone(model), [{**step, "format": "sparse"}], calibration, verify=True)
    assert report.output["ops"]["bitfold::CSRMatMul"] == 13 and report.output["ops"]["bitfold::BlockCSRMatMul"] == 1
    np.testing.assert_allclose(_out(packed, feeds), _out(masked, feeds), rtol=1e-5, atol=1e-5)
