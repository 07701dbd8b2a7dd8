"""remove-dead and remove-identity: ``modified`` counts every change onnx-ir's helpers make, and every graph output
keeps its name and value."""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx_ir as ir

import bitfold
from bitfold.backends.ort import OrtRunnable


def _parse(text: str) -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(text))


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return OrtRunnable(model, device="cpu").run(feeds)


def test_remove_dead_counts_dead_nodes_inside_a_function() -> None:
    model = _parse("""
        <ir_version: 10, opset_import: ["" : 17, "local" : 1]>
        main (float[4] x) => (float[4] y) {
            [call] y = local.f (x)
        }
        <domain: "local", opset_import: ["" : 17]>
        f (a) => (b) {
            [dead] c = Neg (a)
            [live] b = Relu (a)
        }""")
    model, report = bitfold.optimize(model, ["remove-dead"], verify=True)
    assert report.passes[0].modified
    assert [n.op_type for n in model.functions[("local", "f", "")]] == ["Relu"]
    _, again = bitfold.optimize(model, ["remove-dead"], verify=True)
    assert not again.passes[0].modified


def test_remove_dead_reports_a_model_with_nothing_to_remove_unmodified() -> None:
    model = _parse("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) {
            [act] y = Relu (x)
        }""")
    _, report = bitfold.optimize(model, ["remove-dead"], verify=True)
    assert not report.passes[0].modified


def test_remove_identity_keeps_an_identity_between_two_outputs_and_a_rerun_is_a_no_op() -> None:
    text = """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] r, float[4] y) {
            [act] r = Relu (x)
            [copy] y = Identity (r)
        }"""
    x = np.array([-1, 2, -3, 4], np.float32)
    reference = _run(_parse(text), {"x": x})
    model, report = bitfold.optimize(_parse(text), ["remove-identity"], verify=True)
    assert not report.passes[0].modified
    assert [v.name for v in model.graph.outputs] == ["r", "y"]
    outputs = _run(model, {"x": x})
    assert set(outputs) == {"r", "y"}
    for name in reference:
        np.testing.assert_array_equal(outputs[name], reference[name])


def test_remove_identity_removes_an_identity_that_reads_an_output_into_an_inner_value() -> None:
    text = """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] r, float[4] y) {
            [act] r = Relu (x)
            [copy] c = Identity (r)
            [neg] y = Neg (c)
        }"""
    x = np.array([-1, 2, -3, 4], np.float32)
    reference = _run(_parse(text), {"x": x})
    model, report = bitfold.optimize(_parse(text), ["remove-identity"], verify=True)
    assert report.passes[0].modified
    assert [n.op_type for n in model.graph] == ["Relu", "Neg"]
    assert [v.name for v in model.graph.outputs] == ["r", "y"]
    outputs = _run(model, {"x": x})
    for name in reference:
        np.testing.assert_array_equal(outputs[name], reference[name])


def test_remove_identity_renames_an_inner_value_to_the_output_it_feeds() -> None:
    model, report = bitfold.optimize(_parse("""
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) {
            [act] r = Relu (x)
            [copy] y = Identity (r)
        }"""), ["remove-identity"], verify=True)
    assert report.passes[0].modified
    assert [n.op_type for n in model.graph] == ["Relu"]
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_remove_identity_counts_a_dropout_it_turns_into_a_kept_identity() -> None:
    """A Dropout from a graph input straight to a graph output becomes an Identity that must stay: still a change."""
    text = """
        <ir_version: 10, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) {
            [drop] y = Dropout (x)
        }"""
    model, report = bitfold.optimize(_parse(text), ["remove-identity"], verify=True)
    assert report.passes[0].modified
    assert [n.op_type for n in model.graph] == ["Identity"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    _, again = bitfold.optimize(model, ["remove-identity"], verify=True)
    assert not again.passes[0].modified
