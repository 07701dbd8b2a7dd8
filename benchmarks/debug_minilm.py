"""The pass-level debugger on all-MiniLM-L6-v2: a recipe whose last step is too aggressive.

Recipe: canonical cleanup, int8 per-channel weights everywhere but layer 3's FFN (harmless), then int2 weights on
that FFN (the culprit). Tolerance 5e-2 on the pass's own relative output error, one Lee sentence as input, ``--reduce`` on.
Writes benchmarks/results/debug_minilm/{report.html, report.json, report.png (headless Chromium), repro.onnx, ...}.

    python benchmarks/debug_minilm.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bitfold
from bitfold.eval.data import lee_sentences
from bitfold.eval.models import export_minilm, minilm
from bitfold.eval.tasks import sentence_feeds
from bitfold.tools.bench import provenance
from bitfold.tools.cli import main as cli
from bitfold.tools.debug import screenshot
from bitfold.tools.files import save_arrays, write_atomic

OUT = Path(__file__).parent / "results" / "debug_minilm"
RECIPE = """\
[[pass]]
name = "fold-constants"
[[pass]]
name = "remove-identity"
[[pass]]
name = "quantize-weights"
bits = 8
group_size = -1
format = "fake"
exclude = ["*layer.3.intermediate*", "*layer.3.output*"]
[[pass]]
name = "quantize-weights"
bits = 2
group_size = 32
symmetric = false
format = "fake"
exclude = ["*layer.[!3]*", "*attention*"]
"""


def main() -> None:
    stamp = provenance()
    OUT.mkdir(parents=True, exist_ok=True)
    _, tokenizer = minilm()
    model_path = bitfold.save(export_minilm(), OUT / "minilm.onnx")
    save_arrays(OUT / "inputs.npz", sentence_feeds(tokenizer, lee_sentences("test")[:1])[0])
    write_atomic(OUT / "recipe.toml", RECIPE.encode())
    code = cli(["debug", str(model_path), "-r", str(OUT / "recipe.toml"), "--inputs", str(OUT / "inputs.npz"),
                "-o", str(OUT), "--tolerance", "5e-2", "--reduce"])  # fmt: skip
    if code:
        sys.exit(code)
    model_path.unlink()  # 90 MB; the report and the repro are what this run is for
    if not screenshot(OUT / "report.html", OUT / "report.png", (1280, 2000)):
        print("no Chromium: report.png not written")
    report = {**stamp, **json.loads((OUT / "report.json").read_text())}
    write_atomic(OUT / "report.json", json.dumps(report, indent=2).encode())
    print(json.dumps({k: report[k] for k in ("culprit", "first_node", "repro")}, indent=2))


if __name__ == "__main__":
    main()
