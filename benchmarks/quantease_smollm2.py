"""QuantEase against GPTQ on SmolLM2-135M at W4, W3 and W2 (g128), on the calibration corpus and a held-out one.

Both methods run with the quantization table's GPTQ settings (act-order, sink weight 64, output clip, damp 0.003;
the strongest GPTQ there), on the same grid: QuantEase starts from GPTQ's solution and keeps its scales, so any
difference is the coordinate descent's. Calibration: the built-in ``lee-text`` source (Lee background windows
115-146). Scored: Lee windows 0-15 (8,176 tokens) and the held-out Lee test corpus (9 windows of 512, never used
for calibration or for choosing a default). lm_head stays fp32. Weights are emitted as ``fake`` (the dequantized
values in float): the rows measure the weights alone.
Writes benchmarks/results/quantease_smollm2.json.

    python benchmarks/quantease_smollm2.py [--bits 4 3 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bitfold
from bitfold.eval.models import export_smollm2, smollm2
from bitfold.eval.tasks import CALIB_WINDOWS, heldout_windows, perplexity, smollm2_ppl
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.bench import merge_rows, provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"
GPTQ = {"act_order": True, "sink_weight": 64.0, "clip": "output", "damp": 0.003}
ORDER = ["FP32"] + [f"{name} W{bits} g128" for bits in (4, 3, 2) for name in ("GPTQ", "QuantEase")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    args = parser.parse_args()
    stamp = provenance()
    _, tokenizer = smollm2()
    heldout = heldout_windows(tokenizer)
    fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    calibration = CalibrationData.from_source("lee-text", fp32)  # statistics collected once, reused by every row
    rows = [{"model": "SmolLM2", "variant": "FP32", "method": "-", "bits": 32, "ppl": smollm2_ppl(fp32).value, "ppl_heldout": perplexity(fp32, heldout)[0]}]
    print(rows[-1], flush=True)
    _write(rows, stamp)
    for bits in args.bits:
        for method in ("gptq", "quantease"):
            step = {"name": "quantize-weights", "method": method, "bits": bits, "group_size": 128, "format": "fake",
                    "exclude": ["*lm_head*"], **GPTQ}  # fmt: skip
            start = time.perf_counter()
            model, _ = bitfold.optimize(bitfold.clone(fp32), [step], calibration)
            seconds = time.perf_counter() - start
            rows.append({"model": "SmolLM2", "variant": f"{'GPTQ' if method == 'gptq' else 'QuantEase'} W{bits} g128", "method": method, "bits": bits,
                         "ppl": smollm2_ppl(model).value, "ppl_heldout": perplexity(model, heldout)[0],
                         "optimize_s": round(seconds, 1)})  # fmt: skip
            print(rows[-1], flush=True)
            del model
            _write(rows, stamp)  # after every row: a long run that stops keeps what it measured


def _write(rows: list[dict], stamp: dict) -> None:
    """The rows merged into the JSON (a rerun replaces its own rows, the others stay), stamped with this run."""
    path = RESULTS / "quantease_smollm2.json"
    if path.exists():
        rows = merge_rows(json.loads(path.read_text())["rows"], rows, order=ORDER)
    result = {
        **stamp,
        "model": "SmolLM2-135M-Instruct (weights from a Q4_1 GGUF: 32-element blocks with offset)",
        "protocol": f"calibration: Lee windows {CALIB_WINDOWS.start}-{CALIB_WINDOWS.stop - 1}; scored: Lee windows 0-15 of 512 tokens "
        "(8,176 tokens) and the held-out Lee test corpus (9 windows of 512); lm_head fp32; GPTQ settings as the quantization table's",
        "rows": rows,
    }
    write_atomic(path, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
