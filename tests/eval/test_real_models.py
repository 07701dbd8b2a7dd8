"""Canonical passes on a real ImageNet CNN: every BatchNorm folds, outputs stay equal to 1e-5 relative."""

from __future__ import annotations

import numpy as np
import pytest

import bitfold
from bitfold.passes.canonical import CANONICAL

pytest.importorskip("efficientnet_lite_pytorch", reason="real models are installed by `make test`")
pytestmark = pytest.mark.realmodel


def test_efficientnet_lite0_folds_every_batchnorm():
    import torch

    from bitfold.eval.models import efficientnet_lite0

    module, (x,) = efficientnet_lite0()
    model = bitfold.from_torch(module, (x,))
    ops = [n.op_type for n in model.graph]
    assert ops.count("BatchNormalization") == 49
    feeds = {model.graph.inputs[0].name: x.numpy()}
    model, report = bitfold.optimize(model, list(CANONICAL), verify=True, feeds=feeds)
    assert "BatchNormalization" not in report.output["ops"]
    assert report.output["ops"]["Conv"] == 49
    assert all(r.max_rel <= 1e-5 for r in report.passes), [(r.name, r.max_rel) for r in report.passes]
    with torch.no_grad():
        reference = module(x).numpy()
    out = next(iter(bitfold.compile(model, "ort", "cpu").run(feeds).values()))
    assert np.abs(out - reference).max() / np.abs(reference).max() <= 1e-5
    assert out.argmax() == reference.argmax()
