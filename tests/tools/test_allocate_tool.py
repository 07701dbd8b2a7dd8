"""Mixed-precision allocation on the zoo: sensitivities, the budget holds, the recipe round-trips and beats
uniform low-bit quantization at a higher-bit cost; the CLI verb end to end."""

from __future__ import annotations

import glob
import json

import numpy as np
import onnx_ir as ir
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
    uniform, _ = bitfold.optimize(bitfold.clone(model), [{"name": "quantize-weights", "format": "fake", **allocate.FORMATS["int2"].step}])
    def outputs(m):
        runner = bitfold.compile(m, "ort", "cpu")
        return [np.concatenate([v.ravel() for v in runner.run(f).values()]).astype(np.float64) for f in calibration]

    err = [allocate._power(outputs(m), outputs(model)) for m in (mixed, uniform)]
    assert err[0] < err[1]
    gptq = solved.recipe(method="gptq", exclude=["never*"]).to_list()
    assert all(s["method"] == "gptq" and s["exclude"][0] == "never*" for s in gptq)
    assert [s["bits"] for s in gptq] == [s["bits"] for s in recipe.to_list()]
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


def test_a_matmulnbits_allocation_costs_and_writes_what_that_op_stores(measured, tmp_path):
    model, calibration, per_channel = measured
    allocation = allocate.measure(model, calibration, ["int8", "int2"], params={"format": "matmulnbits"})
    k = np.array([model.graph.node(name).inputs[1].shape[0] for name in allocation.layers], np.float64)
    np.testing.assert_allclose(per_channel.cost[:, 0] / per_channel.weights, 8 + 32 / k)
    blocks = np.ceil(k / 128)  # the op stores whole blocks of 128 along K, and int2's zero points packed 4 per byte
    np.testing.assert_allclose(allocation.cost[:, 0] / allocation.weights, blocks * (128 * 8 + 32) / k)
    np.testing.assert_allclose(allocation.cost[:, 1] / allocation.weights, (blocks * (128 * 2 + 32) + np.ceil(blocks * 2 / 8) * 8) / k)
    high, low = allocation.cost.sum(axis=0) / allocation.weights.sum()
    solved = allocate.solve(allocation, (low + high) / 2)
    steps = solved.recipe(method="gptq").to_list()
    assert {(s["bits"], s["group_size"], s["format"]) for s in steps} == {(8, 128, "matmulnbits"), (2, 128, "matmulnbits")}
    mixed, _ = bitfold.optimize(bitfold.clone(model), steps, calibration)
    nbits = [n for n in mixed.graph if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(allocation.layers) and {n.attributes["bits"].value for n in nbits} == {8, 2}
    assert sum(n.attributes["bits"].value == 8 for n in nbits) == (solved.choice == 0).sum()
    stored = sum(8 * v.const_value.nbytes for n in nbits for v in n.inputs[1:] if v is not None)
    assert stored == pytest.approx(solved.bits_per_weight * solved.weights.sum())  # the cost is what the file holds
    with pytest.raises(BitfoldError, match="measured for format 'matmulnbits'"):
        solved.recipe(format="fake")
    with pytest.raises(BitfoldError, match="format 'int4' is not one"):
        allocate.measure(model, calibration, ["int8"], params={"format": "int4"})


def test_a_sensitivity_is_the_error_of_the_model_quantized_at_that_layer_alone(measured):
    """The shared session's weight override measures the same thing as quantizing one layer through the pass."""
    model, calibration, allocation = measured

    def outputs(m):
        runner = bitfold.compile(m, "ort", "cpu")
        return [np.concatenate([v.ravel() for v in runner.run(f).values()]).astype(np.float64) for f in calibration]

    for i in (0, len(allocation.layers) - 1):
        others = [glob.escape(x) for x in allocation.layers if x != allocation.layers[i]]
        step = {"name": "quantize-weights", "format": "fake", **allocate.FORMATS["int2"].step, "exclude": others}
        alone, report = bitfold.optimize(bitfold.clone(model), [step])
        assert report.passes[0].modified == 1
        assert allocation.sensitivity[i, 1] == pytest.approx(allocate._power(outputs(alone), outputs(model)), rel=1e-4)


def test_gptq_sensitivities_measure_the_quantizer_the_recipe_uses(measured):
    """With GPTQ settings, each layer is rounded by GPTQ on the calibration Gram matrices: less output noise than
    RTN on the samples it was fitted to, in total and for most layers."""
    model, calibration, rtn = measured
    gptq = allocate.measure(model, calibration, ["int8", "int2"], params={"method": "gptq", "damp": 0.01})
    assert gptq.layers == rtn.layers and np.array_equal(gptq.cost, rtn.cost)
    assert gptq.sensitivity[:, 1].sum() < rtn.sensitivity[:, 1].sum()
    assert (gptq.sensitivity[:, 1] < rtn.sensitivity[:, 1]).mean() > 0.5
    with pytest.raises(BitfoldError, match="AWQ rescales shared inputs"):
        allocate.measure(model, calibration, ["int4"], params={"method": "awq"})


def test_multiplication_less_and_sparse_candidates_cost_what_they_store_and_build_their_recipe(measured):
    """Formats of other passes join the program: costs as stored (binary < bcq2 < 2:4-int4 < int4), each
    sensitivity is that pass's rounding of the layer alone, and the recipe runs every layer through the pass chosen."""
    model, calibration, _ = measured
    formats = ["int4", "shift4", "bcq2", "binary", "2:4-int4"]
    allocation = allocate.measure(model, calibration, formats, params={"method": "gptq"})
    per_weight = dict(zip(formats, allocation.cost.sum(axis=0) / allocation.weights.sum(), strict=True))
    assert per_weight["binary"] < per_weight["bcq2"] < per_weight["2:4-int4"] < per_weight["int4"]
    assert (allocation.sensitivity[:, formats.index("int4")] < allocation.sensitivity[:, formats.index("binary")]).all()
    solved = allocate.solve(allocation, (per_weight["binary"] + per_weight["int4"]) / 2)
    recipe = solved.recipe(method="gptq").to_list()
    used = {formats[c] for c in solved.choice}
    assert len(used) >= 2 and [s["name"] for s in recipe] == [allocate.FORMATS[f].step["name"] for f in formats if f in used]
    assert all(s.get("gptq", True) for s in recipe if s["name"] != "quantize-weights")
    mixed, report = bitfold.optimize(bitfold.clone(model), recipe, calibration)
    by_pass = {p.name: 0 for p in report.passes}
    for node in mixed.graph:
        origin = node.metadata_props.get("bitfold.pass")
        if origin in by_pass and node.op_type not in ("DequantizeLinear", "Add"):
            by_pass[origin] += 1
    expected = {}
    for f in (formats[c] for c in solved.choice):
        name = allocate.FORMATS[f].step["name"]
        expected[name] = expected.get(name, 0) + 1
    assert by_pass == expected
    i = formats.index("bcq2")
    layer = next(k for k, c in enumerate(solved.choice) if c == i) if i in solved.choice else 0
    others = [glob.escape(x) for x in allocation.layers if x != allocation.layers[layer]]
    alone, _ = bitfold.optimize(bitfold.clone(model), [{**allocate.FORMATS["bcq2"].step, "keep_ends": False, "exclude": others}], calibration)

    def outputs(m):
        runner = bitfold.compile(m, "ort", "cpu")
        return [np.concatenate([v.ravel() for v in runner.run(f).values()]).astype(np.float64) for f in calibration]

    assert allocation.sensitivity[layer, i] == pytest.approx(allocate._power(outputs(alone), outputs(model)), rel=1e-3)


def test_hawq_sensitivities_from_the_torch_module_the_model_came_from():
    """HAWQ-V2: each MatMul is matched to its torch Linear weight; Ω = Tr(H)/n · ‖Q(W) - W‖² ranks formats
    by bits in every layer; the allocation builds a runnable recipe; a foreign module is refused by name."""
    import torch
    from models import TinyLM

    torch.manual_seed(0)
    lm = TinyLM().eval()
    model, _ = bitfold.optimize(bitfold.from_torch(lm, (torch.randint(0, 96, (1, 8)),)), list(CANONICAL))
    batches = [torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(2)]

    def next_token(module, ids):  # an untrained model is not at a minimum of its task loss
        logits = module(ids)
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    with pytest.raises(BitfoldError, match="curves downward"):
        allocate.hawq(model, lm, next_token, batches, ["int4"], curvature="loss")
    allocation = allocate.hawq(model, lm, lambda module, ids: module(ids), batches, ["int8", "int4", "int2"], probes=4)
    assert len(allocation.layers) == 15 and (allocation.sensitivity > 0).all()
    assert (np.diff(allocation.sensitivity, axis=1) > 0).all()  # int8 < int4 < int2 in every layer
    solved = allocate.solve(allocation, 5.0)
    assert solved.bits_per_weight <= 5.0 and len(set(solved.choice)) >= 2
    bitfold.optimize(bitfold.clone(model), solved.recipe().to_list())
    with pytest.raises(BitfoldError, match="no parameter of the torch module equals the weight of"):
        allocate.hawq(model, TinyLM(), next_token, batches, ["int4"])
    with pytest.raises(BitfoldError, match="leave it out"):
        allocate.hawq(model, lm, lambda module, ids: module(ids), batches, ["2:4-int4"])


def test_reconstructed_candidates_are_the_learned_weights_and_their_recipe_runs(measured):
    """method = "reconstruct": each sensitivity is the model's error with the one layer's weight as reconstruct
    learns it over the whole model on that format (lower than round to nearest's in total at int2); the LM head,
    outside every block, stays out; the recipe's reconstruct steps learn every assigned layer on its grid."""
    model, calibration, rtn = measured
    settings = {"method": "reconstruct", "clip_steps": 10, "round_steps": 20}
    learned = allocate.measure(model, calibration, ["int8", "int2"], params=settings)
    assert len(learned.layers) == 14 and learned.layers == rtn.layers[:14] and len(learned.outside) == len(rtn.outside) + 1
    assert np.array_equal(learned.cost, rtn.cost[:14])
    assert learned.sensitivity[:, 1].sum() < rtn.sensitivity[:14, 1].sum()
    step = allocate.step_for(allocate.FORMATS["int2"], {**settings, "format": "fake"})
    alone, _ = bitfold.optimize(bitfold.clone(model), [step], calibration)
    weight = {n.name: n.inputs[1].const_value.numpy() for n in alone.graph if n.name == learned.layers[3]}
    single = bitfold.clone(model)
    node = next(n for n in single.graph if n.name == learned.layers[3])
    node.inputs[1].const_value = ir.tensor(weight[learned.layers[3]])

    def outputs(m):
        runner = bitfold.compile(m, "ort", "cpu")
        return [np.concatenate([v.ravel() for v in runner.run(f).values()]).astype(np.float64) for f in calibration]

    assert learned.sensitivity[3, 1] == pytest.approx(allocate._power(outputs(single), outputs(model)), rel=1e-3)
    high, low = learned.cost.sum(axis=0) / learned.weights.sum()
    solved = allocate.solve(learned, (low + high) / 2)
    recipe = solved.recipe(**settings).to_list()
    assert [s["name"] for s in recipe] == ["reconstruct", "reconstruct"] and [s["bits"] for s in recipe] == [8, 2]
    mixed, report = bitfold.optimize(bitfold.clone(model), recipe, calibration)
    assert all(p.modified for p in report.passes)
    tags = {n.name: n.metadata_props.get("bitfold.quantized") for n in mixed.graph if n.name in learned.layers}
    assert tags == {layer: ("reconstruct-int8-per-channel" if c == 0 else "reconstruct-int2-asym-g128") for layer, c in zip(learned.layers, solved.choice, strict=True)}
    with pytest.raises(BitfoldError, match="format '2:4-int4' has no reconstruct grid"):
        allocate.measure(model, calibration, ["int4", "2:4-int4"], params=settings)
