"""The pass-level debugger names a deliberately wrong pass and the first node it broke."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from conftest import fresh

import bitfold
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.registry import BitfoldPass
from bitfold.tools.debug import debug


class DoubleScale(BitfoldPass):
    """A buggy pass: folds a scale of 2 into one MatMul weight twice (the layer now computes 2·x·W)."""

    name = "double-scale"
    family = "test"

    def __init__(self, target: str) -> None:
        super().__init__(DoubleScaleConfig())
        self.target = target

    def rewrite(self, model: ir.Model) -> int:
        node = next(n for n in model.graph if n.name == self.target)
        weight = node.inputs[1]
        weight.const_value = ir.tensor(weight.const_value.numpy() * 2.0, name=weight.name)
        return 1


@dataclasses.dataclass(frozen=True)
class DoubleScaleConfig:
    pass


def test_debugger_names_the_wrong_pass_and_its_first_node(zoo_protos):
    model = fresh(zoo_protos, "tiny-lm")
    folded, _ = bitfold.optimize(bitfold.clone(model), ["fold-constants"])
    target = [n.name for n in folded.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None][5]
    feeds = bitfold.sample_feeds(model)
    steps = ["fold-constants", "remove-identity", DoubleScale(target), "remove-dead"]
    report = debug(model, steps, feeds, tolerance=1e-4)
    assert [p.name for p in report.passes] == ["fold-constants", "remove-identity", "double-scale", "remove-dead"]
    assert report.culprit == 2 and report.first_node == target
    assert report.passes[0].own_rel < 1e-5 and report.passes[2].own_rel > 1e-2
    assert report.first_tensor.rel > 0.5  # the layer output doubled: relative error 1
    assert report.passes[3].cumulative[0].rel == report.passes[2].cumulative[0].rel
    assert '"culprit": 2' in report.to_json()


def test_no_culprit_for_an_exact_recipe(zoo_protos):
    model = fresh(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    report = debug(model, list(CANONICAL), bitfold.sample_feeds(model), tolerance=1e-4)
    assert report.culprit is None and all(p.own_rel < 1e-4 for p in report.passes)
    assert np.isfinite([e.sqnr_db for p in report.passes for e in p.own if e.rel > 0]).all()


def test_cli_writes_json_and_a_self_contained_html(zoo_protos, tmp_path, capsys):
    import json

    from bitfold.tools.cli import main

    path = bitfold.save(fresh(zoo_protos, "tiny-lm"), tmp_path / "lm.onnx")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-constants"\n[[pass]]\nname = "quantize-weights"\nbits = 2\nformat = "fake"\ngroup_size = -1\n')
    out = tmp_path / "dbg"
    assert main(["debug", str(path), "-r", str(recipe), "-o", str(out)]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["culprit"] == 1 and data["first_node"]
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "quantize-weights" in page and "http" not in page.replace("charset", "")
    assert "first pass over 0.001: quantize-weights" in " ".join(capsys.readouterr().err.split())
