"""HAWQ-V2 sensitivities for SmolLM2-135M bit allocation, against the measured sensitivities of allocate_smollm2.py.

Ω(l, f) = Tr(H_l)/n · ‖Q_f(W_l) - W_l‖² (``bitfold.tools.allocate.hawq``): traces (8 output-space Rademacher probes
per batch) of the Hessian of the logits' squared distance to the unquantized logits, 2 JᵀJ, on the same four
128-token calibration windows (464-467) whose logits allocate_smollm2.py measures noise on; ‖ΔW‖² of each format's
RTN rounding. Formats int8 / int4 / int3 / int2 (g128), lm_head fp32. Points are quantized and scored exactly as in
allocate_smollm2.py (GPTQ act-order, sink 64, output clip, damp 0.003, calibration windows 139-146, perplexity on
windows 0-15). Writes benchmarks/results/hawq_smollm2.json.

    python benchmarks/hawq_smollm2.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import bitfold
from bitfold.eval.models import CausalLMLogits, export_smollm2, smollm2
from bitfold.eval.tasks import lee_windows, lm_feeds, smollm2_ppl
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.tools import allocate
from bitfold.tools.bench import provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"
KEEP_HEAD = ["*lm_head*"]
GPTQ = {"method": "gptq", "act_order": True, "sink_weight": 64.0, "clip": "output", "damp": 0.003}
FORMATS = ["int8", "int4", "int3", "int2"]
BUDGETS = [3.25, 4.25]  # the bits of uniform int3 and int4 g128
WINDOWS = range(464, 468)


def main() -> None:
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    lm, tokenizer = smollm2()
    module = CausalLMLogits(lm).eval()
    fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    batches = [torch.tensor(w[None]) for w in lee_windows(tokenizer, WINDOWS, 128)]
    def logits(m, ids):
        return m(ids, torch.ones_like(ids))

    start = time.perf_counter()
    scored = allocate.hawq(fp32, module, logits, batches, FORMATS, exclude=KEEP_HEAD, probes=8)
    seconds = time.perf_counter() - start
    print(f"HAWQ-V2 sensitivities: {seconds:.0f} s", flush=True)
    calibration = CalibrationData(list(lm_feeds(lee_windows(tokenizer, range(139, 147)))))
    rows = []
    for budget in BUDGETS:
        solved = allocate.solve(scored, budget)
        model, _ = bitfold.optimize(bitfold.clone(fp32), solved.recipe(format="fake", exclude=KEEP_HEAD, **GPTQ).to_list(), calibration)
        counts = {f: int((solved.choice == i).sum()) for i, f in enumerate(FORMATS)}
        rows.append({"variant": f"allocate-bits {budget:g}, HAWQ-V2 sensitivities", "bits": solved.bits_per_weight,
                     "ppl": smollm2_ppl(model).value, "layers_per_format": counts})  # fmt: skip
        print(rows[-1], flush=True)
    result = {**stamp, "model": "SmolLM2-135M-Instruct", "gptq": GPTQ, "sensitivity_seconds": round(seconds, 1), "rows": rows,
              "sensitivity": {"layers": scored.layers, "formats": FORMATS, "values": scored.sensitivity.tolist()}}  # fmt: skip
    write_atomic(RESULTS / "hawq_smollm2.json", json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
