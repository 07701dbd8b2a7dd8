from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fresh

import bitfold
from bitfold.errors import ExportError, InputSpecError
from bitfold.frontend.inputs import check_feeds, input_specs, parse_shape


def test_from_torch_keeps_batchnorm_for_the_pipeline_and_matches_torch():
    from models import CNNWithBN, _randomize_bn

    torch.manual_seed(0)
    module = _randomize_bn(CNNWithBN())
    x = torch.randn(2, 3, 16, 16)
    model = bitfold.from_torch(module, (x,))
    assert [n.op_type for n in model.graph].count("BatchNormalization") == 4
    out = bitfold.compile(model, "ort", "cpu").run({"x": x.numpy()})
    np.testing.assert_allclose(next(iter(out.values())), module(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_from_torch_rejects_non_modules():
    with pytest.raises(ExportError, match="expects a torch.nn.Module"):
        bitfold.from_torch(lambda x: x, (torch.zeros(1),))


def test_dynamic_dimension_is_symbolic(zoo_protos):
    spec = input_specs(fresh(zoo_protos, "dynamic-batch-cnn"))[0]
    assert isinstance(spec.shape[0], str) and spec.shape[1:] == (3, 16, 16)


def test_parse_shape():
    assert parse_shape("x=1x3x224x224") == ("x", (1, 3, 224, 224))
    for bad in ("x", "x=1xa", "=3", "x=0x3"):
        with pytest.raises(InputSpecError):
            parse_shape(bad)


def test_sample_feeds_are_seeded_and_valid(zoo_protos):
    model = fresh(zoo_protos, "encoder-layernorm")
    a, b = bitfold.sample_feeds(model), bitfold.sample_feeds(model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["mask"].dtype == np.int64 and set(np.unique(a["mask"])) <= {0, 1}


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({}, "input 'x' is missing"),
        ({"x": np.zeros((4, 32), np.float64)}, "has dtype float64 but the model expects float32"),
        ({"x": np.zeros((4, 31), np.float32)}, "has shape 4x31 but the model expects x: float32\\[4x32\\]"),
        ({"x": np.zeros((4, 32), np.float32), "z": np.zeros(1)}, "'z' is not an input"),
    ],
)
def test_check_feeds_names_the_problem(zoo_protos, feeds, message):
    with pytest.raises(InputSpecError, match=message):
        check_feeds(fresh(zoo_protos, "mlp"), feeds)
