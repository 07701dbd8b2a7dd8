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
