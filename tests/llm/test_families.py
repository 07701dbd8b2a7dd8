"""Every family's exported KV-cache graph against transformers: logits of prefill and of each cached decode step
within 1e-4 relative, greedy tokens identical for 64 new tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tests.llm.families import FAMILIES, make

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_transformers(name, tmp_path):
    from bitfold.llm import export_llm
    from bitfold.llm.generate import Decoder, generate_ids

    reference = make(name, tmp_path)
    model, cfg, _ = export_llm(tmp_path)
    prompt = np.random.default_rng(0).integers(3, 256, 12)

    with torch.no_grad():
        out = reference.generate(torch.tensor(prompt)[None], max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)  # fmt: skip
    expected_tokens = out.sequences[0, len(prompt):].tolist()
    expected_logits = [s[0].numpy() for s in out.logits]

    decoder = Decoder(model, max_length=len(prompt) + 64)
    got_logits = []
    logits = decoder(prompt)
    got_logits.append(logits)
    tokens = []
    for step in range(64):
        tokens.append(int(np.argmax(got_logits[-1])))
        if step < 63:
            got_logits.append(decoder(np.asarray([expected_tokens[step]])))  # follow the reference: compare every step
    for step, (got, want) in enumerate(zip(got_logits, expected_logits, strict=True)):
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 1e-4, f"{name}: step {step} logits differ by {err:.2e} relative"
    assert tokens == expected_tokens

    # the same through the generation loop (its own greedy choices)
    result = generate_ids(decoder, list(prompt), 64)
    assert result.tokens == expected_tokens


@pytest.mark.parametrize("name", ["llama-tied-llama3rope", "llama-untied-linearrope-mha", "qwen3-qknorm"])
def test_tvm_decoder_matches_ort(name, tmp_path):
    """TVM's fixed-capacity cache (bucketed, left-padded prefill; decode into free slots, attention reading the cache
    in place) gives ORT's logits."""
    pytest.importorskip("tvm")
    from bitfold.llm import export_llm
    from bitfold.llm.generate import Decoder, TvmDecoder

    make(name, tmp_path)
    model, _, _ = export_llm(tmp_path)
    prompt = np.random.default_rng(3).integers(3, 256, 11)  # bucket 16: five masked slots ahead of the prompt
    ort, tvm = Decoder(model, 48), TvmDecoder(model, 48)
    pairs = [(ort(prompt), tvm(prompt))]
    for token in (7, 19, 200, 3, 64):
        pairs.append((ort(np.array([token])), tvm(np.array([token]))))
    for step, (a, b) in enumerate(pairs):
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-5, f"step {step}"
    assert tvm.length == 16 + 5
    assert tvm.decode_reason == "" and tvm.decode_runnable is not tvm.runnable  # the split-attention decode form ran


def test_tvm_decoder_refuses_sliding_windows(tmp_path):
    pytest.importorskip("tvm")
    from bitfold.errors import BitfoldError
    from bitfold.llm import export_llm
    from bitfold.llm.generate import TvmDecoder

    make("mistral-sliding", tmp_path)
    model, _, _ = export_llm(tmp_path)
    with pytest.raises(BitfoldError, match="sliding-window"):
        TvmDecoder(model, 48)


FORMATS = {
    "shiftadd": {"name": "shiftadd", "group_size": 32},
    "binarize": {"name": "binarize"},
    "ternarize": {"name": "ternarize"},
    "shift": {"name": "shift"},
    "prune-2:4": {"name": "prune", "pattern": "nm:2:4", "format": "sparse"},
    "minmax-int4": {"name": "quantize-weights", "bits": 4, "group_size": 32, "symmetric": False, "zero_point": "float",
                    "format": "matmulnbits", "accuracy_level": 0},
}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tvm_kernels_serve_prefill_and_decode(fmt, tmp_path):
    """Each bitfold op, routed to its TVM kernel, gives ORT's logits at prefill and at every decode step."""
    pytest.importorskip("tvm")
    import bitfold
    from bitfold.llm import export_llm
    from bitfold.llm.feeds import prefill
    from bitfold.llm.generate import Decoder, TvmDecoder
    from bitfold.quant.calibration import CalibrationData

    make("llama-tied-llama3rope", tmp_path)
    model, _, _ = export_llm(tmp_path)
    calibration = CalibrationData([prefill(model, np.random.default_rng(i).integers(3, 256, (1, 16))) for i in range(4)])
    model, _ = bitfold.optimize(model, [FORMATS[fmt]], calibration)
    ort, tvm = Decoder(model, 32, fuse=False), TvmDecoder(model, 32)
    prompt = np.arange(3, 14)
    pairs = [(ort(prompt), tvm(prompt))] + [(ort(np.array([t])), tvm(np.array([t]))) for t in (5, 90, 17)]
    for step, (a, b) in enumerate(pairs):
        assert np.abs(a - b).max() / np.abs(a).max() < 1e-4, f"{fmt}: step {step}"
    assert tvm.runnable.kernel_nodes == 14, "every linear but the head runs a bitfold kernel (decode build)"
