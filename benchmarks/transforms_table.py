"""Equivalent transforms before quantization on SmolLM2-135M: perplexity with and without smooth / rotate.

Protocol (bitfold.eval.tasks): Lee corpus, 512-token windows 0-15 scored; calibration from the last 8 calibration
windows (139-146). Weights: RTN or GPTQ per output channel, symmetric (``quantize-weights``, ``format = fake``);
activations: static per-tensor uint8 on every MatMul input (``quantize-activations``, minmax, inputs only); lm_head
stays fp32 in every row. Transforms: ``fold-norm-affine`` + ``rotate`` (seed 0, online Hadamard before every
residual writer), ``smooth`` (α 0.5). Also the activation max/mean-|x| ratio of every linear input, before and after
rotation. Writes benchmarks/results/transforms_smollm2.{json,png}.

    python benchmarks/transforms_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import export_smollm2  # noqa: E402
from bitfold.eval.tasks import smollm2_ppl  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HEAD = ["*lm_head*"]
ROTATE = ["fold-norm-affine", "rotate"]
SMOOTH = [{"name": "smooth", "alpha": 0.5}]
A8 = {"name": "quantize-activations", "weights": False, "outputs": False, "exclude": HEAD}


def _w(bits: int, method: str = "rtn") -> dict:
    extra = {"act_order": True, "sink_weight": 64.0} if method == "gptq" else {}
    return {"name": "quantize-weights", "method": method, "bits": bits, "group_size": -1, "format": "fake", "exclude": HEAD, **extra}


ROWS = [
    ("fold-norm-affine + rotate (fp32)", ROTATE),
    ("W8A8 RTN", [_w(8), A8]),
    ("W8A8 RTN + smooth", [*SMOOTH, _w(8), A8]),
    ("W4A8 RTN", [_w(4), A8]),
    ("W4A8 RTN + smooth", [*SMOOTH, _w(4), A8]),
    ("W4A8 RTN + rotate", [*ROTATE, _w(4), A8]),
    ("W4A8 GPTQ + rotate", [*ROTATE, _w(4, "gptq"), A8]),
]


def _ratios(model, calibration: CalibrationData) -> list[float]:
    """max |x| / mean |x| of every MatMul input with a constant weight (the outlier measure per layer)."""
    names = [n.inputs[0].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    names = list(dict.fromkeys(names))
    stats = calibration.collect(model, names)
    return [float(stats[n].absmax.max() / max(stats[n].mean_abs.mean(), 1e-12)) for n in names]


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    calibration = CalibrationData(list(CalibrationData.from_source("lee-text", fp32))[-8:])
    rows = [{"variant": "FP32", "ppl": smollm2_ppl(fp32).value}]
    print(rows[-1], flush=True)
    rotated = None
    for label, steps in ROWS:
        model, report = bitfold.optimize(bitfold.clone(fp32), steps, calibration)
        if label.startswith("fold-norm-affine"):
            rotated = model
        rows.append({"variant": label, "ppl": smollm2_ppl(model).value,
                     "notes": [f"{r.name}: {n}" for r in report.passes for n in r.notes][:3]})  # fmt: skip
        print(rows[-1], flush=True)
    few = CalibrationData(list(calibration)[-2:])
    before, after = _ratios(fp32, few), _ratios(rotated, few)
    result = {"model": "SmolLM2-135M-Instruct", "rows": rows, "max_over_mean_abs": {"fp32": before, "rotated": after}}
    write_atomic(RESULTS / "transforms_smollm2.json", json.dumps(result, indent=2).encode())
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.semilogy(before, ".", label="fp32 export")
    ax.semilogy(after, ".", label="fold-norm-affine + rotate")
    ax.set_xlabel("linear input (graph order)")
    ax.set_ylabel("max |x| / mean |x|")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, RESULTS / "transforms_smollm2.png")
    print("median max/mean before", np.median(before), "after", np.median(after))


if __name__ == "__main__":
    main()
