"""Sign-plane weights on all-MiniLM-L6-v2 (a post-norm BERT encoder): the binarize pass against learned block
reconstruction (the ``reconstruct`` pass, ``grid = "binary"``), blocks cut at the LayerNorm after each residual Add.

Rows: the binarize pass with GPTQ rounding (its strongest solver: act-order, damp 0.003), reconstruct with its
defaults, and reconstruct with ``tune_steps`` end-to-end steps on every α (relative squared error of the sentence
embedding, the pass's default learning rate). Every row quantizes all 36 linears of the six layers. Calibration:
128 sentences of ``lee_background.cor`` (``lee-sentences``); scored: mean and minimum cosine between the model's
and the fp32 export's sentence embeddings over the 151 sentences of the Lee test corpus (``minilm_cos``), as the
MiniLM quantization table. Writes benchmarks/results/lowbit_minilm.json.

    python benchmarks/lowbit_minilm.py [--tune STEPS]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bitfold
from bitfold.eval.models import export_minilm
from bitfold.eval.tasks import minilm_cos
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.bench import provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", type=int, default=64, metavar="STEPS", help="end-to-end steps of the last row")
    args = parser.parse_args()
    stamp = provenance()
    reference = export_minilm()
    fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
    calibration = CalibrationData.from_source("lee-sentences", fp32)
    runs = [
        ("binarize (GPTQ), 1 plane", {"name": "binarize", "keep_ends": False, "gptq": True, "act_order": True, "damp": 0.003}),
        ("reconstruct binary, 1 plane", {"name": "reconstruct", "grid": "binary", "format": "fake"}),
        (f"reconstruct binary + end to end ({args.tune} steps), 1 plane",
         {"name": "reconstruct", "grid": "binary", "format": "fake", "tune_steps": args.tune, "tune_loss": "mse"}),
    ]  # fmt: skip
    rows = []
    for variant, step in runs:
        start = time.perf_counter()
        model, report = bitfold.optimize(bitfold.clone(fp32), [step], calibration)
        seconds = time.perf_counter() - start
        task = minilm_cos(model, reference)
        rows.append({"variant": variant, "step": step, "cosine": task.value, "min_cosine": task.detail["min_cosine"],
                     "optimize_s": round(seconds, 1), "notes": [n for n in report.passes[0].notes if "→" in n]})  # fmt: skip
        print({k: v for k, v in rows[-1].items() if k != "notes"}, flush=True)
        result = {**stamp, "model": "all-MiniLM-L6-v2, seq 128",
                  "protocol": "calibration: 128 sentences of lee_background.cor; scored: cosine to the fp32 export's sentence "
                  "embedding over the 151 sentences of lee.cor (mean and minimum); every linear of the six layers on one sign plane, "
                  "α per output", "rows": rows}  # fmt: skip
        write_atomic(RESULTS / "lowbit_minilm.json", json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
