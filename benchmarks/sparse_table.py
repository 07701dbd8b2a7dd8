"""Pruning SmolLM2-135M and MiniLM: magnitude, Wanda and SparseGPT at 50 % unstructured, 2:4, 4:8 and 70 %
unstructured, SparseGPT with joint int4 quantization (sparse + W4), and SqueezeLLM's dense-and-sparse W3 (0.5 %
float16 outliers) against GPTQ W3.

Protocol (bitfold.eval.tasks): SmolLM2 on the Lee corpus, 512-token windows 0-15 scored, calibration from windows
139-146 (first-token weight 64 in H, as the GPTQ rows of the quantization table); MiniLM cosine to fp32 over the
Lee test sentences, calibration from 128 background sentences. The LM head stays dense. Weights are written back
dense with zeros (``prune`` is ``masked``). Writes benchmarks/results/sparse.{json,png}.

    python benchmarks/sparse_table.py [--models smollm2 minilm] [--only "2:4"]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import export_minilm, export_smollm2  # noqa: E402
from bitfold.eval.tasks import minilm_cos, smollm2_ppl  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools.bench import merge_rows, provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PATTERNS = {"50% unstructured": "unstructured:0.5", "2:4": "nm:2:4", "4:8": "nm:4:8", "70% unstructured": "unstructured:0.7"}
ROWS = [(f"{method} {label}", {"name": "prune", "method": method, "pattern": pattern})
        for label, pattern in PATTERNS.items() for method in ("magnitude", "wanda", "sparsegpt")]  # fmt: skip
ROWS += [
    ("sparsegpt 50% unstructured + W4 g128", {"name": "prune", "method": "sparsegpt", "pattern": "unstructured:0.5", "bits": 4}),
    ("sparsegpt 2:4 + W4 g128", {"name": "prune", "method": "sparsegpt", "pattern": "nm:2:4", "bits": 4}),
    ("wanda 50% unstructured + refine 50 cycles", {"name": "prune", "method": "wanda", "pattern": "unstructured:0.5", "refine_cycles": 50}),
    ("wanda 70% unstructured + refine 50 cycles", {"name": "prune", "method": "wanda", "pattern": "unstructured:0.7", "refine_cycles": 50}),
    ("sparsegpt 50% unstructured + EoRA r32", {"name": "prune", "method": "sparsegpt", "pattern": "unstructured:0.5", "compensate_rank": 32}),
    ("sparsegpt 2:4 + EoRA r32", {"name": "prune", "method": "sparsegpt", "pattern": "nm:2:4", "compensate_rank": 32}),
    ("GPTQ W3 g128 (dense)", {"name": "quantize-weights", "method": "gptq", "bits": 3, "group_size": 128, "act_order": True,
                              "format": "fake", "exclude": ["*lm_head*"]}),
    ("dense-and-sparse W3 g128, 0.5% float16 outliers", {"name": "split-outliers", "ratio": 0.005, "bits": 3}),
]


def _table(name: str, fp32, calibration, score, only: str | None, sink: float) -> list[dict]:
    out = [{"model": name, "variant": "dense FP32", "value": score(fp32)}]
    print(out[-1], flush=True)
    for label, step in ROWS:
        if only and only not in label:
            continue
        start = time.perf_counter()
        step = {**step, "sink_weight": sink} if step.get("method") != "magnitude" else step
        model, report = bitfold.optimize(bitfold.clone(fp32), [step], calibration)
        out.append({"model": name, "variant": label, "value": score(model), "seconds": round(time.perf_counter() - start, 1),
                    "note": (report.passes[0].notes or [""])[-1], "step": step})  # fmt: skip
        print(out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    parser.add_argument("--only", help="run only the rows whose label contains this text and merge them into the JSON")
    args = parser.parse_args()
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    rows: list[dict] = []
    if "minilm" in args.models:
        reference = export_minilm()
        fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
        calibration = CalibrationData.from_source("lee-sentences", fp32)
        rows += _table("MiniLM cosine", fp32, calibration, lambda m: minilm_cos(m, reference).value, args.only, 1.0)
    if "smollm2" in args.models:
        fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
        calibration = CalibrationData(list(CalibrationData.from_source("lee-text", fp32))[-8:])
        rows += _table("SmolLM2 perplexity", fp32, calibration, lambda m: smollm2_ppl(m).value, args.only, 64.0)
    path = RESULTS / "sparse.json"
    previous = json.loads(path.read_text())["rows"] if path.exists() else []  # merge: new rows replace same-named ones
    rows = merge_rows(previous, rows, ["dense FP32"] + [label for label, _ in ROWS])
    write_atomic(path, json.dumps({**stamp, "rows": rows}, indent=2).encode())  # the stamp is this run's
    _plot(rows, RESULTS / "sparse.png")


def _plot(rows: list[dict], path: Path) -> None:
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        colors = ["#999" if "dense" in r["variant"] else "#c63" if "sparsegpt" in r["variant"] else "#69c" if "wanda" in r["variant"] else "#aaa"
                  for r in mine]  # fmt: skip
        ax.barh([r["variant"] for r in mine][::-1], [r["value"] for r in mine][::-1], color=colors[::-1])
        if "perplexity" in model:
            ax.set_xscale("log")
        ax.set_title(model)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
