"""Equivalent transforms before quantization: SmolLM2-135M perplexity and MiniLM cosine, with and without them.

Protocol (bitfold.eval.tasks): SmolLM2 on the Lee corpus, 512-token windows 0-15 scored, calibration from windows
139-146 (8 windows; rows that say so: all 32, 115-146); MiniLM cosine to fp32 over the Lee test sentences, calibration from 128 background sentences.
Weights: per output channel, symmetric, RTN or GPTQ (act-order), ``format = fake``; the LM head stays fp32.
Activations: "A8 static" is ``quantize-activations`` (per-tensor uint8, minmax, inputs only); "A8"/"A4" are
``quantize-tokens`` (dynamic per-token symmetric). Transforms: ``smooth`` (α 0.5; OS+ rows add ``shift``), ``fold-norm-affine`` +
``rotate`` (seed 0, online Hadamards), ``affine`` (learned for the row's bits; diagonal, or diagonal then 64×64 blocks), ``smooth`` + ``lowrank-split``
(r = 32, SVDQuant). Also max|x| / mean|x| of every linear input before and after rotation (PNG).
Writes benchmarks/results/transforms.{json,png}.

    python benchmarks/transforms_table.py [--models smollm2 minilm] [--only "MSE clip"]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import export_minilm, export_smollm2  # noqa: E402
from bitfold.eval.tasks import minilm_cos, smollm2_ppl  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools.bench import merge_rows, provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HEAD = ["*lm_head*"]
ROTATE = ["fold-norm-affine", "rotate"]
LEARNED = ["fold-norm-affine", {"name": "rotate", "learn_steps": 200, "online_block": 32}]  # learned for asymmetric per-token A4
SMOOTH = {"name": "smooth", "alpha": 0.5}
A8_STATIC = {"name": "quantize-activations", "weights": False, "outputs": False, "exclude": HEAD}


def _w(bits: int, method: str = "rtn") -> dict:
    extra = {"act_order": True, "sink_weight": 64.0} if method == "gptq" else {}
    return {"name": "quantize-weights", "method": method, "bits": bits, "group_size": -1, "format": "fake", "exclude": HEAD, **extra}


def _a(bits: int) -> dict:
    return {"name": "quantize-tokens", "bits": bits, "exclude": HEAD}


def _rows() -> list[tuple[str, list]]:
    rows = [
        ("fold-norm-affine + rotate (fp32)", ROTATE),
        ("W8A8 static", [_w(8), A8_STATIC]),
        ("W8A8 static + smooth", [SMOOTH, _w(8), A8_STATIC]),
        ("W8A8 static + smooth (explicit Muls)", [{**SMOOTH, "explicit": True}, _w(8), A8_STATIC]),
        ("W8A8 static + smooth, α searched per layer", [{"name": "smooth", "search": True}, _w(8), A8_STATIC]),
        ("W8A8 static + smooth + OS+ shift", [{**SMOOTH, "shift": True}, _w(8), A8_STATIC]),
        ("W8A8 static + smooth + OS+ shift, α searched per layer", [{"name": "smooth", "search": True, "shift": True}, _w(8), A8_STATIC]),
    ]
    for a in (8, 4):
        affine = {"name": "affine", "weight_bits": 4, "activation_bits": a, "exclude": HEAD}
        rows += [
            (f"W4A{a}", [_w(4), _a(a)]),
            (f"W4A{a} + smooth", [SMOOTH, _w(4), _a(a)]),
            (f"W4A{a} + rotate", [*ROTATE, _w(4), _a(a)]),
            (f"W4A{a} + rotate + GPTQ", [*ROTATE, _w(4, "gptq"), _a(a)]),
            (f"W4A{a} + rotate + GPTQ, MSE clip{', A4 clip 0.9' if a == 4 else ''}, 32 calibration windows",
             [*ROTATE, {**_w(4, "gptq"), "clip": "weight"}, {**_a(a), "clip_ratio": 0.9 if a == 4 else 1.0}]),
            (f"W4A{a} + affine", [affine, _w(4), _a(a)]),
            *([(f"W4A{a} + rotate, A4 clip 0.9, then GPTQ (H of the quantized activations), MSE clip, 32 calibration windows",
                [*ROTATE, {**_a(a), "clip_ratio": 0.9}, {**_w(4, "gptq"), "clip": "weight"}]),
               (f"W4A{a} + rotate + affine + GPTQ, MSE clip, A4 clip 0.9, 32 calibration windows",
                [*ROTATE, affine, {**_w(4, "gptq"), "clip": "weight"}, {**_a(a), "clip_ratio": 0.9}]),
               (f"W4A{a} + affine, 64×64 blocks", [{**affine, "block": 64}, _w(4), _a(a)]),
               *_asymmetric_a4_rows(),
               (f"W4A{a} + rotate + affine, 64×64 blocks + GPTQ, MSE clip, A4 clip 0.9, 32 calibration windows",
                [*ROTATE, {**affine, "block": 64}, {**_w(4, "gptq"), "clip": "weight"}, {**_a(a), "clip_ratio": 0.9}])] if a == 4 else []),
            (f"W4A{a} + smooth + lowrank-split r32", [SMOOTH, {"name": "lowrank-split", "rank": 32, "exclude": HEAD}, _w(4), _a(a)]),
        ]
    return rows


def _asymmetric_a4_rows() -> list[tuple[str, list]]:
    """A4 alone (fp32 weights) and W4A4 with per-token zero points, clip ratios searched per input, and the
    down projection's input smoothed before its online Hadamard (``smooth`` ahead of ``rotate``)."""
    a4 = {**_a(4), "symmetric": False, "search_clip": True}
    gptq = {**_w(4, "gptq"), "clip": "weight"}
    return [
        ("A4 only (fp32 weights) + rotate, A4 clip 0.9", [*ROTATE, {**_a(4), "clip_ratio": 0.9}]),
        ("A4 only (fp32 weights) + rotate, asymmetric A4, clip searched per input, 32 calibration windows", [*ROTATE, a4]),
        ("A4 only (fp32 weights) + smooth + rotate, asymmetric A4, clip searched per input, 32 calibration windows",
         [SMOOTH, *ROTATE, a4]),
        ("W4A4 + rotate + GPTQ, MSE clip, asymmetric A4, clip searched per input, 32 calibration windows", [*ROTATE, gptq, a4]),
        ("W4A4 + rotate, asymmetric A4, clip searched per input, then GPTQ (H of the quantized activations), MSE clip, "
         "32 calibration windows", [*ROTATE, a4, gptq]),
        ("W4A4 + smooth + rotate, asymmetric A4, clip searched per input, then GPTQ (H of the quantized activations), "
         "MSE clip, 32 calibration windows", [SMOOTH, *ROTATE, a4, gptq]),
        ("A4 only (fp32 weights) + rotate learned (200 steps, online blocks 32+), asymmetric A4, clip searched per input, 32 calibration windows",
         [*LEARNED, a4]),
        ("W4A4 + smooth + rotate learned (200 steps, online blocks 32+), asymmetric A4, clip searched per input, then GPTQ (H of the quantized "
         "activations), MSE clip, 32 calibration windows", [SMOOTH, *LEARNED, a4, gptq]),
    ]


def _ratios(model, calibration: CalibrationData) -> list[float]:
    """max |x| / mean |x| of every MatMul input with a constant weight (the outlier measure per layer)."""
    names = list(dict.fromkeys(n.inputs[0].name for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None))
    stats = calibration.collect(model, names)
    return [float(stats[n].absmax.max() / max(stats[n].mean_abs.mean(), 1e-12)) for n in names]


def _table(name: str, fp32, calibration: CalibrationData, score, only: str | None, default: CalibrationData | None = None):
    """Rows for one model; ``default`` (if given) calibrates every row whose label does not ask for all windows."""
    rows = [{"model": name, "variant": "FP32", "value": score(fp32)}]
    print(rows[-1], flush=True)
    rotated = None
    for label, steps in _rows():
        if only and only not in label and not label.startswith("fold-norm-affine"):
            continue
        start = time.perf_counter()
        data = calibration if default is None or "32 calibration windows" in label else default
        model, report = bitfold.optimize(bitfold.clone(fp32), steps, data)
        if label.startswith("fold-norm-affine"):
            rotated = model
        notes = [f"{r.name}: {n}" for r in report.passes for n in r.notes]
        rows.append({"model": name, "variant": label, "value": score(model), "seconds": time.perf_counter() - start,
                     "notes": notes[:2] + ([f"... {len(notes) - 2} more"] if len(notes) > 2 else [])})  # fmt: skip
        print(rows[-1], flush=True)
    few = CalibrationData(list(calibration)[-2:])
    return rows, {"fp32": _ratios(fp32, few), "rotated": _ratios(rotated, few)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--only", help="run only the rows whose label contains this text and merge them into the JSON")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    result = {**provenance(), "rows": [], "max_over_mean_abs": {}}
    if "minilm" in args.models:
        reference = export_minilm()
        fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
        calibration = CalibrationData.from_source("lee-sentences", fp32)
        rows, ratios = _table("MiniLM cosine", fp32, calibration, lambda m: minilm_cos(m, reference).value, args.only)
        result["rows"] += rows
        result["max_over_mean_abs"]["minilm"] = ratios
    if "smollm2" in args.models:
        fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
        calibration = CalibrationData.from_source("lee-text", fp32)  # 32 windows; rows use the last 8 unless named
        rows, ratios = _table("SmolLM2 perplexity", fp32, calibration, lambda m: smollm2_ppl(m).value, args.only,
                              CalibrationData(list(calibration)[-8:]))  # fmt: skip
        result["rows"] += rows
        result["max_over_mean_abs"]["smollm2"] = ratios
    if args.only:  # merge: the new rows replace same-named ones, the rest of the table stays; the stamp is this run's
        previous = json.loads((RESULTS / "transforms.json").read_text())
        result["rows"] = merge_rows(previous["rows"], result["rows"])
        result["max_over_mean_abs"] = {**previous["max_over_mean_abs"], **result["max_over_mean_abs"]}
    write_atomic(RESULTS / "transforms.json", json.dumps(result, indent=2).encode())
    fig, axes = plt.subplots(1, len(result["max_over_mean_abs"]), figsize=(6 * len(result["max_over_mean_abs"]), 3.5), squeeze=False)
    for ax, (name, ratios) in zip(axes[0], result["max_over_mean_abs"].items(), strict=True):
        ax.semilogy(ratios["fp32"], ".", label="fp32 export")
        ax.semilogy(ratios["rotated"], ".", label="fold-norm-affine + rotate")
        ax.set_title(name)
        ax.set_xlabel("linear input (graph order)")
        ax.set_ylabel("max |x| / mean |x|")
        ax.legend()
        print(name, "median max/mean before", np.median(ratios["fp32"]), "after", np.median(ratios["rotated"]))
    fig.tight_layout()
    save_figure(fig, RESULTS / "transforms.png")


if __name__ == "__main__":
    main()
