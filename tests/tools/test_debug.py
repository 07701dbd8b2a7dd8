"""The pass-level debugger names a deliberately wrong pass and the first node it broke."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

import bitfold
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.registry import FROM_KEY, BitfoldPass
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


class RenamingDoubleScale(DoubleScale):
    """The same bug, but the pass replaces the MatMul by a Mul → MatMul pair with fresh output names, stamped with
    provenance, so the broken tensor exists in the rewritten graph only under a new name."""

    name = "renaming-double-scale"

    def rewrite(self, model: ir.Model) -> int:
        node = next(n for n in model.graph if n.name == self.target)
        two = ir.Value(name="two", const_value=ir.tensor(np.array(2.0, np.float32), name="two"))
        model.graph.register_initializer(two)
        scaled = ir.node("Mul", [node.inputs[0], two], name=f"{self.target}_prescale", metadata_props={FROM_KEY: self.target})
        scaled.outputs[0].name = f"{self.target}_prescaled"
        matmul = ir.node("MatMul", [scaled.outputs[0], node.inputs[1]], name=f"{self.target}_rewritten", metadata_props={FROM_KEY: self.target})
        matmul.outputs[0].name = f"{self.target}_renamed"
        model.graph.insert_before(node, [scaled, matmul])
        ir.convenience.replace_all_uses_with(node.outputs[0], matmul.outputs[0])
        model.graph.remove(node, safe=True)
        return 1


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


def _buggy(zoo_protos, bug):
    model = fresh(zoo_protos, "tiny-lm")
    folded, _ = bitfold.optimize(bitfold.clone(model), ["fold-constants"])
    target = [n.name for n in folded.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None][5]
    return model, target, ["fold-constants", "remove-identity", bug(target), "remove-dead"]


def test_intermediates_map_through_provenance_when_the_pass_renames_them(zoo_protos):
    model, target, steps = _buggy(zoo_protos, RenamingDoubleScale)
    report = debug(model, steps, bitfold.sample_feeds(model), tolerance=1e-4)
    assert report.culprit == 2 and report.first_node == f"{target}_rewritten"
    original = next(v.name for n in bitfold.optimize(bitfold.clone(model), ["fold-constants"])[0].graph if n.name == target for v in n.outputs)
    assert report.first_tensor.name == f"{target}_renamed" and report.first_tensor.reference == original
    assert report.first_tensor.rel > 0.5
    assert f"{target}_prescaled" not in {e.name for e in report.tensors}, "the inner node of the replacement maps to nothing"
    assert report.diff.added == [f"{target}_prescale", f"{target}_rewritten"] and report.diff.removed == [target]
    assert report.passes[2].record.ops_added == {"Mul": 1}


def test_reduce_shrinks_to_the_broken_node_and_the_repro_reruns(zoo_protos, tmp_path):
    model, target, steps = _buggy(zoo_protos, DoubleScale)
    feeds = bitfold.sample_feeds(model)
    report = debug(model, steps, feeds, tolerance=1e-4, reduce_culprit=True)
    repro = report.repro
    assert repro.nodes == 1 and repro.depth == 1 and repro.error > 0.5
    assert [n.name for n in repro.model.graph] == [target]
    assert list(repro.model.graph.initializers) == [repro.model.graph.node(0).inputs[1].name], "only the weight it reads"
    assert report.diff.changed == [target] and not report.diff.added and "<svg" in report.diff_svg
    again = debug(repro.model, [steps[2]], repro.feeds, tolerance=1e-4)  # the repro alone shows the same bug
    assert again.culprit == 0 and again.first_node == target
    assert again.passes[0].own_rel == pytest.approx(repro.error, rel=1e-6)


def test_reduce_keeps_the_producers_a_bug_needs(zoo_protos):
    """A pass that breaks a node only where its input comes from a Softmax cannot be shown without that Softmax."""
    model = fresh(zoo_protos, "tiny-lm")
    folded, _ = bitfold.optimize(bitfold.clone(model), ["fold-constants"])
    after_softmax = next(u for n in folded.graph if n.op_type == "Softmax" for u, _ in n.outputs[0].uses())

    class BreakAfterSoftmax(DoubleScale):
        name = "break-after-softmax"

        def rewrite(self, m: ir.Model) -> int:
            node = next(n for n in m.graph if n.name == self.target)
            producer = node.inputs[0].producer()
            if producer is None or producer.op_type != "Softmax":
                return 0
            return super().rewrite(m) if node.inputs[1].const_value is not None else self._scale_input(m, node)

        def _scale_input(self, m: ir.Model, node: ir.Node) -> int:
            two = ir.Value(name="two", const_value=ir.tensor(np.array(2.0, np.float32), name="two"))
            m.graph.register_initializer(two)
            mul = ir.node("Mul", [node.inputs[0], two], name="scale")
            m.graph.insert_before(node, mul)
            node.replace_input_with(0, mul.outputs[0])
            return 1

    feeds = bitfold.sample_feeds(model)
    report = debug(folded, [BreakAfterSoftmax(after_softmax.name)], feeds, tolerance=1e-4, reduce_culprit=True)
    assert report.culprit == 0 and report.repro is not None
    assert report.repro.depth == 2 and "Softmax" in [n.op_type for n in report.repro.model.graph]


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
    assert "data:image/png;base64," in page and "quantize-weights" in page and "<svg" in page
    assert not re.search(r"""(src|href)=["']?(https?:|//)|<link|<script""", page), "the page loads nothing from outside"
    assert "first pass over 0.001: quantize-weights" in " ".join(capsys.readouterr().err.split())


def test_cli_reduce_writes_a_repro_that_reruns(zoo_protos, tmp_path, capsys):
    import json

    from bitfold.tools.cli import main

    path = bitfold.save(fresh(zoo_protos, "tiny-lm"), tmp_path / "lm.onnx")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[pass]]\nname = "fold-constants"\n[[pass]]\nname = "quantize-weights"\nbits = 2\nformat = "fake"\ngroup_size = -1\n')
    out = tmp_path / "dbg"
    assert main(["debug", str(path), "-r", str(recipe), "-o", str(out), "--reduce"]) == 0
    data = json.loads((out / "report.json").read_text())
    assert data["repro"]["nodes"] == 1 and data["repro"]["error"] > 1e-3
    assert "reduced to 1 nodes" in capsys.readouterr().err
    again = tmp_path / "again"
    assert main(["debug", str(out / "repro.onnx"), "-r", str(out / "repro.toml"), "--inputs", str(out / "repro_inputs.npz"), "-o", str(again)]) == 0
    rerun = json.loads((again / "report.json").read_text())
    assert rerun["culprit"] == 0 and rerun["passes"][0]["own"][0]["rel"] == pytest.approx(data["repro"]["error"], rel=1e-5)


def test_the_report_renders_in_headless_chromium(zoo_protos, tmp_path):
    import matplotlib.image

    from bitfold.tools.debug import screenshot, write_html

    model, _, steps = _buggy(zoo_protos, DoubleScale)
    report = debug(model, steps, bitfold.sample_feeds(model), tolerance=1e-4)
    write_html(report, tmp_path / "report.html")
    if not screenshot(tmp_path / "report.html", tmp_path / "report.png"):
        pytest.skip("no Chromium on this machine (Debian package 'chromium')")
    pixels = matplotlib.image.imread(tmp_path / "report.png")[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    ink = (pixels.min(axis=-1) < 0.9).mean()  # share of pixels that are not (near) white
    assert 0.02 < ink < 0.9, ink
    assert (np.abs(pixels - pixels.mean(axis=(0, 1))).max(axis=-1) > 0.3).any(), "the page shows coloured content"


def test_pattern_pass_says_why_a_candidate_did_not_match(zoo_protos):
    """cnn-bn before fold-constants: one Conv's bias is computed by Expand, so its BatchNormalization stays."""
    model = fresh(zoo_protos, "cnn-bn")
    report = debug(model, ["fold-batchnorm"], bitfold.sample_feeds(model), tolerance=1e-4)
    (left,) = [u for u in report.passes[0].unmatched if u.status == "CONDITION_FAILED"]
    assert "bias" in left.reason and "is not constant" in left.reason
    assert report.passes[0].record.ops_removed["BatchNormalization"] == 3
    folded, _ = bitfold.optimize(fresh(zoo_protos, "cnn-bn"), ["fold-constants"])
    assert not debug(folded, ["fold-batchnorm"], bitfold.sample_feeds(folded)).passes[0].unmatched


def _cancelling_model() -> ir.Model:
    """y = x·W1 − x·W2 with W2 = W1 + δ, δ ~ 1e-6: the output is near zero, while the products are of order 4."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w2 = (w1 + rng.uniform(0.5e-6, 1.5e-6, w1.shape)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
            helper.make_node("MatMul", ["x", "w2"], ["b"], name="mm2"),
            helper.make_node("Sub", ["a", "b"], ["y"], name="sub"),
        ],
        "near_zero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 32])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=9))


class FoldDifference(DoubleScale):
    """An exact rewrite: x·W1 − x·W2 becomes x·(W1 − W2); only the order of the floating-point operations changes."""

    name = "fold-difference"

    def rewrite(self, model: ir.Model) -> int:
        sub = next(n for n in model.graph if n.op_type == "Sub")
        mm1, mm2 = (v.producer() for v in sub.inputs)
        w = mm1.inputs[1].const_value.numpy() - mm2.inputs[1].const_value.numpy()
        value = ir.Value(name="w_diff", const_value=ir.tensor(w, name="w_diff"))
        model.graph.register_initializer(value)
        mm = ir.node("MatMul", [mm1.inputs[0], value], name="mm_diff")
        model.graph.insert_before(sub, mm)
        model.graph.outputs[0] = mm.outputs[0]
        model.graph.remove([sub, mm1, mm2], safe=True)
        mm.outputs[0].name = "y"
        return 1


class RoundWeights(DoubleScale):
    """A lossy rewrite: the target MatMul's weight fake-quantized to symmetric per-tensor int8."""

    name = "round-weights"

    def rewrite(self, model: ir.Model) -> int:
        value = next(n for n in model.graph if n.name == self.target).inputs[1]
        w = value.const_value.numpy()
        step = np.abs(w).max() / 127
        value.const_value = ir.tensor((np.round(w / step) * step).astype(np.float32), name=value.name)
        return 1


@pytest.mark.parametrize("tolerance", [1e-3, 1e-4])
def test_exact_rewrite_of_a_near_zero_output_is_not_the_culprit(tolerance):
    from bitfold.tools.debug import TensorError, run_exposing

    model = _cancelling_model()
    feeds = {"x": np.random.default_rng(1).uniform(0, 1, (4, 64)).astype(np.float32)}
    ref = run_exposing(model, feeds)["y"]
    assert np.abs(ref).max() < 1e-4, "the output is near zero"
    folded = bitfold.clone(model)
    FoldDifference("")(folded)
    got = run_exposing(folded, feeds)["y"]
    raw = TensorError.of("y", got, ref)
    assert raw.max_abs < 1e-5 and raw.rel > 10 * tolerance, "relative to the output alone, rounding reads as a large error"

    report = debug(model, [FoldDifference("")], feeds, tolerance=tolerance)
    assert report.culprit is None and report.passes[0].own_rel < tolerance / 2, report.floor_note()
    report = debug(model, [RoundWeights("mm1"), FoldDifference("")], feeds, tolerance=tolerance)
    assert report.culprit == 0 and report.passes[0].own_rel > 100 * tolerance, "the lossy pass is still named"
    assert report.first_node == "mm1" and report.passes[1].own_rel < tolerance / 2
    assert 1 < report.scale < 10  # the median RMS of x, x·W1, x·W2 and y
    assert report.floor() == pytest.approx(16 * np.finfo(np.float32).eps * report.scale / tolerance)
    assert "ulps of the model's scale" in report.floor_note() and '"floor_note"' in report.to_json()

