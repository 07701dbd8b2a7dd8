from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
from conftest import fresh

from bitfold.errors import PassParameterError, UnknownPassError
from bitfold.passes import create, describe, get_pass, registered
from bitfold.passes.canonical import CANONICAL, FoldBatchNorm, FoldConstants, RemoveDead
from bitfold.quant.calibration import CalibrationData


def test_every_pass_is_registered_with_family_doc_and_typed_defaults():
    names = set(registered())
    assert set(CANONICAL) <= names
    for cls in registered().values():
        info = describe(cls)
        assert info["doc"] and info["family"]
        assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen
        cls()  # defaults are valid


def test_unknown_pass_suggests_the_close_name():
    with pytest.raises(UnknownPassError, match="did you mean 'fold-batchnorm'"):
        get_pass("fold-batchnorms")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"bogus": 1}, "has no parameter 'bogus'; its parameters are: input_size_limit, output_size_limit"),
        ({"input_size_limit": "big"}, "must be of type int"),
        ({"input_size_limit": -1}, "size limits must be >= 0"),
    ],
)
def test_bad_parameters_name_the_field(params, message):
    with pytest.raises(PassParameterError, match=message):
        create("fold-constants", params)


def test_passes_run_under_plain_onnx_ir_pass_manager(zoo_protos):
    """Embedding: bitfold passes are ordinary onnx-ir passes."""
    model = fresh(zoo_protos, "cnn-bn")
    manager = ir.passes.PassManager([FoldConstants(), FoldBatchNorm(), RemoveDead()])
    result = manager(model)
    assert result.modified
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph]


def test_create_hands_calibration_to_the_constructor():
    samples = [{"x": np.ones((2, 4), np.float32)}]
    smooth = create("smooth", {"alpha": 0.3}, calibration=samples)
    assert isinstance(smooth.calibration, CalibrationData) and list(smooth.calibration) == samples
    data = CalibrationData(samples)
    assert create("smooth", {}, calibration=data).calibration is data
    assert create("fold-constants").calibration is None
