"""Every canonical pass, alone and as the canonical recipe, preserves every zoo model's outputs (ORT, rel 1e-5),
tells the truth about ``modified`` (the pipeline checks it in verify mode), and is a no-op on its own output."""

from __future__ import annotations

import pytest
from conftest import fresh

import bitfold
from bitfold.passes.canonical import CANONICAL

ZOO = ["mlp", "cnn-bn", "shared-bn-input", "encoder-layernorm", "decoder-rmsnorm-swiglu-rope", "dynamic-batch-cnn"]


@pytest.mark.parametrize("model_name", ZOO)
@pytest.mark.parametrize("pass_name", CANONICAL)
def test_pass_preserves_outputs_and_is_idempotent(zoo_protos, model_name, pass_name):
    model = fresh(zoo_protos, model_name)
    model, report = bitfold.optimize(model, [pass_name], verify=True)
    assert report.passes[0].max_rel <= 1e-5
    model, again = bitfold.optimize(model, [pass_name], verify=True)
    assert not again.passes[0].modified, f"{pass_name} changed its own output on {model_name}"


@pytest.mark.parametrize("model_name", ZOO)
def test_canonical_recipe_preserves_outputs(zoo_protos, model_name):
    model, report = bitfold.optimize(fresh(zoo_protos, model_name), list(CANONICAL), verify=True)
    assert all(r.max_rel <= 1e-5 for r in report.passes)
    assert report.output["nodes"] <= report.input["nodes"]


def test_dynamic_batch_survives_and_runs_at_other_batch_sizes(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "dynamic-batch-cnn"), list(CANONICAL))
    batch_dim = model.graph.inputs[0].shape[0]
    assert not isinstance(batch_dim, int)
    runnable = bitfold.compile(model, "ort", "cpu")
    for batch in (1, 5):
        feeds = bitfold.sample_feeds(model, {"x": (batch, 3, 16, 16)})
        assert next(iter(runnable.run(feeds).values())).shape == (batch, 12)
