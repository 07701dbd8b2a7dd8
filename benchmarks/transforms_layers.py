"""Where W4A4 error comes from on SmolLM2-135M after rotation: per-linear relative output error.

The fp32 model gets ``fold-norm-affine`` + ``rotate``; then three variants: GPTQ W4 per-channel weights only, per-token
A4 activations only, and both. Each linear's output (by name, the same in every variant) is compared with the
rotated fp32 model's on one held-out window (Lee window 0): ‖y_q - y‖ / ‖y‖. Calibration: windows 139-146. Also the
mean RTN W4 relative weight error of the stream's readers and writers before and after rotation.
Writes benchmarks/results/transforms_layers.{json,png}.

    python benchmarks/transforms_layers.py
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
from bitfold.eval.tasks import lee_windows, lm_feeds  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools.bench import provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HEAD = ["*lm_head*"]
W4 = {"name": "quantize-weights", "method": "gptq", "act_order": True, "sink_weight": 64.0, "bits": 4, "group_size": -1,
      "format": "fake", "exclude": HEAD}  # fmt: skip
A4 = {"name": "quantize-tokens", "bits": 4, "exclude": HEAD}


def _linear_outputs(model, feeds: dict) -> dict[str, np.ndarray]:
    probe = bitfold.clone(model)
    names = []
    for node in probe.graph:
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None and node.metadata_props.get("bitfold.precision") != "float32":
            probe.graph.outputs.append(node.outputs[0])
            names.append((node.outputs[0].name, node.metadata_props.get("namespace", "").split("/")[-2].split(":")[0]))
    outputs = bitfold.compile(probe, "ort", "cpu").run(feeds)
    return {f"{scope}|{name}": outputs[name] for name, scope in names}


def _rtn_error(graph) -> dict[str, float]:
    """Mean relative error ‖RTN4(W) - W‖ / ‖W‖ (per-channel, symmetric) of the stream's readers and writers."""
    from bitfold.passes.transforms.structure import residual_stream
    from bitfold.quant.formats import IntFormat, PerChannel, fake_quantize

    stream = residual_stream(graph)
    error = lambda w: float(np.linalg.norm(fake_quantize(w.T, IntFormat(4), PerChannel()) - w.T) / np.linalg.norm(w))  # noqa: E731
    return {"readers": float(np.mean([error(lin.weight) for lin in stream.readers[:-1]])),
            "writers": float(np.mean([error(lin.weight) for lin in stream.writers]))}  # fmt: skip


def main() -> None:
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    rtn_error = {"fp32": _rtn_error(fp32.graph)}
    rotated, _ = bitfold.optimize(fp32, ["fold-norm-affine", "rotate"])
    rtn_error["rotated"] = _rtn_error(rotated.graph)
    print("weight RTN4 relative error", rtn_error)
    calibration = CalibrationData(list(CalibrationData.from_source("lee-text", rotated))[-8:])
    weights_only, _ = bitfold.optimize(bitfold.clone(rotated), [W4], calibration)
    both, _ = bitfold.optimize(bitfold.clone(weights_only), [A4])
    acts_only, _ = bitfold.optimize(bitfold.clone(rotated), [A4])
    _, tokenizer = smollm2()
    feeds = next(iter(lm_feeds(lee_windows(tokenizer, range(1)))))
    reference = _linear_outputs(rotated, feeds)
    result = {**stamp, "layers": list(reference), "relative_error": {}, "weight_rtn4_error": rtn_error}
    for label, model in (("W4 (GPTQ) only", weights_only), ("A4 only", acts_only), ("W4A4", both)):
        outputs = _linear_outputs(model, feeds)
        result["relative_error"][label] = [float(np.linalg.norm(outputs[k] - v) / np.linalg.norm(v)) for k, v in reference.items()]
    kinds = sorted({k.split("|")[0].split(".")[-1] for k in reference})
    result["by_kind"] = {
        label: {kind: float(np.mean([e for k, e in zip(reference, errs, strict=True) if k.split("|")[0].endswith(kind)])) for kind in kinds}
        for label, errs in result["relative_error"].items()
    }
    write_atomic(RESULTS / "transforms_layers.json", json.dumps(result, indent=2).encode())
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for label, errs in result["relative_error"].items():
        ax.semilogy(errs, ".", label=label)
    ax.set_xlabel("linear (graph order: q k v o gate up down per layer)")
    ax.set_ylabel("‖y_q - y‖ / ‖y‖")
    ax.set_title("SmolLM2-135M, rotated: per-linear output error")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, RESULTS / "transforms_layers.png")
    for label, by_kind in result["by_kind"].items():
        print(label, {k: round(v, 4) for k, v in by_kind.items()})


if __name__ == "__main__":
    main()
