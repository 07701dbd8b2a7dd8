"""How to export a decoder LM: tracing transformers (``torch.onnx.export(dynamo=True)``, the fixed-length graph
``bitfold export-llm smollm2 --seq-len 512``) against building the KV-cache graph from the config with weights
streamed from safetensors (``bitfold export-llm smollm2``). Each export runs in its own process (the CLI), after
SmolLM2's safetensors cache exists; wall seconds and peak resident memory (``getrusage`` of the child) are the
medians of ``--rounds`` runs, memory also as a multiple of the model's fp32 bytes.
Writes benchmarks/results/llm_export.json.

    python benchmarks/llm_export.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
BITFOLD = str(Path(sys.executable).with_name("bitfold"))
METHODS = {
    "trace transformers (torch.onnx.export dynamo=True), fixed length 512, no cache": ["--seq-len", "512"],
    "build from config + streamed safetensors (KV cache)": [],
}


def _run(args: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen([BITFOLD, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"bitfold {' '.join(args)} failed")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from bitfold.eval.models import smollm2_folder
    from bitfold.tools.bench import provenance
    from bitfold.tools.files import write_atomic

    stamp = provenance()
    fp32_bytes = (smollm2_folder() / "model.safetensors").stat().st_size
    runs = {name: [] for name in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in METHODS.items():
                out = Path(tmp) / f"{r}-{len(extra)}" / "model.onnx"
                seconds, rss = _run(["export-llm", "smollm2", "-o", str(out), *extra])
                files = sum(f.stat().st_size for f in out.parent.iterdir() if f.name.startswith("model.onnx"))
                runs[name].append({"seconds": seconds, "peak_rss_bytes": rss, "file_bytes": files})
                print(f"{name}: {seconds:.1f} s, peak RSS {rss / 1e6:.0f} MB", flush=True)
    rows = []
    for name, results in runs.items():
        rss = float(np.median([x["peak_rss_bytes"] for x in results]))
        rows.append({"method": name, "seconds": float(np.median([x["seconds"] for x in results])), "peak_rss_bytes": rss,
                     "rss_over_fp32_bytes": rss / fp32_bytes, "file_bytes": results[0]["file_bytes"], "runs": results})  # fmt: skip
    result = {**stamp, "model": "SmolLM2-135M-Instruct", "fp32_bytes": fp32_bytes, "rows": rows}
    write_atomic(RESULTS / "llm_export.json", json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
