"""Residual streams and norms on small hand-written graphs: values that are also graph outputs, unannotated ranks."""

from __future__ import annotations

import numpy as np
import onnx.parser
import onnx_ir as ir

from bitfold.passes.transforms.structure import find_norms, rank_of, residual_stream

_BLOCK = """
    <ir_version: 10, opset_import: ["" : 18]>
    block (int64[1,3] ids) => ({outputs}) <float[8,4] emb = {emb}, int64[1] axes = {{-1}}, float eps = {{1e-6}}, float[4,4] wd = {wd}> {{
        [embed] x = Gather (emb, ids)
        [square] x2 = Mul (x, x)
        [mean] ms = ReduceMean (x2, axes)
        [addeps] mse = Add (ms, eps)
        [root] rms = Sqrt (mse)
        [norm] n = Div (x, rms)
        [down] d = MatMul (n, wd)
        [residual] y = Add (d, x)
        [square2] y2 = Mul (y, y)
        [mean2] ms2 = ReduceMean (y2, axes)
        [addeps2] mse2 = Add (ms2, eps)
        [root2] rms2 = Sqrt (mse2)
        [norm2] n2 = Div (y, rms2)
        [head] logits = MatMul (n2, wd)
    }}"""


def _floats(shape: tuple[int, ...], seed: int) -> str:
    return "{" + ",".join(repr(float(v)) for v in np.random.default_rng(seed).standard_normal(shape).astype(np.float32).ravel()) + "}"


def _block(outputs: str) -> ir.Graph:
    text = _BLOCK.format(outputs=outputs, emb=_floats((8, 4), 0), wd=_floats((4, 4), 1))
    return ir.from_proto(onnx.parser.parse_model(text)).graph


def test_a_plain_stream_is_found() -> None:
    stream = residual_stream(_block("float[1,3,4] logits"))
    assert not isinstance(stream, str)
    assert len(stream.writers) == 1 and len(stream.norms) == 2


def test_a_writer_output_that_is_a_graph_output_is_refused() -> None:
    reason = residual_stream(_block("float[1,3,4] logits, float[1,3,4] d"))
    assert isinstance(reason, str) and "'d'" in reason and "graph output" in reason


def test_a_norm_square_that_is_a_graph_output_is_refused() -> None:
    reason = residual_stream(_block("float[1,3,4] logits, float[1,3,4] x2"))
    assert isinstance(reason, str) and "'x2'" in reason and "outside its norm" in reason


_UNANNOTATED = """
    <ir_version: 10, opset_import: ["" : 17]>
    norm (float[2,4] x, float[4,4] w) => (float[2,4] n) <float two = {2}, float eps = {1e-6}> {
        [pre] r = %s
        [square] r2 = Pow (r, two)
        [mean] ms = ReduceMean <axes = [1]> (r2)
        [addeps] mse = Add (ms, eps)
        [root] rms = Sqrt (mse)
        [divide] n = Div (r, rms)
    }"""


def test_a_positive_axis_norm_is_found_through_elementwise_producers() -> None:
    graph = ir.from_proto(onnx.parser.parse_model(_UNANNOTATED % "Relu (x)")).graph
    assert rank_of(graph.node("pre").outputs[0]) == 2
    assert [n.kind for n in find_norms(graph)] == ["rms"]


def test_a_positive_axis_norm_of_unknown_rank_is_not_a_norm() -> None:
    graph = ir.from_proto(onnx.parser.parse_model(_UNANNOTATED % "MatMul (x, w)")).graph
    assert rank_of(graph.node("pre").outputs[0]) is None
    assert find_norms(graph) == []
