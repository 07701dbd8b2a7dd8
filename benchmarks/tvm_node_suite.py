"""How much of ONNX's node conformance suite the TVM path imports and runs correctly.

Every model of ``onnx.backend.test`` (kind "node") goes through ``bitfold.compile(model, backend="tvm",
device="cpu")`` with the suite's own inputs; outputs are compared to the suite's expected outputs with the suite's
tolerance (rtol 1e-3, atol 1e-7, as ONNX's backend runner). Each case ends as ``ok``, ``mismatch``, ``skipped``
(inputs are sequences or optionals) or failed with a reason: the first line of the error, with node names and
numbers removed so that equal causes group together. Writes benchmarks/results/tvm_node_suite.json (counts, the
reasons by frequency and every case's status).

    python benchmarks/tvm_node_suite.py [--limit N]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx.backend.test.loader import load_model_tests

import bitfold
from bitfold.tools.bench import provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    line = next((t for t in reversed(text) if "Error" in t or "not supported" in t or "implemented" in t), text[0] if text else "")
    line = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", line)
    return f"{type(error).__name__}: {re.sub(r'[0-9]+', 'N', line)[:160]}"


def _same(got: np.ndarray, expected: np.ndarray) -> bool:
    got, expected = np.asarray(got), np.asarray(expected)
    if got.shape != expected.shape:
        return False
    if expected.dtype.kind in "fc":
        return bool(np.allclose(got, expected, rtol=1e-3, atol=1e-7, equal_nan=True))
    return bool(np.array_equal(got, expected))


def run_case(case) -> tuple[str, str]:
    model_proto = case.model
    data = case.data_sets[0] if case.data_sets else ([], [])
    inputs, outputs = data
    if not all(isinstance(a, np.ndarray) for a in [*inputs, *outputs]):
        return "skipped", "inputs or outputs are sequences or optionals"
    try:
        model = ir.from_proto(model_proto)
    except Exception as e:  # the IR cannot hold the model
        return "failed", _reason(e)
    names = [v.name for v in model.graph.inputs if v.const_value is None]
    if len(names) != len(inputs):
        return "skipped", "initializer inputs"
    feeds = dict(zip(names, inputs, strict=True))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = bitfold.compile(model, backend="tvm", device="cpu").run(feeds)
    except Exception as e:  # every failure is a finding of this report
        return "failed", _reason(e)
    results = list(got.values())
    if len(results) != len(outputs) or not all(_same(g, x) for g, x in zip(results, outputs, strict=True)):
        return "mismatch", "outputs differ beyond rtol 1e-3"
    return "ok", ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=0, help="only the first N cases (0: all)")
    args = parser.parse_args()
    stamp = provenance()
    cases = sorted(load_model_tests(kind="node"), key=lambda c: c.name)
    if args.limit:
        cases = cases[: args.limit]
    statuses: dict[str, dict] = {}
    for i, case in enumerate(cases):
        status, reason = run_case(case)
        statuses[case.name] = {"status": status, "reason": reason}
        if i % 100 == 0:
            print(f"{i}/{len(cases)} {case.name}: {status} {reason}", flush=True)
    counts = collections.Counter(s["status"] for s in statuses.values())
    reasons = collections.Counter(s["reason"] for s in statuses.values() if s["status"] in ("failed", "mismatch"))
    result = {
        **stamp,
        "onnx": onnx.__version__,
        "cases": len(cases),
        "counts": dict(counts),
        "reasons": [{"reason": r, "cases": c} for r, c in reasons.most_common()],
        "by_case": statuses,
    }
    RESULTS.mkdir(exist_ok=True)
    write_atomic(RESULTS / "tvm_node_suite.json", json.dumps(result, indent=2).encode())
    print(json.dumps({"counts": result["counts"], "top_reasons": result["reasons"][:15]}, indent=2))


if __name__ == "__main__":
    main()
