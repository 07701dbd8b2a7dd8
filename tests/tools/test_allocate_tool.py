"""Mixed-precision allocation on the zoo: sensitivities, the budget holds, the recipe round-trips and beats
uniform low-bit quantization at a higher-bit cost; the CLI verb end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError
from bitfold.passes.canonical import CANONICAL
from bitfold.pipeline import Recipe
from bitfold.quant.calibration import CalibrationData
from bitfold.tools import allocate
from bitfold.tools.cli import main


@pytest.fixture(scope="module")
def measured(zoo_protos):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    rng = np.random.default_rng(0)
    calibration = CalibrationData([{"input_ids": rng.integers(0, 96, (1, 8)).astype(np.int64)} for _ in range(4)])
    return model, calibration, allocate.measure(model, calibration, ["int8", "int2"])


def test_sensitivities_rank_formats_and_the_budget_holds(measured):
    model, calibration, allocation = measured
    assert allocation.sensitivity.shape == (15, 2)
    assert (allocation.sensitivity[:, 0] < allocation.sensitivity[:, 1]).all()  # int8 hurts less than int2 everywhere
    high, low = allocation.cost.sum(axis=0) / allocation.weights.sum()  # int8, int2
    solved = allocate.solve(allocation, (low + high) / 2)
    assert low < solved.bits_per_weight <= (low + high) / 2 + 1e-9
    assert 0 < (solved.choice == 0).sum() < 15
    recipe = solved.recipe()
    assert Recipe.from_toml(recipe.to_toml()).to_list() == recipe.to_list()
    mixed, _ = bitfold.optimize(bitfold.clone(model), recipe.to_list())
    uniform, _ = bitfold.optimize(bitfold.clone(model), [{"name": "quantize-weights", "format": "fake", **allocate.FORMATS["int2"][0]}])
    err = [allocate._error(m, list(calibration), [np.concatenate([v.ravel() for v in bitfold.compile(model, "ort", "cpu").run(f).values()])
                                                  for f in calibration]) for m in (mixed, uniform)]  # fmt: skip
    assert err[0] < err[1]
    with pytest.raises(BitfoldError, match="below the cheapest"):
        allocate.solve(allocation, low * 0.9)


def test_cli_writes_an_editable_recipe(zoo_protos, tmp_path, capsys):
    model, _ = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), list(CANONICAL))
    path = bitfold.save(model, tmp_path / "lm.onnx")
    calibration = tmp_path / "calib.npz"
    np.savez(calibration, input_ids=np.random.default_rng(0).integers(0, 96, (4, 1, 8)))
    recipe, report = tmp_path / "mixed.toml", tmp_path / "alloc.json"
    assert main(["allocate", str(path), "--bits", "5", "--formats", "int8,int4", "--calibration", str(calibration),
                 "-o", str(recipe), "--report", str(report)]) == 0  # fmt: skip
    data = json.loads(report.read_text())
    assert data["bits_per_weight"] <= 5 and set(data["choice"]) <= {"int8", "int4"}
    assert main(["optimize", str(path), "-r", str(recipe), "-o", str(tmp_path / "mixed.onnx")]) == 0
    assert main(["allocate", str(path), "--bits", "5", "--formats", "int9", "--calibration", str(calibration), "-o", str(recipe)]) == 2
    assert "unknown format 'int9'" in capsys.readouterr().err
