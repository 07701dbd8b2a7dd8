"""Bit allocation over integer, ShiftAddLLM (BCQ) and binary formats on all-MiniLM-L6-v2: embedding cosine vs bits.

Sensitivities (bitfold.tools.allocate.measure): every (linear layer, format) pair rounded alone with GPTQ
(act-order, damp 0.003; integer formats with output clip) on the Gram matrices of the 128 ``lee-sentences``
calibration sentences, noise on the embeddings of the first 4. Points: uniform formats, and the integer program
at the bits of uniform int3, bcq3 and bcq2 twice — with every format, and with the integer formats only. Every
point is quantized with the same settings and scored by ``minilm-cos`` (151 Lee test sentences); a budget below
a format set's cheapest allocation (integer formats at bcq2's 2.25 bits: int2 costs 2.27) is skipped. Bits per weight
as each format stores it (codes, scales, α), averaged over the 36 linear layers.
Writes benchmarks/results/allocate_formats_minilm.{json,png}.

    python benchmarks/allocate_formats_minilm.py
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import export_minilm  # noqa: E402
from bitfold.eval.tasks import minilm_cos  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools import allocate  # noqa: E402
from bitfold.tools.bench import provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
GPTQ = {"method": "gptq", "act_order": True, "damp": 0.003, "clip": "output"}
FORMATS = ["int8", "int4", "int3", "int2", "bcq3", "bcq2", "binary"]
INTEGER = ["int8", "int4", "int3", "int2"]
UNIFORM = ["int4", "int3", "bcq3", "int2", "bcq2", "binary"]
BUDGET_AT = ["int3", "bcq3", "bcq2"]


def main() -> None:
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    reference = export_minilm()
    fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
    calibration = CalibrationData.from_source("lee-sentences", fp32)
    measured = allocate.measure(fp32, calibration, FORMATS, samples=4, params=GPTQ)
    bits = dict(zip(FORMATS, measured.cost.sum(axis=0) / measured.weights.sum(), strict=True))
    print({f: round(float(b), 3) for f, b in bits.items()}, flush=True)

    def score(steps: list[dict]) -> float:
        model, _ = bitfold.optimize(bitfold.clone(fp32), steps, calibration)
        return minilm_cos(model, reference).value

    rows = [{"variant": "FP32", "bits": 32.0, "cosine": 1.0}]
    for name in UNIFORM:
        step = allocate.step_for(allocate.FORMATS[name], {"format": "fake", **GPTQ})
        rows.append({"variant": f"uniform {name}", "bits": float(bits[name]), "cosine": score([step])})
        print(rows[-1], flush=True)
    integer = [FORMATS.index(f) for f in INTEGER]
    only_integer = dataclasses.replace(measured, formats=INTEGER, sensitivity=measured.sensitivity[:, integer], cost=measured.cost[:, integer])
    for at in BUDGET_AT:
        for label, allocation in (("all formats", measured), ("integer formats", only_integer)):
            cheapest = allocation.cost.min(axis=1).sum() / allocation.weights.sum()
            if bits[at] < cheapest:
                print(f"{label}: {at}'s {bits[at]:.3f} bits are below the cheapest allocation ({cheapest:.3f})", flush=True)
                continue
            solved = allocate.solve(allocation, float(bits[at]))
            counts = {f: int((solved.choice == i).sum()) for i, f in enumerate(solved.formats) if (solved.choice == i).any()}
            rows.append({"variant": f"allocate-bits at {at}'s bits, {label}", "bits": solved.bits_per_weight,
                         "cosine": score(solved.recipe(format="fake", **GPTQ).to_list()), "layers_per_format": counts})  # fmt: skip
            print(rows[-1], flush=True)
    result = {
        **stamp,
        "model": "all-MiniLM-L6-v2 (seq 128)",
        "protocol": "cosine to fp32 over 151 Lee test sentences; GPTQ and sensitivities on 128 lee-sentences calibration sentences",
        "gptq": GPTQ, "bits_per_weight": {f: float(b) for f, b in bits.items()}, "rows": rows,
        "sensitivity": {"layers": measured.layers, "formats": FORMATS, "values": measured.sensitivity.tolist()},
    }  # fmt: skip
    write_atomic(RESULTS / "allocate_formats_minilm.json", json.dumps(result, indent=2).encode())

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for prefix, style, label in (("uniform", "o", "uniform"), ("allocate-bits at", "s", None)):
        for row in (r for r in rows if r["variant"].startswith(prefix)):
            kind = "all formats" in row["variant"]
            marker = style if prefix == "uniform" else ("s" if kind else "^")
            ax.plot(row["bits"], 1 - row["cosine"], marker, color="#36a" if prefix == "uniform" else "#c63" if kind else "#393")
            if prefix == "uniform":
                ax.annotate(row["variant"].split()[-1], (row["bits"], 1 - row["cosine"]), fontsize=8)
    ax.plot([], [], "s", color="#c63", label="allocate-bits, int + bcq + binary")
    ax.plot([], [], "^", color="#393", label="allocate-bits, int only")
    ax.plot([], [], "o", color="#36a", label="uniform")
    ax.set_xlabel("average bits per weight (as stored)")
    ax.set_ylabel("1 - cosine to fp32")
    ax.set_yscale("log")
    ax.set_title("all-MiniLM-L6-v2: mixed formats")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, RESULTS / "allocate_formats_minilm.png")


if __name__ == "__main__":
    main()
