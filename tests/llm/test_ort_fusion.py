"""The ORT lowering of KV-cache graphs (GroupQueryAttention, fused residual norms, packed QKV, last-position head)
computes what the standard graph computes, on every family, float and quantized."""

from __future__ import annotations

import numpy as np
import pytest

from tests.llm.families import FAMILIES, make

pytest.importorskip("transformers")


def _steps(model, fuse: bool, prompt, tokens, max_length: int = 48):
    from bitfold.llm.generate import Decoder

    decoder = Decoder(model, max_length=max_length, fuse=fuse)
    return decoder, [decoder(prompt)] + [decoder(np.asarray([t])) for t in tokens]


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lowered_decoder_matches_standard_graph(name, tmp_path):
    from bitfold.llm import export_llm

    make(name, tmp_path)
    model, _, _ = export_llm(tmp_path)
    nodes = len(list(model.graph))
    rng = np.random.default_rng(1)
    prompt, tokens = rng.integers(3, 256, 14), rng.integers(3, 256, 20)  # past the sliding windows (8)
    fused, got = _steps(model, True, prompt, tokens)
    _, want = _steps(model, False, prompt, tokens)
    assert len(list(model.graph)) == nodes, "the lowering must not touch its input"
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert _rel(g, w) < 1e-5, f"{name}: step {step} differs by {_rel(g, w):.2e}"
    lowered = fused.fusion
    assert lowered.last_logits and lowered.skip_norms >= 2 * 2
    if name == "phi3-fused-partial":  # 8 rotary dims: ORT's kernel rotates multiples of 16
        assert not lowered.attention and "rotates" in lowered.reason
    else:
        ops = [n.op_type for n in lowered.model.graph]
        assert lowered.attention, lowered.reason
        assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops and "Concat" not in ops


@pytest.mark.parametrize("name", ["qwen2-bias", "llama-tied-llama3rope"])
def test_packed_qkv_of_quantized_linears(name, tmp_path):
    """q, k, v MatMulNBits (and q/k/v biases) become one MatMulNBits feeding GroupQueryAttention's packed input."""
    import bitfold
    from bitfold.llm import export_llm

    make(name, tmp_path)
    model, _, _ = export_llm(tmp_path)
    step = {"name": "quantize-weights", "bits": 4, "group_size": 32, "format": "matmulnbits", "accuracy_level": 0}
    model, _ = bitfold.optimize(model, [step])
    rng = np.random.default_rng(2)
    prompt, tokens = rng.integers(3, 256, 10), rng.integers(3, 256, 6)
    fused, got = _steps(model, True, prompt, tokens)
    _, want = _steps(model, False, prompt, tokens)
    for step_index, (g, w) in enumerate(zip(got, want, strict=True)):
        assert _rel(g, w) < 1e-4, f"step {step_index} differs by {_rel(g, w):.2e}"
    graph = fused.fusion.model.graph
    gqa = [n for n in graph if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2
    for node in gqa:
        assert node.inputs[1] is None and node.inputs[2] is None  # packed QKV
        producer = node.inputs[0].producer()
        if producer.op_type == "Add":  # the packed bias
            producer = producer.inputs[0].producer()
        assert producer.op_type == "MatMulNBits" and producer.attributes["N"].as_int() == 64 + 2 * 2 * 16


def test_last_position_head(tmp_path):
    from bitfold.backends.ort_llm import lower_decoder
    from bitfold.llm import export_llm
    from bitfold.backends.ort import OrtRunnable
    from bitfold.llm.feeds import prefill

    make("llama-tied-llama3rope", tmp_path)
    model, _, _ = export_llm(tmp_path)
    lowered = lower_decoder(model, max_length=32, last_logits=True)
    ids = np.random.default_rng(3).integers(3, 256, (1, 9))
    feeds = prefill(model, ids)  # an empty past: GroupQueryAttention then returns a fresh present
    full = OrtRunnable(model, device="cpu").run(feeds)["logits"]
    last = OrtRunnable(lowered.model, device="cpu").run(feeds)["logits"]
    assert last.shape == (1, 1, 256)
    assert _rel(last[0, 0], full[0, -1]) < 1e-5
