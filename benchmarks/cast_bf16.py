"""float16 vs bfloat16 with fp32 islands (``cast-precision``) on SmolLM2-135M and all-MiniLM-L6-v2.

ONNX Runtime's CPU provider has no bfloat16 arithmetic, so the bfloat16 rows are scored on the pass's emulation
(``emulate = true``: fp32 arithmetic on bfloat16-rounded tensors, the islands the bfloat16 model gets); the float16
rows run the emitted float16 models. Calibration: the last 2 ``lee-text`` windows (SmolLM2), the first 16
``lee-sentences`` (MiniLM), as in quant_table.py / quant_minilm.py. Writes benchmarks/results/cast_bf16.json.

    python benchmarks/cast_bf16.py
"""

from __future__ import annotations

import json
from pathlib import Path

import bitfold
from bitfold.eval.models import export_minilm, export_smollm2
from bitfold.eval.tasks import minilm_cos, smollm2_ppl
from bitfold.passes.canonical import CANONICAL
from bitfold.passes.quant.cast_precision import ISLAND_KEY
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.bench import provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"
STEPS = {
    "float16": {"name": "cast-precision", "dtype": "float16"},
    "bfloat16 (emulated)": {"name": "cast-precision", "dtype": "bfloat16", "emulate": True},
}


def main() -> None:
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    rows = []
    smollm2 = bitfold.optimize(export_smollm2(), list(CANONICAL))[0]
    minilm_reference = export_minilm()
    minilm = bitfold.optimize(bitfold.clone(minilm_reference), list(CANONICAL))[0]
    models = {
        "SmolLM2-135M perplexity": (smollm2, CalibrationData(list(CalibrationData.from_source("lee-text", smollm2))[-2:]),
                                    lambda m: smollm2_ppl(m).value),
        "MiniLM cosine": (minilm, CalibrationData(list(CalibrationData.from_source("lee-sentences", minilm))[:16]),
                          lambda m: minilm_cos(m, minilm_reference).value),
    }  # fmt: skip
    for task, (fp32, calibration, score) in models.items():
        rows.append({"task": task, "variant": "fp32", "value": score(fp32)})
        print(rows[-1], flush=True)
        for label, step in STEPS.items():
            model, report = bitfold.optimize(bitfold.clone(fp32), [step], calibration)
            islands = sum(n.metadata_props.get(ISLAND_KEY) == "float32" for n in model.graph)
            rows.append({"task": task, "variant": label, "value": score(model), "fp32_islands": islands,
                         "seconds": round(report.passes[0].seconds, 1)})  # fmt: skip
            print(rows[-1], flush=True)
    write_atomic(RESULTS / "cast_bf16.json", json.dumps({**stamp, "rows": rows}, indent=2).encode())


if __name__ == "__main__":
    main()
