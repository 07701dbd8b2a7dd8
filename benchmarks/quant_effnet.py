"""W8A8 on EfficientNet-Lite0: top-1 agreement and KL vs fp32, bytes and ORT latency, against ORT's quantize_static.

Evaluation: 500 deterministic crops/flips of 10 scikit-image photos (bitfold.eval.tasks.effnet_agree);
calibration: 96 crops of 6 other photos (the built-in ``skimage-photos`` source). ORT's quantize_static gets the
same calibration images (QDQ, per-channel int8 weights, uint8 activations, MinMax). The exclusion loop
(``bitfold.tools.exclude.keep_within`` on the W8A8 step, metric: relative L2 error of the logits on the first 4
calibration crops) leaves the layers that cost most in float, for each budget in ``BUDGETS``. A last row feeds fp32 itself
inputs with noise of the size of 8-bit input rounding: the agreement this data allows any quantized input. Latency: one run, interleaved
rounds, ratio to fp32. Writes benchmarks/results/quant_effnet.{json,png}.

    python benchmarks/quant_effnet.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static  # noqa: E402

import numpy as np  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.data import photo_crops  # noqa: E402
from bitfold.eval.models import efficientnet_lite0  # noqa: E402
from bitfold.eval.tasks import EFFNET_CROPS_PER_PHOTO, effnet_agree  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools.bench import compare, provenance  # noqa: E402
from bitfold.tools.exclude import keep_within  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
BUDGETS = (0.04, 0.03)


class _Reader(CalibrationDataReader):
    def __init__(self, calibration: CalibrationData) -> None:
        self._feeds = iter(calibration)

    def get_next(self):
        return next(self._feeds, None)


def _input_noise_floor(reference) -> dict:
    """fp32 itself, fed each crop plus Gaussian noise of the size uint8 rounding of the normalized image adds
    (σ = step/√12, step = input range / 255): how many top-1 decisions input-grid noise alone flips."""
    images = photo_crops("eval", EFFNET_CROPS_PER_PHOTO)
    sigma = float(images.max() - images.min()) / 255 / np.sqrt(12)
    noisy = images + np.random.default_rng(0).normal(0.0, sigma, images.shape).astype(np.float32)
    runnable, name = bitfold.compile(reference, "ort", "cpu"), reference.graph.inputs[0].name
    logits = [np.stack([next(iter(runnable.run({name: x[None]}).values()))[0] for x in batch]) for batch in (images, noisy)]
    agreement = float(np.mean(logits[0].argmax(1) == logits[1].argmax(1)))
    return {"variant": f"fp32, input + N(0, {sigma:.4f}) (uint8 input grid noise)", "agreement": agreement}


def main() -> None:
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / ".tmp"
    tmp.mkdir(exist_ok=True)
    module, example = efficientnet_lite0()
    reference = bitfold.from_torch(module, example)
    fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
    calibration = CalibrationData.from_source("skimage-photos", fp32)
    variants = {"fp32": fp32}
    for observer in ("minmax", "percentile", "mse"):
        variants[f"bitfold W8A8 {observer}"] = bitfold.optimize(
            bitfold.clone(fp32), [{"name": "quantize-activations", "observer": observer}], calibration
        )[0]
    variants["bitfold W8A8 fp8-e4m3 minmax"] = bitfold.optimize(
        bitfold.clone(fp32), [{"name": "quantize-activations", "activation_dtype": "fp8-e4m3"}], calibration
    )[0]
    variants["bitfold W8A8 minmax, image quantized too"] = bitfold.optimize(
        bitfold.clone(fp32), [{"name": "quantize-activations", "graph_inputs": True}], calibration
    )[0]
    kept_float, contributions = {}, None  # contributions measured once, reused for the other budgets
    for budget in BUDGETS:
        kept = keep_within(bitfold.clone(fp32), {"name": "quantize-activations"}, budget, list(calibration)[:4], calibration, contributions)
        contributions = kept.contributions
        name = f"bitfold W8A8 minmax, exclusion loop max_error {budget:g}"
        variants[name], kept_float[name] = kept.model, kept.kept
        print(f"budget {budget}: logit error {kept.error:.4f}, {len(kept.kept)} layers kept float: {kept.kept}", flush=True)
    src, dst = tmp / "fp32.onnx", tmp / "ort_static.onnx"
    bitfold.save(fp32, src)
    quantize_static(str(src), str(dst), _Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    variants["ORT quantize_static W8A8"] = bitfold.load(dst)

    rows = []
    for name, model in variants.items():
        task = effnet_agree(model, reference)
        rows.append({"variant": name, "agreement": task.value, "mean_kl": task.detail["mean_kl"],
                     "bytes": bitfold.frontend.parameter_bytes(model), "layers_kept_float": kept_float.get(name)})  # fmt: skip
        print(rows[-1], flush=True)
    rows.append(_input_noise_floor(reference))
    print(rows[-1], flush=True)
    feeds = next(iter(calibration))
    stats = compare([bitfold.compile(m, "ort", "cpu", spinning=False) for m in variants.values()], [feeds] * len(variants),
                    rounds=10, iters=10)  # fmt: skip
    for row, s in zip(rows, stats, strict=False):
        row["latency_ms"] = s
        print(f"{row['variant']:28s} p50 {s['p50']:.2f} ms  ratio vs fp32 {s['ratio']:.3f}")
    result = {**stamp, "model": "EfficientNet-Lite0 1x3x224x224", "conv_layers": sum(n.op_type == "Conv" for n in fp32.graph),
              "budgets": list(BUDGETS), "rows": rows}  # fmt: skip
    write_atomic(RESULTS / "quant_effnet.json", json.dumps(result, indent=2).encode())
    fig, ax = plt.subplots(figsize=(8, 4.2))
    ax.barh([r["variant"] for r in rows][::-1], [100 * r["agreement"] for r in rows][::-1], color="#c63")
    ax.set_xlabel("top-1 agreement with fp32, % (500 crops)")
    ax.set_xlim(50, 100)
    fig.tight_layout()
    save_figure(fig, RESULTS / "quant_effnet.png")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
