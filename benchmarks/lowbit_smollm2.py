"""Low-bit weight solvers on SmolLM2-135M at W4, W3 and W2 (g128), on the calibration corpus and a held-out one:
GPTQ, QuantEase and learned block reconstruction (the ``reconstruct`` pass), all on the same symmetric grid.

GPTQ and QuantEase run with the quantization table's GPTQ settings (act-order, sink weight 64, output clip, damp
0.003; the strongest GPTQ there): QuantEase starts from GPTQ's solution and keeps its scales, so any difference is
the coordinate descent's. ``reconstruct`` runs with its defaults (learned clipping, then learned rounding, per
decoder layer). Sign-plane rows: the binarize pass with GPTQ rounding against reconstruct's binary grid (bits in
the JSON: the number of planes). Calibration: the built-in ``lee-text`` source (Lee background windows
115-146). Scored: Lee windows 0-15 (8,176 tokens) and the held-out Lee test corpus (9 windows of 512, never used
for calibration or for choosing a default). lm_head stays fp32. Weights are emitted as ``fake`` (the dequantized
values in float): the rows measure the weights alone.
Writes benchmarks/results/lowbit_smollm2.json, one row at a time (a rerun replaces its own rows).

    python benchmarks/lowbit_smollm2.py [--bits 4 3 2] [--methods gptq quantease reconstruct] [--binary 1 2]
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
NAMES = {"gptq": "GPTQ", "quantease": "QuantEase", "reconstruct": "reconstruct"}
#: Sign planes (1 bit per weight per plane, α per output): the binarize pass with GPTQ rounding (its strongest
#: solver here) against reconstruct's learned α and signs.
BINARY = {
    "binarize (GPTQ), 1 plane": {"name": "binarize", "keep_ends": False, "gptq": True, "act_order": True, "sink_weight": 64.0, "damp": 0.003},
    "reconstruct binary, 1 plane": {"name": "reconstruct", "grid": "binary"},
    "binarize (GPTQ), 2 planes": {"name": "binarize", "planes": 2, "keep_ends": False, "gptq": True, "act_order": True, "sink_weight": 64.0, "damp": 0.003},
    "reconstruct binary, 2 planes": {"name": "reconstruct", "grid": "binary", "planes": 2},
}
ORDER = ["FP32"] + [f"{name} W{bits} g128" for bits in (4, 3, 2) for name in NAMES.values()] + list(BINARY)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--methods", nargs="+", choices=list(NAMES), default=list(NAMES))
    parser.add_argument("--binary", nargs="*", choices=[1, 2], type=int, default=[1, 2], help="sign-plane rows to run (none: --binary)")
    args = parser.parse_args()
    stamp = provenance()
    _, tokenizer = smollm2()
    heldout = heldout_windows(tokenizer)
    fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    calibration = CalibrationData.from_source("lee-text", fp32)  # statistics collected once, reused by every row
    rows = [{"model": "SmolLM2", "variant": "FP32", "method": "-", "bits": 32, "ppl": smollm2_ppl(fp32).value, "ppl_heldout": perplexity(fp32, heldout)[0]}]
    print(rows[-1], flush=True)
    _write(rows, stamp)
    runs = []
    for bits in args.bits:
        for method in args.methods:
            step = {"name": "quantize-weights", "method": method, **GPTQ} if method != "reconstruct" else {"name": "reconstruct"}
            runs.append((f"{NAMES[method]} W{bits} g128", method, bits, {**step, "bits": bits, "group_size": 128}))
    for variant, step in BINARY.items():
        planes = step.get("planes", 1)
        if planes in args.binary:
            runs.append((variant, step["name"], planes, step))
    for variant, method, bits, step in runs:
        step = {**step, "format": "fake", "exclude": ["*lm_head*"]}
        start = time.perf_counter()
        model, _ = bitfold.optimize(bitfold.clone(fp32), [step], calibration)
        seconds = time.perf_counter() - start
        rows.append({"model": "SmolLM2", "variant": variant, "method": method, "bits": bits,
                     "ppl": smollm2_ppl(model).value, "ppl_heldout": perplexity(model, heldout)[0],
                     "optimize_s": round(seconds, 1)})  # fmt: skip
        print(rows[-1], flush=True)
        del model
        _write(rows, stamp)  # after every row: a long run that stops keeps what it measured


def _write(rows: list[dict], stamp: dict) -> None:
    """The rows merged into the JSON (a rerun replaces its own rows, the others stay), stamped with this run."""
    path = RESULTS / "lowbit_smollm2.json"
    if path.exists():
        rows = merge_rows(json.loads(path.read_text())["rows"], rows, order=ORDER)
    result = {
        **stamp,
        "model": "SmolLM2-135M-Instruct (weights from a Q4_1 GGUF: 32-element blocks with offset)",
        "protocol": f"calibration: Lee windows {CALIB_WINDOWS.start}-{CALIB_WINDOWS.stop - 1}; scored: Lee windows 0-15 of 512 tokens "
        "(8,176 tokens) and the held-out Lee test corpus (9 windows of 512); lm_head fp32; GPTQ settings as the quantization table's; "
        "reconstruct with its defaults",
        "rows": rows,
    }
    write_atomic(path, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
