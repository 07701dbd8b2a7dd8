"""Quantization of all-MiniLM-L6-v2: embedding cosine to fp32 over the Lee test sentences, bytes, against ORT's tools.

Evaluation: 151 sentences of gensim's lee.cor (bitfold.eval.tasks.minilm_cos); calibration: 128 sentences of
lee_background.cor (``lee-sentences``). Writes benchmarks/results/quant_minilm.json.

    python benchmarks/quant_minilm.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx_ir as ir
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

import bitfold
from bitfold.eval.models import export_minilm
from bitfold.eval.tasks import minilm_cos
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.bench import provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"
ROWS = [
    ("RTN W8 per-channel", [{"name": "quantize-weights", "method": "rtn", "bits": 8, "group_size": -1, "symmetric": False}]),
    ("RTN W4 g128", [{"name": "quantize-weights", "method": "rtn", "bits": 4, "group_size": 128}]),
    ("RTN W4 g128, output clip", [{"name": "quantize-weights", "method": "rtn", "bits": 4, "group_size": 128, "clip": "output"}]),
    ("GPTQ W4 g128", [{"name": "quantize-weights", "method": "gptq", "bits": 4, "group_size": 128, "act_order": True, "clip": "output", "damp": 0.003}]),
    ("AWQ W4 g128", [{"name": "quantize-weights", "method": "awq", "bits": 4, "group_size": 128, "symmetric": False, "clip": "output"}]),
    ("RTN W3 g128", [{"name": "quantize-weights", "method": "rtn", "bits": 3, "group_size": 128}]),
    ("GPTQ W3 g128", [{"name": "quantize-weights", "method": "gptq", "bits": 3, "group_size": 128, "act_order": True, "clip": "output", "damp": 0.003}]),
    ("W8A8 minmax", [{"name": "quantize-activations", "observer": "minmax"}]),
    ("W8A8 minmax, inputs only", [{"name": "quantize-activations", "observer": "minmax", "outputs": False}]),
    ("W8A8 fp8-e4m3 minmax", [{"name": "quantize-activations", "observer": "minmax", "activation_dtype": "fp8-e4m3"}]),
    ("fp16 with fp32 islands", [{"name": "cast-precision"}]),
]


def main() -> None:
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / ".tmp"
    tmp.mkdir(exist_ok=True)
    reference = export_minilm()
    fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
    calibration = CalibrationData.from_source("lee-sentences", fp32)
    rows = []

    def record(label: str, tool: str, model: ir.Model) -> None:
        task = minilm_cos(model, reference)
        rows.append({"variant": label, "tool": tool, "cosine": task.value, "min_cosine": task.detail["min_cosine"],
                     "bytes": bitfold.frontend.parameter_bytes(model)})  # fmt: skip
        print(rows[-1], flush=True)

    record("FP32", "-", fp32)
    for label, steps in ROWS:
        record(label, "bitfold", bitfold.optimize(bitfold.clone(fp32), steps, calibration)[0])
    quantizer = MatMulNBitsQuantizer(ir.to_proto(fp32), bits=4, block_size=128, is_symmetric=True)
    quantizer.process()
    record("MatMulNBitsQuantizer RTN W4 g128 sym", "onnxruntime", ir.from_proto(quantizer.model.model))
    src, dst = tmp / "fp32.onnx", tmp / "dynamic.onnx"
    bitfold.save(fp32, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    record("quantize_dynamic int8", "onnxruntime", bitfold.load(dst))
    result = {**stamp, "model": "all-MiniLM-L6-v2, seq 128", "rows": rows}
    write_atomic(RESULTS / "quant_minilm.json", json.dumps(result, indent=2).encode())
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
