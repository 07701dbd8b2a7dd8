"""The exclusion loop meets an error budget on a zoo model by keeping the most harmful layers float."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.passes.canonical import CANONICAL
from bitfold.tools.exclude import keep_within

STEP = {"name": "quantize-weights", "bits": 2, "group_size": -1, "symmetric": False, "format": "fake"}


@pytest.fixture(scope="module")
def lm(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    rng = np.random.default_rng(0)
    return model, [{"input_ids": rng.integers(0, 96, (1, 8)).astype(np.int64)} for _ in range(3)]


def test_meets_the_budget_with_the_fewest_layers_float(lm):
    model, feeds = lm
    everything = keep_within(model, STEP, 10.0, feeds)
    assert everything.kept == [] and everything.error > 0.2
    budget = everything.error / 2
    kept = keep_within(model, STEP, budget, feeds)
    assert kept.error <= budget and 0 < len(kept.kept) < 14
    assert kept.kept[0] == max(kept.contributions, key=kept.contributions.get)
    fewer = keep_within(model, {**STEP, "exclude": kept.kept[:-1]}, budget, feeds)
    assert fewer.error <= budget and len(fewer.kept) >= 1  # one layer fewer float does not meet it by itself
    looser = keep_within(model, STEP, budget * 1.5, feeds, contributions=kept.contributions)  # another budget, not re-measured
    assert looser.contributions is kept.contributions and looser.error <= budget * 1.5 and len(looser.kept) <= len(kept.kept)
    assert looser.kept == keep_within(model, STEP, budget * 1.5, feeds).kept


def test_refuses_passes_without_exclude(lm):
    model, feeds = lm
    with pytest.raises(BitfoldError, match="no exclude"):
        keep_within(model, {"name": "remove-dead"}, 0.1, feeds)


def test_cli_max_error(zoo_protos, tmp_path, capsys):
    from bitfold.tools.cli import main

    path = bitfold.save(fresh(zoo_protos, "tiny-lm"), tmp_path / "lm.onnx")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-constants"\n[[pass]]\nname = "quantize-weights"\nbits = 2\ngroup_size = -1\nsymmetric = false\nformat = "fake"\n')
    out = tmp_path / "q.onnx"
    assert main(["optimize", str(path), "-r", str(recipe), "-o", str(out), "--max-error", "0.1"]) == 0
    stderr = " ".join(capsys.readouterr().err.split())
    assert "quantize-weights: exclusion loop: output error" in stderr and "<= 0.1 with" in stderr and "kept float: node_" in stderr


def test_recipe_key_runs_the_loop_inside_the_pipeline(lm):
    """max_error in a recipe step: the pipeline's result equals keep_within's, the report names the kept layers,
    and the key round-trips through TOML."""
    model, feeds = lm
    everything = keep_within(model, STEP, 10.0, feeds)
    budget = everything.error / 2
    recipe = bitfold.Recipe.from_list(["remove-dead", {**STEP, "max_error": budget}])
    assert bitfold.Recipe.from_toml(recipe.to_toml()).steps[1].max_error == budget
    out, report = bitfold.optimize(bitfold.clone(model), recipe, feeds=feeds[0])
    direct = keep_within(model, STEP, budget, [feeds[0]])
    assert report.passes[1].params["max_error"] == budget and direct.kept
    assert report.passes[1].notes[0].endswith(", ".join(direct.kept))
    ref = bitfold.compile(model, "ort", "cpu").run(feeds[0])
    got = bitfold.compile(out, "ort", "cpu").run(feeds[0])
    err = np.linalg.norm(np.concatenate([(got[k] - ref[k]).ravel() for k in ref])) / np.linalg.norm(np.concatenate([r.ravel() for r in ref.values()]))
    assert err == pytest.approx(direct.error, rel=1e-5) and err <= budget


@pytest.mark.parametrize("bad, message", [(0, "positive finite number"), ("x", "positive finite number"), (float("inf"), "positive finite number")])
def test_recipe_key_is_validated(bad, message):
    with pytest.raises(bitfold.errors.RecipeError, match=message):
        bitfold.Recipe.from_list([{**STEP, "max_error": bad}])
    with pytest.raises(bitfold.errors.RecipeError, match="no exclude"):
        bitfold.Recipe.from_list([{"name": "remove-dead", "max_error": 0.1}])


def test_w8a8_on_a_cnn_leaves_whole_layers_float(zoo_protos):
    """On quantize-activations the loop meets the budget, and a kept layer reads a float input with a float weight."""
    from bitfold.quant.calibration import CalibrationData

    model, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), list(CANONICAL))
    rng = np.random.default_rng(0)
    calibration = CalibrationData([{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(8)])
    step = {"name": "quantize-activations", "activation_dtype": "int8"}
    everything = keep_within(model, step, 10.0, list(calibration)[:2], calibration)
    budget = everything.error / 2
    kept = keep_within(model, step, budget, list(calibration)[:2], calibration)
    assert 0 < kept.error <= budget < everything.error and kept.kept
    nodes = {node.name: node for node in kept.model.graph}
    for name in kept.kept:
        x, w = nodes[name].inputs[:2]
        assert x.producer() is None or x.producer().op_type != "DequantizeLinear"
        assert w.const_value is not None and w.const_value.dtype == ir.DataType.FLOAT
