"""Mixed-precision bit allocation on SmolLM2-135M: perplexity against average bits per weight, scales included.

Sensitivities (bitfold.tools.allocate.measure): every (layer, format) pair quantized alone with the same GPTQ
settings as the points (on Gram matrices of 16 × 128 calibration tokens), the squared relative error of the logits
on the first 4 of those samples (a 128-token export of the same graph; calibration region of the Lee corpus). The integer program then picks one format per layer at each budget, and every point —
the allocations and the uniform GPTQ W4 g128 / W3 g128 / W2 g128 rows — is quantized with the same GPTQ settings
as benchmarks/quant_table.py, calibrated on windows 139-146, and scored on windows 0-15 (bitfold.eval.tasks).
lm_head stays fp32 everywhere and is not counted in the bits. Writes benchmarks/results/allocate_smollm2.{json,png}.

    python benchmarks/allocate_smollm2.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import export_smollm2, smollm2  # noqa: E402
from bitfold.eval.tasks import lee_windows, lm_feeds, smollm2_ppl  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools import allocate  # noqa: E402
from bitfold.tools.bench import provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KEEP_HEAD = ["*lm_head*"]
GPTQ = {"method": "gptq", "act_order": True, "sink_weight": 64.0, "clip": "output", "damp": 0.003}
FORMATS = ["int8", "int4", "int3", "int2"]
BUDGETS = [3.0, 3.25, 3.5, 4.0, 4.25]
UNIFORM = {"int4": 4.25, "int3": 3.25, "int2": 2 + 34 / 128}
SENSITIVITY_WINDOWS = range(464, 480)  # 128-token windows 464-479 = tokens 59,392-61,439, inside 512-windows 115-146
OUTPUT_SAMPLES = 4


def main() -> None:
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    _, tokenizer = smollm2()
    fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    short, _ = bitfold.optimize(export_smollm2(128), list(CANONICAL))
    sensitivity_data = CalibrationData(list(lm_feeds(lee_windows(tokenizer, SENSITIVITY_WINDOWS, 128))))
    measured = allocate.measure(short, sensitivity_data, FORMATS, samples=OUTPUT_SAMPLES, exclude=KEEP_HEAD, params=GPTQ)
    names = {n.name for n in fp32.graph}
    missing = [layer for layer in measured.layers if layer not in names]
    if missing:
        raise SystemExit(f"the 128-token export names layer {missing[0]} differently from the 512-token one")
    calibration = CalibrationData(list(lm_feeds(lee_windows(tokenizer, range(139, 147)))))

    def score(steps: list[dict]) -> float:
        model, _ = bitfold.optimize(bitfold.clone(fp32), steps, calibration)
        return smollm2_ppl(model).value

    rows = [{"variant": "FP32", "bits": 32.0, "ppl": smollm2_ppl(fp32).value}]
    print(rows[-1], flush=True)
    for name, bits in UNIFORM.items():
        step = {"name": "quantize-weights", "format": "fake", **GPTQ, **allocate.FORMATS[name].step, "exclude": KEEP_HEAD}
        rows.append({"variant": f"uniform GPTQ {name} g128", "bits": bits, "ppl": score([step])})
        print(rows[-1], flush=True)
    for budget in BUDGETS:
        solved = allocate.solve(measured, budget)
        counts = {f: int((solved.choice == i).sum()) for i, f in enumerate(FORMATS)}
        steps = solved.recipe(format="fake", exclude=KEEP_HEAD, **GPTQ).to_list()
        rows.append({"variant": f"allocate-bits {budget:g}", "budget": budget, "bits": solved.bits_per_weight,
                     "ppl": score(steps), "layers_per_format": counts,
                     "predicted_noise": float(solved.sensitivity[np.arange(len(solved.layers)), solved.choice].sum())})  # fmt: skip
        print(rows[-1], flush=True)
    result = {
        **stamp,
        "model": "SmolLM2-135M-Instruct",
        "protocol": "ppl on Lee windows 0-15 of 512 tokens; GPTQ calibration windows 139-146; sensitivities: GPTQ on 16 x 128 tokens (128-token windows 464-479), logits of the first 4",
        "formats": {f: {**allocate.FORMATS[f].step, "bits_per_weight_k576": allocate.FORMATS[f].bits(576)} for f in FORMATS},
        "gptq": GPTQ,
        "rows": rows,
        "sensitivity": {"layers": measured.layers, "formats": FORMATS, "values": measured.sensitivity.tolist()},
    }
    write_atomic(RESULTS / "allocate_smollm2.json", json.dumps(result, indent=2).encode())
    _plot(rows, RESULTS / "allocate_smollm2.png")


def _plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    uniform = [r for r in rows if r["variant"].startswith("uniform")]
    mixed = [r for r in rows if r["variant"].startswith("allocate")]
    ax.plot([r["bits"] for r in uniform], [r["ppl"] for r in uniform], "o--", label="uniform GPTQ g128")
    ax.plot([r["bits"] for r in mixed], [r["ppl"] for r in mixed], "s-", label="allocate-bits (int8/4/3/2, GPTQ sensitivities)")
    ax.axhline(rows[0]["ppl"], color="k", lw=0.8, label="FP32")
    ax.set_xlabel("average bits per weight (scales included)")
    ax.set_ylabel("perplexity (Lee, 8,176 tokens)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity vs bits")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
