"""Weight-only quantization of SmolLM2-135M: perplexity, bytes and ORT latency, against ONNX Runtime's own tools.

Protocol (bitfold.eval.tasks): Lee corpus, 512-token windows 0-15 scored (8,176 tokens); calibration from
windows 139-146 only. SmolLM2's weights come from a Q4_1 GGUF (32-element blocks with a float offset), so they
already lie on a 4-bit grid; nothing here uses 32-element asymmetric groups. lm_head (tied to the embedding in
the checkpoint) stays fp32 in every row unless the row says otherwise.

Perplexity is computed on the emitted graphs: MatMulNBits at accuracy_level 0 (fp32 compute) for 128-groups,
QDQ for per-channel rows. Latency compares, in one run with interleaved rounds, fp32 against the MatMulNBits
graphs of bitfold and of ORT's MatMulNBitsQuantizer, both at accuracy_level 4.
Writes benchmarks/results/quant_smollm2.{json,png}.

    python benchmarks/quant_table.py [--rounds 5] [--only "W8A8"]

``--only TEXT`` runs the bitfold rows whose label contains TEXT and merges them into the JSON (no latency rerun).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import onnx_ir as ir  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import export_smollm2  # noqa: E402
from bitfold.eval.tasks import CALIB_WINDOWS, smollm2_ppl  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools.bench import compare, merge_rows, provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
KEEP_HEAD = ["*lm_head*"]
GPTQ = {"method": "gptq", "act_order": True, "sink_weight": 64.0, "clip": "output", "damp": 0.003}
AWQ = {"method": "awq", "symmetric": False, "clip": "output"}

ROWS = [
    ("RTN W8 per-channel", {"method": "rtn", "bits": 8, "group_size": -1, "symmetric": False}),
    ("RTN W4 per-channel", {"method": "rtn", "bits": 4, "group_size": -1}),
    ("GPTQ W4 per-channel", {**GPTQ, "bits": 4, "group_size": -1}),
    ("RTN W4 g128", {"method": "rtn", "bits": 4, "group_size": 128}),
    ("GPTQ W4 g128", {**GPTQ, "bits": 4, "group_size": 128}),
    ("RTN W4 g128, output clip", {"method": "rtn", "bits": 4, "group_size": 128, "clip": "output"}),
    ("AWQ W4 g128", {**AWQ, "bits": 4, "group_size": 128}),
    ("GPTQ W4 g128, no clip, damp 0.01", {"method": "gptq", "act_order": True, "sink_weight": 64.0, "bits": 4, "group_size": 128}),
    ("RTN W3 g128", {"method": "rtn", "bits": 3, "group_size": 128}),
    ("GPTQ W3 g128", {**GPTQ, "bits": 3, "group_size": 128}),
    ("AWQ W3 g128", {**AWQ, "bits": 3, "group_size": 128}),
    ("RTN W4 g128, lm_head too", {"method": "rtn", "bits": 4, "group_size": 128, "exclude": []}),
]
# where AWQ loses to GPTQ: only the q/k/v projections quantized (each method as in its row above), the rest fp32
NOT_QKV = [*KEEP_HEAD, "*o_proj*", "*gate_proj*", "*up_proj*", "*down_proj*"]
ROWS += [
    (f"{label} W4 g128, q/k/v only", {**params, "bits": 4, "group_size": 128, "exclude": NOT_QKV})
    for label, params in (
        ("RTN (asymmetric, output clip)", {"method": "rtn", "symmetric": False, "clip": "output"}),
        ("AWQ", AWQ),
        ("GPTQ", GPTQ),
        ("GPTQ with sink_weight 1", {**GPTQ, "sink_weight": 1.0}),
    )
]
TOKENS8 = {"name": "quantize-tokens", "bits": 8, "exclude": KEEP_HEAD}
W8 = {"name": "quantize-weights", "method": "rtn", "bits": 8, "group_size": -1, "format": "qdq", "exclude": KEEP_HEAD}
ACTIVATION_ROWS = [
    ("W8A8 uint8 activations (minmax), weights int8 per channel",
     [{"name": "quantize-activations", "activation_dtype": "uint8", "exclude": KEEP_HEAD}]),
    ("W8A8 fp8-e4m3 activations (minmax), weights fp8-e4m3 per channel",
     [{"name": "quantize-activations", "activation_dtype": "fp8-e4m3", "exclude": KEEP_HEAD}]),
    ("W8A8 int8 per-token dynamic activations (simulated), weights int8 per channel", [TOKENS8, W8]),
    ("W8A8 int8 per-token dynamic activations (simulated), weights int8 per channel, smooth alpha 0.5",
     [{"name": "smooth", "alpha": 0.5, "exclude": KEEP_HEAD}, TOKENS8, W8]),
]  # fmt: skip


def _ort_tool(model: ir.Model, tmp: Path, kind: str) -> ir.Model:
    proto = ir.to_proto(model)
    if kind == "matmulnbits":
        quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=128, is_symmetric=True, accuracy_level=4)
        quantizer.process()
        return ir.from_proto(quantizer.model.model)
    src, dst = tmp / "fp32.onnx", tmp / "dynamic.onnx"
    bitfold.save(model, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    return bitfold.load(dst)


def _weight_steps(params: dict) -> list[dict]:
    emitted = {"format": "matmulnbits", "accuracy_level": 0} if params["group_size"] == 128 else {"format": "qdq"}
    steps = [{"name": "quantize-weights", "exclude": KEEP_HEAD, **emitted, **params}]
    if params.get("exclude") == []:  # lm_head reads Transpose(embedding): fold it into a constant so it can be quantized
        steps.insert(0, {"name": "fold-constants", "input_size_limit": 1 << 26, "output_size_limit": 1 << 26})
    return steps


def _row(label: str, model: ir.Model, tool: str, **extra) -> dict:
    row = {"model": "SmolLM2", "variant": label, "tool": tool, **extra, "ppl": smollm2_ppl(model).value,
           "bytes": bitfold.frontend.parameter_bytes(model)}  # fmt: skip
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", help="run only the bitfold rows whose label contains this text and merge them into the JSON")
    args = parser.parse_args()
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / ".tmp"
    tmp.mkdir(exist_ok=True)

    fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    calibration = CalibrationData.from_source("lee-text", fp32)
    selected = lambda label: args.only is None or args.only in label  # noqa: E731
    rows = [] if args.only else [_row("FP32", fp32, "-")]
    for label, steps in [(label, _weight_steps(params)) for label, params in ROWS] + ACTIVATION_ROWS:
        if selected(label):
            model, _ = bitfold.optimize(bitfold.clone(fp32), steps, calibration)
            rows.append(_row(label, model, "bitfold", format=steps[-1].get("format", "qdq")))
    if selected("fp16 with fp32 islands"):  # every tensor is exposed during calibration: 2 windows keep memory reasonable
        fp16, report = bitfold.optimize(bitfold.clone(fp32), ["cast-precision"], CalibrationData(list(calibration)[-2:]))
        rows.append(_row("fp16 with fp32 islands", fp16, "bitfold", format="float16", casts=report.passes[0].ops_added.get("Cast", 0)))
    if args.only:  # merge: the new rows replace same-named ones, the rest of the table and the latency stay; the stamp is this run's
        result = {**json.loads((RESULTS / "quant_smollm2.json").read_text()), **stamp}
        result["rows"] = merge_rows([{"model": "SmolLM2", **r} for r in result["rows"]], rows)
    else:
        ort_nbits = _ort_tool(fp32, tmp, "matmulnbits")
        rows.append(_row("MatMulNBitsQuantizer RTN W4 g128 sym", ort_nbits, "onnxruntime"))
        rows.append(_row("quantize_dynamic int8", _ort_tool(fp32, tmp, "dynamic"), "onnxruntime"))
        result = {
            **stamp,
            "model": "SmolLM2-135M-Instruct (weights from a Q4_1 GGUF: 32-element blocks with offset)",
            "protocol": f"Lee corpus, windows 0-15 of 512 tokens (8,176 scored); calibration windows {CALIB_WINDOWS.start}-{CALIB_WINDOWS.stop - 1}",
            "rows": rows,
            **_latency(fp32, ort_nbits, next(iter(calibration)), args.rounds),
        }
    write_atomic(RESULTS / "quant_smollm2.json", json.dumps(result, indent=2).encode())
    _plot(result, RESULTS / "quant_smollm2.png")
    for name, s in result["latency_ms_seq512"].items():
        print(f"{name:28s} p50 {s['p50']:.1f} ms  ratio vs fp32 {s['ratio']:.3f}")
    print(f"bitfold / ORT MatMulNBits latency: {result['bitfold_vs_ort_matmulnbits']:.3f}")
    shutil.rmtree(tmp, ignore_errors=True)


def _latency(fp32: ir.Model, ort_nbits: ir.Model, feeds: dict, rounds: int) -> dict:
    """One 512-token forward of fp32, ORT's MatMulNBits model and bitfold's, interleaved in one run."""
    ours, _ = bitfold.optimize(
        bitfold.clone(fp32), [{"name": "quantize-weights", "bits": 4, "group_size": 128, "format": "matmulnbits", "exclude": KEEP_HEAD}]
    )
    stats = compare([bitfold.compile(m, "ort", "cpu", spinning=False) for m in (fp32, ort_nbits, ours)], [feeds] * 3,
                    warmup=2, rounds=rounds, iters=3)  # fmt: skip
    latency = {name: s for name, s in zip(("fp32", "ort MatMulNBitsQuantizer", "bitfold matmulnbits"), stats, strict=True)}
    return {"latency_ms_seq512": latency,
            "bitfold_vs_ort_matmulnbits": latency["bitfold matmulnbits"]["p50"] / latency["ort MatMulNBitsQuantizer"]["p50"]}  # fmt: skip


def _plot(result: dict, path: Path) -> None:
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = ["#999" if r["tool"] == "-" else "#c63" if r["tool"] == "bitfold" else "#69c" for r in rows]
    ax.barh([r["variant"] for r in rows][::-1], [r["ppl"] for r in rows][::-1], color=colors[::-1])
    ax.axvline(rows[0]["ppl"], color="k", lw=0.8)
    ax.set_xlabel("perplexity (lower is better); orange bitfold, blue onnxruntime")
    ax.set_title("SmolLM2-135M weight-only quantization, Lee corpus")
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
