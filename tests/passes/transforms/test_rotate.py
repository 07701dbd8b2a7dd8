from __future__ import annotations

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.transforms.structure import residual_stream


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


def test_graph_without_a_stream_is_unchanged(zoo_protos):
    _, report = bitfold.optimize(fresh(zoo_protos, "encoder-layernorm"), [*CANONICAL, "fold-norm-affine", "rotate"])
    assert not report.passes[-1].modified and "embedding Gather" in report.passes[-1].notes[0]
