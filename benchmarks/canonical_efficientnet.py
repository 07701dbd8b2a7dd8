"""Canonical passes on EfficientNet-Lite0: op counts and ONNX Runtime latency, as ratios in one run.

Three graphs of the same network, timed in interleaved rounds with one ORT configuration (spinning off):
  raw       torch.onnx.export(dynamo=True, optimize=False), the exporter's faithful graph: the baseline
  exporter  torch.onnx.export(dynamo=True, optimize=True), the exporter's own onnxscript optimizer
  bitfold   raw + bitfold's canonical recipe
Writes benchmarks/results/canonical_efficientnet_lite0.{json,png}.

    python benchmarks/canonical_efficientnet.py [--rounds 15 --iters 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import efficientnet_lite0  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.summary import summarize  # noqa: E402
from bitfold.tools.bench import compare, provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NAME = "canonical_efficientnet_lite0"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    stamp = provenance()

    module, (x,) = efficientnet_lite0()
    raw = bitfold.from_torch(module, (x,))
    exporter = bitfold.from_torch(module, (x,), optimize=True)
    feeds = {raw.graph.inputs[0].name: x.numpy()}
    optimized, report = bitfold.optimize(bitfold.clone(raw), list(CANONICAL), verify=True, feeds=feeds)
    models = {"raw": raw, "exporter": exporter, "bitfold": optimized}
    stats = compare(
        [bitfold.compile(m, "ort", "cpu", spinning=False) for m in models.values()],
        [feeds] * len(models),
        rounds=args.rounds,
        iters=args.iters,
    )
    result = {
        **stamp,
        "model": "EfficientNet-Lite0 1x3x224x224",
        "max_rel_err": max(r.max_rel for r in report.passes),
        "graphs": {
            name: {"nodes": summarize(m)["nodes"], "ops": summarize(m)["ops"], "latency_ms": s}
            for (name, m), s in zip(models.items(), stats, strict=True)
        },
        "passes": [{"name": r.name, "seconds": r.seconds, "ops_removed": r.ops_removed} for r in report.passes],
    }
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / f"{NAME}.json", json.dumps(result, indent=2).encode())
    _plot(result, RESULTS / f"{NAME}.png")
    for name, g in result["graphs"].items():
        print(f"{name:9s} nodes={g['nodes']:4d} BN={g['ops'].get('BatchNormalization', 0):3d} "
              f"p50={g['latency_ms']['p50']:.3f} ms  ratio vs raw={g['latency_ms']['ratio']:.3f}")  # fmt: skip
    print(f"max rel err of the bitfold graph vs the input: {result['max_rel_err']:.2e}")


def _plot(result: dict, path: Path) -> None:
    names = list(result["graphs"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.bar(names, [result["graphs"][n]["nodes"] for n in names], color=["#999", "#69c", "#c63"])
    left.set_title("graph nodes")
    right.bar(names, [result["graphs"][n]["latency_ms"]["ratio"] for n in names], color=["#999", "#69c", "#c63"])
    right.axhline(1.0, color="k", lw=0.8)
    right.set_title("ORT CPU latency, ratio to raw (p50, lower is better)")
    fig.suptitle(result["model"])
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
