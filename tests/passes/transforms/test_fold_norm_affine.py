from __future__ import annotations

import pytest
import torch
from conftest import fresh
from torch import nn

import bitfold
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.transforms.structure import find_norms


@pytest.mark.parametrize("name", ["decoder-rmsnorm-swiglu-rope", "encoder-layernorm", "tiny-lm"])
def test_folds_every_affine_and_keeps_outputs(zoo_protos, name):
    model, report = bitfold.optimize(fresh(zoo_protos, name), [*CANONICAL, "fold-norm-affine"], verify=True)
    record = report.passes[-1]
    assert record.modified and record.max_rel <= 1e-5 and not record.notes
    assert not any(n.has_affine for n in find_norms(model.graph))
    _, again = bitfold.optimize(model, ["fold-norm-affine"])
    assert not again.passes[0].modified


def test_layernorm_beta_becomes_reader_biases(zoo_protos):
    model, report = bitfold.optimize(fresh(zoo_protos, "encoder-layernorm"), [*CANONICAL, "fold-norm-affine"], verify=True)
    ln = [n for n in model.graph if n.op_type == "LayerNormalization"]
    assert all((n.inputs[1].const_value.numpy() == 1).all() and (n.inputs[2].const_value.numpy() == 0).all() for n in ln)
    assert report.passes[-1].ops_removed == {}  # γ/β move, no node goes away


class PostNorm(nn.Module):
    """Post-norm: the LayerNorm output feeds the next residual Add too, so its affine cannot move into the linear."""

    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(16), nn.Linear(16, 16)
        nn.init.normal_(self.ln.weight, 1.0, 0.2)

    def forward(self, x):
        h = self.ln(x)
        return h + self.fc(h)


def test_post_norm_is_left_alone_with_a_reason():
    model = bitfold.from_torch(PostNorm().eval(), (torch.randn(2, 4, 16),))
    before = bitfold.frontend.parameter_bytes(model)
    model, report = bitfold.optimize(model, [*CANONICAL, "fold-norm-affine"])
    record = report.passes[-1]
    assert not record.modified and bitfold.frontend.parameter_bytes(model) == before
    assert len(record.notes) == 1 and "not only by linear layers" in record.notes[0]


def test_centering_turns_a_layernorm_stream_into_a_rotatable_rmsnorm_stream(zoo_protos):
    steps = [*CANONICAL, {"name": "fold-norm-affine", "center": True}, "rotate"]
    model, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm-layernorm"), steps, verify=True)
    fold, rotate = report.passes[-2:]
    assert fold.ops_removed == {"LayerNormalization": 5} and fold.max_rel <= 1e-5
    assert rotate.modified and rotate.max_rel <= 1e-5 and rotate.ops_added == {"bitfold::Hadamard": 4}
    assert [n.kind for n in find_norms(model.graph)] == ["rms"] * 5


def test_without_centering_a_layernorm_stream_is_not_rotated(zoo_protos):
    steps = [*CANONICAL, "fold-norm-affine", "rotate"]
    _, report = bitfold.optimize(fresh(zoo_protos, "tiny-lm-layernorm"), steps)
    assert not report.passes[-1].modified and "mean-centring" in report.passes[-1].notes[0]
    _, rms = bitfold.optimize(fresh(zoo_protos, "tiny-lm"), [*CANONICAL, {"name": "fold-norm-affine", "center": True}], verify=True)
    assert rms.passes[-1].ops_removed == {"Mul": 5}  # an RMSNorm stream needs no centring: γ folds only


def test_centering_an_fp16_layernorm_stream_keeps_every_op_in_fp16():
    """The RMSNorm written for a float16 LayerNorm gets float16 constants: the model passes the checker's full
    check, loads in ONNX Runtime and matches the original within float16 precision."""
    import numpy as np
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort
    from models import TinyLayerNormLM

    torch.manual_seed(0)
    source = bitfold.from_torch(TinyLayerNormLM().eval().half(), (torch.randint(0, 96, (1, 8)),))
    assert source.graph.outputs[0].dtype == ir.DataType.FLOAT16
    model, report = bitfold.optimize(bitfold.clone(source), [*CANONICAL, {"name": "fold-norm-affine", "center": True}])
    assert report.passes[-1].ops_removed == {"LayerNormalization": 5}
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    written = [n for n in model.graph if n.op_type in ("Add", "Pow") and n.metadata_props.get("bitfold.pass") == "fold-norm-affine"]
    assert len(written) == 10  # + ε and x² in each of the 5 norms
    for node in written:
        assert all(v.const_value is None or v.const_value.dtype == ir.DataType.FLOAT16 for v in node.inputs), node.name
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 96, (1, 8)).astype(np.int64)}
    want = ort.InferenceSession(ir.to_proto(source).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=0, atol=1e-2 * np.abs(want).max())
