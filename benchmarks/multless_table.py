"""Multiplication-less MatMuls: SmolLM2-135M perplexity, MiniLM cosine and EfficientNet-Lite0 agreement for
power-of-two shifts, ShiftAddLLM binary coding, binary (plain, PB-LLM, residual) and ternary weights, against
GPTQ W3/W2, each with the bits per weight it costs as stored.

Protocol (bitfold.eval.tasks): SmolLM2 on the Lee corpus, 512-token windows 0-15 scored (8,176 tokens),
calibration from windows 139-146; MiniLM cosine to fp32 over the Lee test sentences, calibration from 128
background sentences; EfficientNet-Lite0 top-1 agreement with fp32 over 500 photo crops. SmolLM2's weights come
from a Q4_1 GGUF (32-element blocks with an offset); no row uses 32-element groups. The LM head (and, by the
passes' ``keep_ends`` default, layers reading a graph input) stay fp32. Transformer rows run the emitted bitfold
ops through their ONNX functions under ONNX Runtime; EfficientNet's Conv weights use ``format = fake`` (the ops
are MatMuls); two RTN rows on the same Conv weights give context (bits over a typical 144-element kernel).

Bits per weight count codes, scales, means and salient masks/values at their stored width over K · N (GPTQ:
codes + one fp32 scale per group of 128, asymmetric rows + a zero point). Writes
benchmarks/results/multless.{json,png}.

    python benchmarks/multless_table.py [--models smollm2 minilm effnet] [--only "ShiftAddLLM"]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import onnx_ir as ir  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import efficientnet_lite0, export_minilm, export_smollm2  # noqa: E402
from bitfold.eval.tasks import effnet_agree, minilm_cos, smollm2_ppl  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools.bench import merge_rows, provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
HEAD = ["*lm_head*"]
GPTQ = {"name": "quantize-weights", "method": "gptq", "act_order": True, "group_size": 128, "format": "fake", "exclude": HEAD}
SINK = {"sink_weight": 64.0}  # SmolLM2 only: its first token is an attention sink; MiniLM mean-pools every token

TRANSFORMER_ROWS = [
    ("GPTQ W3 g128", {**GPTQ, "bits": 3, **SINK}, 3 + 32 / 128),
    ("GPTQ W3 g128 asym", {**GPTQ, "bits": 3, "symmetric": False, **SINK}, 3 + 35 / 128),
    ("GPTQ W2 g128 asym", {**GPTQ, "bits": 2, "symmetric": False, **SINK}, 2 + 34 / 128),
    ("shift 4-bit code (RTN)", {"name": "shift", "bits": 4}, None),
    ("shift 4-bit code + GPTQ", {"name": "shift", "bits": 4, "gptq": True, **SINK}, None),
    ("ShiftAddLLM q=3 g128", {"name": "shiftadd", "q": 3, **SINK}, None),
    ("ShiftAddLLM q=3 g128, float16 α", {"name": "shiftadd", "q": 3, "alpha_terms": 0, **SINK}, None),
    ("ShiftAddLLM q=2 g128", {"name": "shiftadd", "q": 2, **SINK}, None),
    ("binary, α = mean|W|", {"name": "binarize"}, None),
    ("PB-LLM ρ=10% (Hessian salience, GPTQ)", {"name": "binarize", "salient_ratio": 0.1, "salience": "hessian", "gptq": True, **SINK}, None),
    ("residual binary (2 planes)", {"name": "binarize", "planes": 2}, None),
    ("residual binary + GPTQ", {"name": "binarize", "planes": 2, "gptq": True, **SINK}, None),
    ("ternary b1.58 absmean", {"name": "ternarize"}, None),
    ("ternary b1.58 per-channel + GPTQ", {"name": "ternarize", "per_channel": True, "gptq": True, **SINK}, None),
]
CNN_ROWS = [
    ("RTN int4 per-channel (context)", lambda m: (_rtn_convs(m, 4), None), 4 + 32 / 144),
    ("RTN int8 per-channel (context)", lambda m: (_rtn_convs(m, 8), None), 8 + 32 / 144),
    ("shift 4-bit code", {"name": "shift", "bits": 4, "format": "fake"}, None),
    ("shift 4-bit code, DenseShift", {"name": "shift", "bits": 4, "zero": False, "format": "fake"}, None),
    ("shift 3-bit code", {"name": "shift", "bits": 3, "format": "fake"}, None),
    ("ternary b1.58 per-channel", {"name": "ternarize", "per_channel": True, "format": "fake"}, None),
    ("binary, α = mean|W|", {"name": "binarize", "format": "fake"}, None),
]


def _rtn_convs(model, bits: int):
    """Context row for the CNN: every Conv weight but the stem's, RTN per output channel (fake-quantized)."""
    from bitfold.passes.transforms.structure import reads_graph_input
    from bitfold.quant.formats import PerChannel, format_from, rtn

    for node in model.graph:
        if node.op_type == "Conv" and not reads_graph_input(node.inputs[0]):
            w = node.inputs[1].const_value.numpy()
            q = rtn(w.reshape(w.shape[0], -1), format_from(f"int{bits}"), PerChannel())[0].reshape(w.shape)
            node.inputs[1].const_value = ir.tensor(q.astype(w.dtype), name=node.inputs[1].name)
    return model


def _bits(report: bitfold.pipeline.PipelineReport) -> float | None:
    """Bits per weight from the multiplication-less pass's note."""
    for record in report.passes:
        for note in record.notes:
            if "bits per weight" in note:
                return float(note.split(", ")[1].split()[0])
    return None


def _without_sink(rows: list) -> list:
    return [(label, {k: v for k, v in step.items() if k != "sink_weight"}, bits) for label, step, bits in rows]


def _table(name: str, fp32, calibration, score, rows, only: str | None) -> list[dict]:
    out = [{"model": name, "variant": "FP32", "value": score(fp32), "bits": 32.0}]
    print(out[-1], flush=True)
    for label, step, bits in rows:
        if only and only not in label:
            continue
        start = time.perf_counter()
        model, report = step(bitfold.clone(fp32)) if callable(step) else bitfold.optimize(bitfold.clone(fp32), [step], calibration)
        solve = time.perf_counter() - start
        out.append({"model": name, "variant": label, "value": score(model), "bits": bits if bits is not None else _bits(report),
                    "seconds": round(solve, 1), "step": "see _rtn_convs" if callable(step) else step})  # fmt: skip
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm", "effnet"], choices=["smollm2", "minilm", "effnet"])
    parser.add_argument("--only", help="run only the rows whose label contains this text and merge them into the JSON")
    args = parser.parse_args()
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    rows: list[dict] = []
    if "minilm" in args.models:
        reference = export_minilm()
        fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
        calibration = CalibrationData.from_source("lee-sentences", fp32)
        rows += _table("MiniLM cosine", fp32, calibration, lambda m: minilm_cos(m, reference).value, _without_sink(TRANSFORMER_ROWS),
                       args.only)  # fmt: skip
    if "effnet" in args.models:
        module, example = efficientnet_lite0()
        reference = bitfold.from_torch(module, example)
        fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
        rows += _table("EfficientNet-Lite0 top-1 agreement", fp32, None, lambda m: effnet_agree(m, reference).value, CNN_ROWS, args.only)
    if "smollm2" in args.models:
        fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
        calibration = CalibrationData(list(CalibrationData.from_source("lee-text", fp32))[-8:])
        rows += _table("SmolLM2 perplexity", fp32, calibration, lambda m: smollm2_ppl(m).value, TRANSFORMER_ROWS, args.only)
    path = RESULTS / "multless.json"
    if path.exists():  # merge: new rows replace same-named ones, the rest of the table stays; the stamp is this run's
        rows = merge_rows(json.loads(path.read_text())["rows"], rows)
    result = {
        **stamp,
        "protocol": "SmolLM2: Lee windows 0-15 (512 tokens), calibration windows 139-146; MiniLM: Lee test sentences; "
        "EfficientNet-Lite0: 500 photo crops, Conv weights fake-quantized",
        "rows": rows,
    }
    write_atomic(path, json.dumps(result, indent=2).encode())
    _plot(rows, RESULTS / "multless.png")


def _plot(rows: list[dict], path: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model and r["variant"] != "FP32"]
        fp32 = next((r["value"] for r in rows if r["model"] == model and r["variant"] == "FP32"), None)
        for r in mine:
            ax.scatter(r["bits"], r["value"], color="#69c" if r["variant"].startswith("GPTQ") else "#c63")
            ax.annotate(r["variant"], (r["bits"], r["value"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        if fp32 is not None:
            ax.axhline(fp32, color="k", lw=0.8, label="fp32")
        if "perplexity" in model:
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight as stored")
        ax.set_title(model)
    fig.suptitle("Multiplication-less weights (orange) vs GPTQ (blue)")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
