"""LLM passes on KV-cache graphs of every family: structure found from the graph, exact transforms stay exact at
prefill and decode, lossy passes rewrite every linear but the head, calibration runs as a prefill."""

from __future__ import annotations

import numpy as np
import pytest

from tests.llm.families import FAMILIES, make

pytest.importorskip("transformers")

STREAM_FAMILIES = ["llama-tied-llama3rope", "llama-untied-linearrope-mha", "mistral-sliding", "qwen2-bias", "qwen3-qknorm",
                   "phi3-fused-partial"]  # fmt: skip


def _logits(model, prompt, steps=(5, 9)):
    from bitfold.llm.generate import Decoder

    decoder = Decoder(model, len(prompt) + len(steps))
    return [decoder(prompt)] + [decoder(np.asarray([t])) for t in steps]


def _calibration(model):
    from bitfold.llm.feeds import prefill
    from bitfold.quant.calibration import CalibrationData

    rng = np.random.default_rng(0)
    return CalibrationData([prefill(model, rng.integers(3, 256, (1, 16))) for _ in range(4)])


@pytest.mark.parametrize("name", STREAM_FAMILIES)
def test_rotation_is_exact_on_the_cached_graph(name, tmp_path):
    import bitfold
    from bitfold.llm import export_llm
    from bitfold.passes.transforms.structure import residual_stream

    make(name, tmp_path)
    model, cfg, _ = export_llm(tmp_path)
    stream = residual_stream(model.graph)
    assert not isinstance(stream, str), stream
    assert len(stream.norms) == 2 * cfg.num_layers + 1 and len(stream.writers) == 2 * cfg.num_layers
    prompt = np.random.default_rng(1).integers(3, 256, 10)
    before = _logits(model, prompt)
    rotated, report = bitfold.optimize(bitfold.clone(model), ["fold-norm-affine", "rotate"])
    assert all(p.modified for p in report.passes)
    assert any(n.op_type == "Hadamard" for n in rotated.graph)  # online Hadamard before o_proj / down_proj
    for a, b in zip(before, _logits(rotated, prompt), strict=True):
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-4


@pytest.mark.parametrize("name", ["gemma2-softcap", "gemma3-qknorm"])
def test_sandwich_norm_streams_are_declined_with_a_reason(name, tmp_path):
    import bitfold
    from bitfold.llm import export_llm
    from bitfold.passes.transforms.structure import residual_stream

    make(name, tmp_path)
    model, _, _ = export_llm(tmp_path)
    reason = residual_stream(model.graph)
    assert isinstance(reason, str) and reason
    _, report = bitfold.optimize(bitfold.clone(model), ["rotate"])
    assert not report.passes[0].modified


@pytest.mark.parametrize("step", [
    {"name": "quantize-weights", "method": "gptq", "bits": 4, "group_size": 32, "format": "matmulnbits", "exclude": ["*lm_head*"]},
    {"name": "quantize-weights", "method": "awq", "bits": 4, "group_size": 32, "exclude": ["*lm_head*"]},
    {"name": "shiftadd", "group_size": 32, "keep_ends": False, "exclude": ["*lm_head*"]},
    {"name": "binarize", "keep_ends": False, "exclude": ["*lm_head*"]},
], ids=lambda s: s.get("method", s["name"]))  # fmt: skip
def test_lossy_passes_rewrite_every_linear_of_the_cached_graph(step, tmp_path):
    import bitfold
    from bitfold.llm import export_llm

    make("qwen2-bias", tmp_path)
    model, cfg, _ = export_llm(tmp_path)
    linears = 7 * cfg.num_layers
    quantized, report = bitfold.optimize(bitfold.clone(model), [step], _calibration(model))
    assert report.passes[0].modified
    float_matmuls = [n for n in quantized.graph if n.op_type == "MatMul" and n.inputs[1] is not None and n.inputs[1].const_value is not None]
    assert len(float_matmuls) == 0, [n.name for n in float_matmuls]  # the head reads Transpose(table): not a constant
    assert sum(1 for n in quantized.graph if n.domain in ("bitfold", "com.microsoft") or n.op_type == "DequantizeLinear") >= linears
    prompt = np.random.default_rng(2).integers(3, 256, 10)
    for a, b in zip(_logits(model, prompt), _logits(quantized, prompt), strict=True):
        assert np.isfinite(b).all()
        assert np.corrcoef(a, b)[0, 1] > 0.5  # lossy, but still the same model


def test_cast_precision_calibrates_through_an_empty_past(tmp_path):
    """Every tensor is observed while calibrating, the empty past caches of a prefill included."""
    import bitfold
    from bitfold.llm import export_llm

    make("llama-tied-llama3rope", tmp_path)
    model, _, _ = export_llm(tmp_path)
    cast, report = bitfold.optimize(bitfold.clone(model), ["cast-precision"], _calibration(model))
    assert report.passes[0].modified
    prompt = np.random.default_rng(2).integers(3, 256, 10)
    for a, b in zip(_logits(model, prompt), _logits(cast, prompt), strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * np.abs(a).max())
