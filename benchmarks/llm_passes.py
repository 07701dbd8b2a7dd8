"""Every LLM recipe on SmolLM2's two graphs: the fixed-length traced graph (``input_ids[1, 512] → logits``, no cache)
and the KV-cache graph ``bitfold export-llm`` builds. Structure discovery and calibration must see both alike, so
each recipe's perplexity must agree to 1e-3 relative.

The two graphs compute the same function in a different float order (they differ by about 1e-6 in fp32 logits).
Recipes that round activations (int8 tokens) or run an error-feedback solver (GPTQ's column loop, ShiftAddLLM) turn
such differences into a different draw of the same rounding noise. Where the graphs disagree by more than 1e-3, the
row also measures such draws on one graph: the same recipe on the fixed-length graph with ONNX Runtime's graph
optimizations off, and at its basic level (calibration and evaluation), fp32-equivalent reorderings of that graph
alone; and, with ``--ulp-draws N``, N draws on that graph with every element of its weight matrices moved by one ulp
in a seeded random direction (a perturbation of the size the two graphs' float orders make). ``spread_draws`` holds each draw's relative
difference from the graph's own perplexity, ``spread`` the largest. A row is "within reordering noise" when the graphs
differ by at most twice the spread.

Protocol: Lee corpus, 512-token windows 0-3 scored (2,044 tokens; the full 16-window protocol is the quantization
table's), calibration windows 139-142 (prefill from an empty cache on the cached graph). lm_head stays fp32 in
every row. SmolLM2's weights already lie on a Q4_1 32-group grid; no row uses 32-element asymmetric groups.
Writes benchmarks/results/llm_passes.json.

    python benchmarks/llm_passes.py [--only TEXT ...] [--skip-done] [--spread-only] [--ulp-draws N]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import bitfold
from bitfold.eval.models import export_smollm2, smollm2
from bitfold.eval.tasks import lee_windows, lm_feeds, perplexity
from bitfold.llm import export_llm
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.bench import merge_rows, provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"
HEAD = ["*lm_head*"]
FIXED = "fixed-length (traced, no cache)"
TOLERANCE = 1e-3
REORDERINGS = ("none", "basic")  # ORT optimization levels of the spread draws (the graphs are evaluated at "all")
EVAL, CALIB = range(0, 4), range(139, 143)
GPTQ = {"method": "gptq", "act_order": True, "sink_weight": 64.0, "clip": "output", "damp": 0.003}
NBITS = {"format": "matmulnbits", "accuracy_level": 0}
TOKENS8 = {"name": "quantize-tokens", "bits": 8, "exclude": HEAD}
W8 = {"name": "quantize-weights", "method": "rtn", "bits": 8, "group_size": -1, "format": "qdq", "exclude": HEAD}
W4_FAKE = {"name": "quantize-weights", "method": "rtn", "bits": 4, "group_size": -1, "format": "fake", "exclude": HEAD}

RECIPES: list[tuple[str, list]] = [
    ("fp32 (canonical)", []),
    ("fold-norm-affine", ["fold-norm-affine"]),
    ("fold-norm-affine + rotate (online Hadamard)", ["fold-norm-affine", "rotate"]),
    ("fold-norm-affine + rotate learned (20 steps)", ["fold-norm-affine", {"name": "rotate", "learn_steps": 20}]),
    ("smooth α 0.5 + W8A8 per-token", [{"name": "smooth", "alpha": 0.5, "exclude": HEAD}, TOKENS8, W8]),
    ("affine W4A8 + RTN W4 + A8", [{"name": "affine", "weight_bits": 4, "activation_bits": 8, "exclude": HEAD}, W4_FAKE,
                                   {**TOKENS8}]),
    ("affine W4A8 + RTN W4, activations float", [{"name": "affine", "weight_bits": 4, "activation_bits": 8, "exclude": HEAD},
                                                 W4_FAKE]),
    ("RTN W4 g128 (MatMulNBits)", [{"name": "quantize-weights", "method": "rtn", "bits": 4, "group_size": 128, "exclude": HEAD, **NBITS}]),
    ("GPTQ W4 g128 (MatMulNBits)", [{"name": "quantize-weights", **GPTQ, "bits": 4, "group_size": 128, "exclude": HEAD, **NBITS}]),
    ("AWQ W4 g128 (QDQ)", [{"name": "quantize-weights", "method": "awq", "symmetric": False, "clip": "output", "bits": 4,
                            "group_size": 128, "exclude": HEAD}]),
    ("RTN W8 per-channel (QDQ)", [W8]),
    ("quantize-tokens A8", [TOKENS8]),
    ("shift (power-of-two, 4 bits)", [{"name": "shift", "exclude": HEAD}]),
    ("shiftadd (ShiftAddLLM q3)", [{"name": "shiftadd", "exclude": HEAD}]),
    ("binarize", [{"name": "binarize", "exclude": HEAD}]),
    ("ternarize", [{"name": "ternarize", "exclude": HEAD}]),
    ("prune Wanda 2:4", [{"name": "prune", "method": "wanda", "pattern": "nm:2:4", "exclude": HEAD}]),
    ("split-outliers (0.5 % fp16 + 3-bit)", [{"name": "split-outliers", "exclude": HEAD}]),
    ("lowrank-split r32 + RTN W4", [{"name": "lowrank-split", "rank": 32, "exclude": HEAD}, W4_FAKE]),
    ("cast-precision fp16", ["cast-precision"]),
]  # fmt: skip


def _graphs():
    fixed, _ = bitfold.optimize(export_smollm2(512), list(CANONICAL))
    cached, _, _ = export_llm("smollm2")
    cached, _ = bitfold.optimize(bitfold.clone(cached), list(CANONICAL))
    return {FIXED: fixed, "KV-cache (export-llm)": cached}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", help="run only the recipes whose label contains one of these texts; merge into the JSON")
    parser.add_argument("--skip-done", action="store_true", help="run only the recipes the JSON does not hold yet; merge into it")
    parser.add_argument("--spread-only", action="store_true", help="keep the JSON's perplexities of the --only rows; measure their missing spread draws")
    parser.add_argument("--ulp-draws", type=int, default=0, help="rows that differ: also this many draws with the weight matrices moved one ulp (seeds 1..N)")
    args = parser.parse_args()
    stamp = provenance()
    path = RESULTS / "llm_passes.json"
    previous = {r["variant"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    done = set(previous) if args.skip_done else set()
    _, tokenizer = smollm2()
    scored, calib_windows = lee_windows(tokenizer, EVAL), lee_windows(tokenizer, CALIB)
    graphs = _graphs()
    rows = []
    for label, steps in RECIPES:
        if (args.only and not any(text in label for text in args.only)) or label in done:
            continue
        windows = 1 if label.startswith("cast-precision") else None  # every tensor is exposed while calibrating: one window
        if args.spread_only and label in previous:
            row = previous[label]
            row["spread_draws"] = row.get("spread_draws", {"none": row["spread"]} if "spread" in row else {})
        else:
            row = {"model": "SmolLM2", "variant": label, "steps": [s if isinstance(s, str) else s["name"] for s in steps]}
            for kind, base in graphs.items():
                samples = list(lm_feeds(calib_windows, base))[:windows]
                start = time.perf_counter()
                model, _ = bitfold.optimize(bitfold.clone(base), steps, CalibrationData(samples)) if steps else (base, None)
                row[kind] = {"ppl": perplexity(model, scored)[0], "optimize_s": round(time.perf_counter() - start, 1)}
            a, b = (row[k]["ppl"] for k in graphs)
            row["rel_diff"] = abs(a - b) / a
            row["spread_draws"] = {}
        a = row[FIXED]["ppl"]
        if row["rel_diff"] > TOLERANCE:
            for level in REORDERINGS:
                if level not in row["spread_draws"]:
                    row["spread_draws"][level] = abs(_reordered(graphs[FIXED], steps, calib_windows, windows, scored, level) - a) / a
            for seed in range(1, args.ulp_draws + 1):
                if f"ulp-{seed}" not in row["spread_draws"]:
                    moved = _one_ulp(graphs[FIXED], seed)
                    row["spread_draws"][f"ulp-{seed}"] = abs(_reordered(moved, steps, calib_windows, windows, scored, "all") - a) / a
            row["spread"] = max(row["spread_draws"].values())
        else:
            row.pop("spread_draws", None)
        row["verdict"] = ("agree" if row["rel_diff"] <= TOLERANCE else
                          "within reordering noise" if row["rel_diff"] <= 2 * row["spread"] else "differ")  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        _write(rows, stamp, merge=bool(args.only or args.skip_done or args.spread_only))  # after every row: a long run that stops keeps what it measured


def _reordered(base, steps: list, calib_windows, windows: int | None, scored, level: str) -> float:
    """The recipe's perplexity on ``base`` with ORT's graph optimizations at ``level`` while calibrating and evaluating."""
    previous = os.environ.get("BITFOLD_ORT_OPTIMIZATION")
    os.environ["BITFOLD_ORT_OPTIMIZATION"] = level
    try:
        model, _ = bitfold.optimize(bitfold.clone(base), steps, CalibrationData(list(lm_feeds(calib_windows, base))[:windows]))
        return perplexity(model, scored)[0]
    finally:
        if previous is None:
            del os.environ["BITFOLD_ORT_OPTIMIZATION"]
        else:
            os.environ["BITFOLD_ORT_OPTIMIZATION"] = previous


def _one_ulp(base, seed: int):
    """A copy of ``base`` whose float32 weight matrices (two or more dimensions: the linears and the embedding) each
    moved one ulp up or down per element (seeded). Scalars and vectors stay: exponents, epsilons and masking
    sentinels are not weights (a ``Pow`` exponent one ulp off 2 turns negative bases into NaN)."""
    import numpy as np
    import onnx_ir as ir

    model = bitfold.clone(base)
    rng = np.random.default_rng(seed)
    for value in model.graph.initializers.values():
        if value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT or len(value.const_value.shape) < 2:
            continue
        array = value.const_value.numpy()
        toward = np.where(rng.random(array.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
        value.const_value = ir.tensor(np.nextafter(array, toward), name=value.name)
    return model


def _write(rows: list[dict], stamp: dict, merge: bool) -> None:
    path = RESULTS / "llm_passes.json"
    if merge and path.exists():
        rows = merge_rows(json.loads(path.read_text())["rows"], rows, order=[label for label, _ in RECIPES])
    result = {
        **stamp,
        "model": "SmolLM2-135M-Instruct (weights from a Q4_1 GGUF: 32-element blocks with offset)",
        "protocol": f"Lee corpus, windows {EVAL.start}-{EVAL.stop - 1} of 512 tokens scored; calibration windows "
        f"{CALIB.start}-{CALIB.stop - 1}; lm_head fp32",
        "rows": rows,
    }
    write_atomic(path, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
