from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.errors import BitfoldError, PassParameterError, RecipeError, UnknownPassError, VerificationError
from bitfold.passes import registry
from bitfold.passes.canonical import CANONICAL
from bitfold.pipeline import PassContractError, Pipeline, Recipe
from bitfold.quant.calibration import CalibrationData


def test_report_records_time_ops_bytes_and_errors(zoo_protos):
    model = fresh(zoo_protos, "cnn-bn")
    _, report = bitfold.optimize(model, list(CANONICAL), verify=True)
    assert [r.name for r in report.passes] == list(CANONICAL)
    bn = report.passes[CANONICAL.index("fold-batchnorm")]
    assert bn.ops_removed == {"BatchNormalization": 4} and bn.nodes_after == bn.nodes_before - 4
    assert bn.param_bytes_after < bn.param_bytes_before, "BN parameters are gone"
    assert all(r.seconds >= 0 and r.errors is not None for r in report.passes)
    assert len(bn.errors) == len(model.graph.outputs)
    data = json.loads(report.to_json())
    assert data["passes"][0]["name"] == CANONICAL[0] and data["verified"] is True
    assert data["input"]["ops"]["BatchNormalization"] == 4 and "BatchNormalization" not in data["output"]["ops"]


def test_without_verify_no_errors_are_measured(zoo_protos):
    _, report = bitfold.optimize(fresh(zoo_protos, "mlp"), ["remove-identity"])
    assert report.passes[0].errors is None and report.passes[0].max_rel is None


def test_hooks_see_every_pass(zoo_protos):
    seen = []
    Pipeline(
        list(CANONICAL),
        on_pass_start=lambda i, n, p: seen.append(("start", i, n, p.name)),
        on_pass_end=lambda r: seen.append(("end", r.name)),
    ).run(fresh(zoo_protos, "mlp"))
    assert seen[0] == ("start", 0, len(CANONICAL), CANONICAL[0]) and seen[-1] == ("end", CANONICAL[-1])


def test_recipe_toml_round_trip_and_validation():
    text = '[[pass]]\nname = "fold-constants"\ninput_size_limit = 4096\n\n[[pass]]\nname = "remove-dead"\n'
    recipe = Recipe.from_toml(text)
    assert recipe.steps[0].params == {"input_size_limit": 4096}
    assert Recipe.from_toml(recipe.to_toml()) == recipe
    assert Recipe.from_list(["fold-constants", "remove-dead"]).steps[1].name == "remove-dead"
    with pytest.raises(RecipeError, match="not valid TOML"):
        Recipe.from_toml("[[pass]\nname=")
    with pytest.raises(UnknownPassError):
        Recipe.from_toml('[[pass]]\nname = "quantize-everything"\n')
    with pytest.raises(PassParameterError, match="takes no parameters; remove 'bits'"):
        Recipe.from_toml('[[pass]]\nname = "remove-dead"\nbits = 4\n')
    with pytest.raises(RecipeError, match="no 'name'"):
        Recipe.from_toml("[[pass]]\nbits = 4\n")
    with pytest.raises(RecipeError, match="unknown top-level key 'passes'"):
        Recipe.from_toml('[[passes]]\nname = "remove-dead"\n')


class _Breaks(registry.BitfoldPass):
    """Test pass: negates the first graph output (numerically wrong, structurally valid)."""

    name = "test-breaks"
    family = "test"

    def rewrite(self, model: ir.Model) -> int:
        out = model.graph.outputs[0]
        neg = ir.node("Neg", [out.producer().outputs[0]])
        model.graph.append(neg)
        neg.outputs[0].dtype, neg.outputs[0].shape = out.dtype, out.shape
        model.graph.outputs[0] = neg.outputs[0]
        neg.outputs[0].name, out.name = out.name, out.name + "_pre"
        return 1


class _Invalid(registry.BitfoldPass):
    """Test pass: adds a node with an unknown standard op."""

    name = "test-invalid"
    family = "test"

    def rewrite(self, model: ir.Model) -> int:
        out = model.graph.outputs[0]
        model.graph.append(ir.node("NoSuchOp", [out]))
        return 1


class _Liar(registry.BitfoldPass):
    """Test pass: changes the model but reports no change."""

    name = "test-liar"
    family = "test"

    def rewrite(self, model: ir.Model) -> int:
        model.graph.node(0).name = "renamed"
        return 0


class _NeedsData(registry.BitfoldPass):
    """Test pass needing calibration."""

    name = "test-needs-data"
    family = "test"
    needs_calibration = True

    def rewrite(self, model: ir.Model) -> int:
        return 0


@pytest.fixture
def test_passes():
    classes = (_Breaks, _Invalid, _Liar, _NeedsData)
    for cls in classes:
        registry.register(cls)
    yield
    for cls in classes:
        registry._REGISTRY.pop(cls.name)


def test_verify_measures_a_numerically_wrong_pass(zoo_protos, test_passes):
    _, report = bitfold.optimize(fresh(zoo_protos, "mlp"), ["remove-dead", "test-breaks"], verify=True)
    assert report.passes[0].max_rel == 0.0
    assert report.passes[1].max_rel > 1.0


def test_verify_names_the_pass_that_broke_validity(zoo_protos, test_passes):
    with pytest.raises(VerificationError, match="pass 'test-invalid'"):
        bitfold.optimize(fresh(zoo_protos, "mlp"), ["remove-dead", "test-invalid"], verify=True)


def test_verify_catches_a_false_modified_claim(zoo_protos, test_passes):
    with pytest.raises(PassContractError, match="test-liar"):
        bitfold.optimize(fresh(zoo_protos, "mlp"), ["test-liar"], verify=True)


def test_calibration_is_required_where_a_pass_needs_it(zoo_protos, test_passes):
    with pytest.raises(BitfoldError, match="needs calibration data"):
        bitfold.optimize(fresh(zoo_protos, "mlp"), ["test-needs-data"])


def test_every_created_node_has_provenance(zoo_protos):
    model = fresh(zoo_protos, "cnn-bn")
    original = set(model.graph)  # holds the nodes, so no identity is reused
    model, _ = bitfold.optimize(model, list(CANONICAL))
    created = [n for n in model.graph if n not in original]
    assert created
    for node in created:
        assert node.metadata_props.get("bitfold.pass") in CANONICAL
        assert "bitfold.from" in node.metadata_props


def test_same_input_and_recipe_give_identical_bytes(zoo_protos, tmp_path):
    paths = []
    for i in range(2):
        model, _ = bitfold.optimize(fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope"), list(CANONICAL))
        paths.append(bitfold.save(model, tmp_path / f"out{i}.onnx"))
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_user_feeds_are_used_for_verification(zoo_protos, test_passes):
    model = fresh(zoo_protos, "dynamic-batch-cnn")
    feeds = {"x": 100 * np.random.default_rng(5).standard_normal((3, 3, 16, 16)).astype(np.float32)}
    (want,) = bitfold.compile(bitfold.clone(model), "ort", "cpu").run(feeds).values()
    _, report = bitfold.optimize(model, [*CANONICAL, "test-breaks"], verify=True, feeds=feeds)
    assert all(r.max_rel <= 1e-5 for r in report.passes[:-1])
    # test-breaks negates the output, so its measured error is 2·max|y| of the output on exactly these feeds
    assert report.passes[-1].errors[0].max_abs == pytest.approx(2 * np.abs(want).max(), rel=1e-6)


class _RecordsData(registry.BitfoldPass):
    """Test pass recording the calibration it was constructed with."""

    name = "test-records-data"
    family = "test"
    needs_calibration = True
    constructed_with: list = []

    def __init__(self, config=None, /, **params) -> None:
        super().__init__(config, **params)
        type(self).constructed_with.append(self.calibration)

    def rewrite(self, model: ir.Model) -> int:
        return 0


class _WeightLiar(registry.BitfoldPass):
    """Test pass: scales one weight in place (through its numpy array) and reports no change."""

    name = "test-weight-liar"
    family = "test"

    def rewrite(self, model: ir.Model) -> int:
        value = model.graph.initializers["net.0.weight"]
        value.const_value = ir.tensor(value.const_value.numpy().copy())
        value.const_value.numpy()[...] *= 2.0
        return 0


def test_the_pipeline_gives_passes_calibration_through_their_constructor(zoo_protos):
    registry.register(_RecordsData)
    try:
        samples = [{"x": np.ones((4, 32), np.float32)}]
        _RecordsData.constructed_with.clear()
        bitfold.optimize(fresh(zoo_protos, "mlp"), ["test-records-data", "test-records-data"], samples)
    finally:
        registry._REGISTRY.pop(_RecordsData.name)
    first, second = _RecordsData.constructed_with[-2:]  # the recipe's validation built each step once before, without it
    assert isinstance(first, CalibrationData) and list(first) == samples
    assert second is first  # wrapped once, so the statistics cache is shared by the passes


def test_verify_catches_an_unreported_weight_change(zoo_protos):
    registry.register(_WeightLiar)
    try:
        with pytest.raises(PassContractError, match="test-weight-liar"):
            bitfold.optimize(fresh(zoo_protos, "mlp"), ["test-weight-liar"], verify=True)
    finally:
        registry._REGISTRY.pop(_WeightLiar.name)
