"""Write every benchmark table of the docs from benchmarks/results/*.json.

    python benchmarks/docs_tables.py            # rewrite the generated blocks of docs/*.md in place
    python benchmarks/docs_tables.py --check    # exit 1, naming the pages, when a block differs from the results
    python benchmarks/docs_tables.py NAME       # print one table

A generated block is the text between ``<!-- table: NAME -->`` and ``<!-- /table: NAME -->`` in a docs page; NAME
is a key of ``TABLES``. Each table ends with a stamp naming its results file, the command that wrote it, and the
commit and machine the file records ("not recorded" where it records none). The measuring scripts are never run.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import kernels_table
import llm_tables

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"

#: results file → the script that writes it (checked against the scripts' source by tests/test_docs.py).
WRITERS = {
    "allocate_formats_minilm.json": "allocate_formats_minilm.py",
    "allocate_smollm2.json": "allocate_smollm2.py",
    "canonical_efficientnet_lite0.json": "canonical_efficientnet.py",
    "cast_bf16.json": "cast_bf16.py",
    "debug_minilm/report.json": "debug_minilm.py",
    "exclude_effnet.json": "exclude_effnet.py",
    "fuzz.json": "fuzz.py",
    "hawq_smollm2.json": "hawq_smollm2.py",
    "kernels.json": "kernel_speed.py",
    "llm_decode.json": "llm_decode.py",
    "llm_export.json": "llm_export.py",
    "llm_passes.json": "llm_passes.py",
    "llm_profile.json": "llm_profile.py",
    "multless.json": "multless_table.py",
    "quant_effnet.json": "quant_effnet.py",
    "quant_minilm.json": "quant_minilm.py",
    "quant_smollm2.json": "quant_table.py",
    "lowbit_smollm2.json": "lowbit_smollm2.py",
    "lowbit_smollm2_large.json": "lowbit_smollm2.py",
    "lowbit_minilm.json": "lowbit_minilm.py",
    "scale.json": "scale.py",
    "scale_passes.json": "scale.py",
    "scale_ray.json": "scale.py",
    "sparse.json": "sparse_table.py",
    "transforms.json": "transforms_table.py",
    "transforms_layers.json": "transforms_layers.py",
    "tvm_node_suite.json": "tvm_node_suite.py",
}
#: the shards of a fuzz campaign, merged into fuzz.json
WRITERS.update({f"fuzz/{p.name}": "fuzz.py" for p in sorted((RESULTS / "fuzz").glob("*.json"))})

#: script → the docs section that shows its results (page#anchor, title).
SECTIONS = {
    "allocate_formats_minilm.py": ("measured.md#mixed-precision-bit-allocation", "Mixed-precision bit allocation"),
    "allocate_smollm2.py": ("measured.md#mixed-precision-bit-allocation", "Mixed-precision bit allocation"),
    "canonical_efficientnet.py": ("measured.md#canonical-cleanup", "Canonical cleanup"),
    "cast_bf16.py": ("measured.md#float16-and-bfloat16", "Float16 and bfloat16"),
    "debug_minilm.py": ("debugging.md", "Debugging a recipe"),
    "exclude_effnet.py": ("measured.md#int4-weights-on-a-cnn-and-the-exclusion-loop", "Int4 weights on a CNN"),
    "fuzz.py": ("measured.md#fuzzing", "Fuzzing"),
    "hawq_smollm2.py": ("measured.md#mixed-precision-bit-allocation", "Mixed-precision bit allocation"),
    "kernel_speed.py": ("measured.md#kernels-and-the-tvm-backend", "Kernels and the TVM backend"),
    "llm_decode.py": ("measured.md#language-models", "Language models"),
    "llm_export.py": ("measured.md#language-models", "Language models"),
    "llm_passes.py": ("measured.md#language-models", "Language models"),
    "llm_profile.py": ("measured.md#language-models", "Language models"),
    "multless_table.py": ("measured.md#multiplication-less-matmuls", "Multiplication-less MatMuls"),
    "quant_effnet.py": ("measured.md#efficientnet-lite0-w8a8", "EfficientNet-Lite0 W8A8"),
    "quant_minilm.py": ("measured.md#minilm", "MiniLM"),
    "quant_table.py": ("measured.md#smollm2", "SmolLM2"),
    "lowbit_smollm2.py": ("measured.md#low-bit-weight-solvers", "Low-bit weight solvers"),
    "lowbit_minilm.py": ("measured.md#low-bit-weight-solvers", "Low-bit weight solvers"),
    "scale.py": ("scale.md", "Scale: models larger than memory, sweeps on Ray"),
    "sparse_table.py": ("measured.md#sparsity", "Sparsity"),
    "transforms_layers.py": ("measured.md#equivalent-transforms", "Equivalent transforms"),
    "transforms_table.py": ("measured.md#equivalent-transforms", "Equivalent transforms"),
    "tvm_node_suite.py": ("measured.md#onnx-node-conformance-on-tvm", "ONNX node conformance on TVM"),
}

#: scripts that print docs tables from the results files (they measure nothing).
GENERATORS = {"docs_tables.py", "docs_pages.py", "kernels_table.py", "llm_tables.py"}

#: keys of a results file's ``machine`` record that describe the machine; its other string entries are versions.
MACHINE_KEYS = ("cpu", "processor", "platform", "gpu")

BLOCK = re.compile(r"<!-- table: (?P<name>[\w-]+) -->\n.*?<!-- /table: (?P=name) -->", re.S)


@cache
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def stamp(*names: str) -> str:
    """One line per results file: the file, the command that wrote it, commit, machine and recorded versions."""
    lines = []
    for name in names:
        r = load(name)
        command = f"`{r['command']}`" if r.get("command") else f"`python benchmarks/{WRITERS[name]}` (arguments not recorded)"
        commit = f"commit {r['commit']}" if r.get("commit") else "commit not recorded"
        machine = _machine(r)
        versions = _versions(r)
        extra = f"; {versions}" if versions else ""
        lines.append(f"*Source: `benchmarks/results/{name}`, written by {command}; {commit}; {machine}{extra}.*")
    return "\n\n".join(lines)


def _machine(r: dict) -> str:
    m = r.get("machine")
    if isinstance(m, str):
        return f"machine {m}"
    if not isinstance(m, dict):
        return "machine not recorded"
    parts = [str(m[k]) for k in MACHINE_KEYS if m.get(k)]
    for key, label in (("cores", "cores"), ("cpus", "CPUs")):
        if key in m:
            parts.append(f"{m[key]} {label}")
    if "copy_gbps" in m:
        parts.append(f"copy bandwidth {m['copy_gbps']:.1f} GB/s")
    return "machine " + ", ".join(parts) if parts else "machine not recorded"


def _versions(r: dict) -> str:
    found = dict(r.get("versions") or {})
    if isinstance(r.get("machine"), dict):
        found.update({k: v for k, v in r["machine"].items() if isinstance(v, str) and k not in MACHINE_KEYS})
    for key in ("onnxruntime", "onnx"):
        if isinstance(r.get(key), str):
            found.setdefault(key, r[key])
    return ", ".join(f"{k} {v}" for k, v in found.items())


def _ppl(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _cos(v: float | None) -> str:
    if v is None:
        return "-"
    for digits in range(4, 8):
        if round(v, digits) < 1:
            return f"{v:.{digits}f}"
    return "1.0000"


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.0f}" if n >= 1e8 else f"{n / 1e6:.3g}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f} %"


def _kl(v: float | None) -> str:
    return "-" if v is None else f"{v:.2g}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _by_model(rows: list[dict], models: list[str]) -> list[tuple[str, dict[str, dict]]]:
    """Rows keyed by variant, in first-seen order, each with the row of every model that measured it."""
    joined: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["model"] in models:
            joined.setdefault(row["variant"], {})[row["model"]] = row
    return list(joined.items())


def canonical_efficientnet() -> str:
    r = load("canonical_efficientnet_lite0.json")
    names = {"raw": "raw export (`optimize=False`)", "exporter": "exporter's own optimizer (`optimize=True`)",
             "bitfold": "raw + bitfold canonical recipe"}  # fmt: skip
    rows = [[names.get(k, k), g["nodes"], g["ops"].get("BatchNormalization", 0), f"{g['latency_ms']['p50']:.2f}",
             f"{g['latency_ms']['ratio']:.2f}"] for k, g in r["graphs"].items()]  # fmt: skip
    passes = [[p["name"], f"{p['seconds'] * 1e3:.0f}", ", ".join(f"{op} {n}" for op, n in p["ops_removed"].items())]
              for p in r["passes"]]  # fmt: skip
    return "\n\n".join([
        f"{r['model']}:", _table(["graph", "nodes", "BatchNormalization", "ORT p50 ms", "p50 vs raw"], rows),
        f"Max relative error of the bitfold graph against the raw export: {r['max_rel_err']:.1e}.",
        _table(["pass", "ms", "ops removed"], passes), stamp("canonical_efficientnet_lite0.json")])  # fmt: skip


def quant_smollm2() -> str:
    r = load("quant_smollm2.json")
    rows = [[row["variant"], row["tool"], row.get("format", "-"), _ppl(row["ppl"]), _mb(row["bytes"]),
             row.get("casts", "-")] for row in r["rows"]]  # fmt: skip
    latency = [[k, f"{v['p50']:.0f}", f"{v['ratio']:.3f}"] for k, v in r.get("latency_ms_seq512", {}).items()]
    parts = [f"{r['model']}; {r['protocol']}.", _table(["variant", "tool", "format", "perplexity", "parameter MB", "Casts"], rows)]
    if latency:
        parts += ["ONNX Runtime latency of one 512-token forward pass (MatMulNBits at accuracy level 4):",
                  _table(["model", "p50 ms", "p50 vs fp32"], latency)]  # fmt: skip
    if "bitfold_vs_ort_matmulnbits" in r:
        parts.append(f"bitfold's W4 g128 model / ORT quantizer's, p50: {r['bitfold_vs_ort_matmulnbits']:.3f}.")
    return "\n\n".join([*parts, stamp("quant_smollm2.json")])


def lowbit_minilm() -> str:
    if not (RESULTS / "lowbit_minilm.json").exists():
        return "(no results yet: `python benchmarks/lowbit_minilm.py` writes `benchmarks/results/lowbit_minilm.json`)"
    r = load("lowbit_minilm.json")
    rows = [[row["variant"], f"{row['cosine']:.4f}", f"{row['min_cosine']:.4f}", f"{row['cosine_background']:.4f}",
             f"{row['min_cosine_background']:.4f}", f"{row['cosine_validation']:.4f}" if "cosine_validation" in row else "-",
             f"{row['optimize_s']:.0f}"] for row in r["rows"]]  # fmt: skip
    head = ["variant", "mean cosine, Lee test", "min cosine, Lee test", "mean cosine, Lee background", "min cosine, Lee background",
            "mean cosine, validation (Wikipedia)", "optimize s"]  # fmt: skip
    older = sorted({row["commit"] for row in r["rows"] if row.get("commit") not in (None, r["commit"])})
    kept = [f"*Rows measured at an earlier commit and kept (`--rows`): commit {', '.join(older)}.*"] if older else []
    return "\n\n".join([f"{r['model']}; {r['protocol']}.", _table(head, rows), stamp("lowbit_minilm.json"), *kept])


def lowbit_smollm2(name: str = "lowbit_smollm2.json") -> str:
    if not (RESULTS / name).exists():
        flag = " --calibration large" if name == "lowbit_smollm2_large.json" else ""
        return f"(no results yet: `python benchmarks/lowbit_smollm2.py{flag}` writes `benchmarks/results/{name}`)"
    r = load(name)
    rows = [[row["variant"], _ppl(row["ppl"]), _ppl(row["ppl_heldout"]), _gap_closed(row, r["rows"]),
             str(row["end_to_end"]["steps"]) if "end_to_end" in row else "-",
             f"{row['optimize_s']:.0f}" if "optimize_s" in row else "-", _phase_seconds(row.get("seconds", {}))]
            for row in r["rows"]]  # fmt: skip
    head = ["variant", "perplexity, Lee 0-15", "perplexity, held-out Lee test", "RTN's gap to FP32 closed, Lee / held out",
            "end-to-end steps", "optimize s", "s per block / per end-to-end step"]  # fmt: skip
    others = [row for row in r["rows"] if row.get("command") != r["command"] and row["variant"] != "FP32"]
    kept = ([f"*{len(others)} rows come from earlier runs of the script with other arguments, on the machines their own records "
             "name where they record one (optimize s compares runs on the same machine only).*"] if others else [])  # fmt: skip
    return "\n\n".join([f"{r['model']}; {r['protocol']}.", _table(head, rows), stamp(name), *kept])


def _gap_closed(row: dict, rows: list[dict]) -> str:
    """How much of the RTN row's perplexity gap to FP32 an integer-grid row closes on each corpus (same bits, same
    grid): 100 % is the float model's perplexity, 0 % RTN's; '-' without an RTN row to compare with."""
    grid = re.search(r" (W\d+ g128(?: asym)?)$", row["variant"])
    rtn = next((r for r in rows if grid and r["variant"] == f"RTN {grid[1]}"), None)
    fp32 = next((r for r in rows if r["variant"] == "FP32"), None)
    if rtn is None or fp32 is None or row is rtn:
        return "-"
    closed = [(rtn[k] - row[k]) / (rtn[k] - fp32[k]) for k in ("ppl", "ppl_heldout")]
    return " / ".join(f"{100 * c:.0f} %" for c in closed)


def _phase_seconds(seconds: dict) -> str:
    """reconstruct's time per block and per end-to-end step, where the row recorded them."""
    if "per_block" not in seconds:
        return "-"
    return f"{seconds['per_block']:.1f} / {seconds['per_step']:.2f}" if "per_step" in seconds else f"{seconds['per_block']:.1f}"


def quant_minilm() -> str:
    r = load("quant_minilm.json")
    rows = [[row["variant"], row["tool"], _cos(row["cosine"]), _cos(row["min_cosine"]), _mb(row["bytes"])] for row in r["rows"]]
    return "\n\n".join([f"{r['model']}:", _table(["variant", "tool", "mean cosine", "min cosine", "parameter MB"], rows),
                        stamp("quant_minilm.json")])  # fmt: skip


def quant_effnet() -> str:
    r = load("quant_effnet.json")
    rows = []
    for row in r["rows"]:
        latency = row.get("latency_ms")
        kept = row.get("layers_kept_float")
        rows.append([row["variant"], _pct(row["agreement"]), _kl(row.get("mean_kl")), _mb(row.get("bytes")),
                     f"{latency['ratio']:.2f}" if latency else "-",
                     f"{len(kept)} of {r['conv_layers']}" if kept else "-"])  # fmt: skip
    head = ["variant", "top-1 agreement", "mean KL", "parameter MB", "ORT p50 vs fp32", "Convs kept float"]
    return "\n\n".join([f"{r['model']}:", _table(head, rows), stamp("quant_effnet.json")])


def exclude_effnet() -> str:
    r = load("exclude_effnet.json")
    rows = []
    for row in r["rows"]:
        kept = row.get("layers_kept_float")
        rows.append([row["variant"], _pct(row["agreement"]), _kl(row["mean_kl"]), _pct(row["agreement_validation"]) if "agreement_validation" in row else "-",
                     f"{row['logit_error_calibration']:.3f}", f"{len(kept)} of {r['conv_layers']}" if kept else "-", _mb(row["bytes"]),
                     f"{row['seconds']:.0f}" if row["seconds"] else "-"])  # fmt: skip
    head = ["variant", "top-1 agreement", "mean KL", "agreement (validation photo)", "logit error (calibration)", "Convs kept float", "parameter MB", "optimize s"]
    older = sorted({row["commit"] for row in r["rows"] if row.get("commit") not in (None, r["commit"])})
    kept = [f"*Rows measured at an earlier commit and kept (`--keep-loop`): the exclusion loop's, commit {', '.join(older)}.*"] if older else []
    return "\n\n".join([f"{r['model']}:", _table(head, rows), stamp("exclude_effnet.json"), *kept])


def cast_bf16() -> str:
    rows = [[row["task"], row["variant"], f"{row['value']:.4f}" if row["value"] > 2 else _cos(row["value"]),
             row.get("fp32_islands", "-"), f"{row['seconds']:.0f}" if "seconds" in row else "-"]
            for row in load("cast_bf16.json")["rows"]]  # fmt: skip
    return "\n\n".join([_table(["task", "variant", "value", "nodes kept fp32", "pass s"], rows), stamp("cast_bf16.json")])


def transforms() -> str:
    r = load("transforms.json")
    smol, mini = "SmolLM2 perplexity", "MiniLM cosine"
    rows = [[variant, _ppl(m[smol]["value"]) if smol in m else "not run", _cos(m[mini]["value"]) if mini in m else "not run"]
            for variant, m in _by_model(r["rows"], [smol, mini])]  # fmt: skip
    first = [row for row in rows if row[0] in ("FP32", "fold-norm-affine + rotate (fp32)")]
    rows = first + [row for row in rows if row not in first]
    parts = [_table(["variant", smol, mini], rows)]
    spread = r.get("max_over_mean_abs", {})
    if spread:
        summary = [[model, basis, len(v), f"{statistics.median(v):.1f}"] for model, bases in spread.items() for basis, v in bases.items()]
        parts += ["Linear inputs' max|x| / mean|x| (median over the linear inputs):",
                  _table(["model", "basis", "linear inputs", "median max\\|x\\|/mean\\|x\\|"], summary)]  # fmt: skip
    return "\n\n".join([*parts, stamp("transforms.json")])


def transforms_layers() -> str:
    r = load("transforms_layers.json")
    variants = list(r["by_kind"])
    kinds = sorted({k for v in r["by_kind"].values() for k in v})
    rows = [[kind, *(f"{r['by_kind'][v][kind]:.2f}" for v in variants)] for kind in kinds]
    weights = [[basis, f"{e['readers']:.3f}", f"{e['writers']:.3f}"] for basis, e in r.get("weight_rtn4_error", {}).items()]
    parts = ["Mean relative output error per linear kind, against the rotated fp32 model:",
             _table(["linear", *variants], rows)]  # fmt: skip
    if weights:
        parts += ["Mean relative RTN W4 weight error of the residual stream's readers and writers:",
                  _table(["basis", "readers", "writers"], weights)]  # fmt: skip
    return "\n\n".join([*parts, stamp("transforms_layers.json")])


def multless() -> str:
    r = load("multless.json")
    smol, mini, eff = "SmolLM2 perplexity", "MiniLM cosine", "EfficientNet-Lite0 top-1 agreement"
    rows = []
    for variant, m in _by_model(r["rows"], [smol, mini]):
        s, n = m.get(smol), m.get(mini)
        rows.append([variant, f"{s['bits']:.3g}" if s else "-", _ppl(s["value"]) if s else "not run",
                     f"{n['bits']:.3g}" if n else "-", _cos(n["value"]) if n else "not run"])  # fmt: skip
    cnn = [[row["variant"], f"{row['bits']:.3g}", _pct(row["value"])] for row in r["rows"] if row["model"] == eff]
    parts = [f"{r['protocol']}.", _table(["variant", "SmolLM2 bits/weight", smol, "MiniLM bits/weight", mini], rows)]
    if cnn:
        parts += ["EfficientNet-Lite0 (BN folded, stem and classifier fp32):", _table(["variant", "bits/weight", "top-1 agreement"], cnn)]
    return "\n\n".join([*parts, stamp("multless.json")])


def sparse() -> str:
    r = load("sparse.json")
    smol, mini = "SmolLM2 perplexity", "MiniLM cosine"
    rows = []
    for variant, m in _by_model(r["rows"], [smol, mini]):
        s, n = m.get(smol), m.get(mini)
        rows.append([variant, _ppl(s["value"]) if s else "not run", f"{s['seconds']:.0f}" if s and "seconds" in s else "-",
                     _cos(n["value"]) if n else "not run"])  # fmt: skip
    return "\n\n".join([_table(["variant", smol, "SmolLM2 pass s", mini], rows), stamp("sparse.json")])


SCALE_STEPS = ("synth-llm", "optimize rtn w4 streamed", "optimize gptq w4 streamed", "optimize rtn w4 in memory")


def scale() -> str:
    if not (RESULTS / "scale.json").exists():
        return "(no results yet: `python benchmarks/scale.py` writes `benchmarks/results/scale.json`)"
    import numpy as np

    r = load("scale.json")
    rows = sorted(r["rows"], key=lambda row: (row["shape"] != "smollm2-135m", row["params"], SCALE_STEPS.index(row["step"])))
    table = []
    for row in rows:
        phases = row.get("phases_s")
        split = f"{phases['grams']:.0f} / {phases['solves']:.0f} / {phases['forward']:.0f}" if phases else "-"
        table.append([row["shape"], str(row["layers"]), f"{row['params'] / 1e9:.3f} B", row["step"], f"{row['wall_s']:.1f}",
                      f"{row['peak_rss_gb']:.2f}", f"{row['written_gb']:.2f}", split, row.get("commit", "-")])  # fmt: skip
    head = ["shape", "layers", "parameters", "step", "wall s", "peak memory GB", "written GB", "GPTQ s: Gram / solves / forward", "commit"]
    fits = []
    for shape, what_shape in (("tinyllama-1.1b", "TinyLlama's"), ("llama2-7b", "Llama-2-7B's")):
        for step in SCALE_STEPS[1:]:
            sweep = sorted((row for row in r["rows"] if row["step"] == step and row["shape"] == shape), key=lambda row: row["layers"])
            if len(sweep) < 2:
                continue
            peak = _log_slope(sweep, "layers", "peak_rss_gb")
            layers, wall = np.array([row["layers"] for row in sweep]), np.array([row["wall_s"] for row in sweep])
            per_layer, fixed = np.polyfit(layers, wall, 1)
            text = (f"{step} at {what_shape} block shape ({', '.join(map(str, layers))} layers): peak memory log-log slope "
                    f"{peak:.2f} in layers; time {fixed:.1f} s + {per_layer:.2f} s per layer")
            if len(sweep) > 2:
                text += f" (within {float(np.max(np.abs(fixed + per_layer * layers - wall) / wall)):.0%} of every point; log-log slope {_log_slope(sweep, 'layers', 'wall_s'):.2f})"
            full = next((row for row in r["rows"] if row["shape"] == shape and row["step"] == step and row.get("full_depth")), None)
            if full is None and shape == "llama2-7b" and "streamed" in step:
                text += f", so about {(fixed + per_layer * 32) / 3600:.1f} h at its 32 layers (computed from the line, not measured)"
            fits.append(text)
    text = [f"{r['protocol']}.", _table(head, table)]
    if fits:
        text.append("Fits: " + "; ".join(fits) + ".")
    return "\n\n".join([*text, stamp("scale.json")])


def scale_ray() -> str:
    if not (RESULTS / "scale_ray.json").exists():
        return "(no results yet: `python benchmarks/scale.py --allocate` writes `benchmarks/results/scale_ray.json`)"
    r = load("scale_ray.json")
    variants = list(r["median_wall_s"])
    table = []
    for v in variants:
        runs = [row for row in r["rows"] if row["variant"] == v]
        peak = [row["peak_rss_gb"] for row in runs if "peak_rss_gb" in row]
        table.append([v, str(len(runs)), f"{r['median_wall_s'][v]:.1f}", ", ".join(f"{row['wall_s']:.1f}" for row in runs),
                      f"{max(peak):.2f}" if peak else "-"])  # fmt: skip
    same = "the same recipe and sensitivities in every run" if r["identical_recipe_and_sensitivities"] else "**different results** between runs"
    return "\n\n".join([f"{r['protocol']}.", _table(["variant", "runs", "median wall s", "each run, s", "driver peak GB"], table),
                        f"Ray over serial: {r['ray_over_serial']:.2f}x the serial median; {same}.", stamp("scale_ray.json")])  # fmt: skip


#: Llama-2-70B's decoder block, against which the 7B shape's measured per-block costs are scaled
LLAMA_70B = {"layers": 80, "hidden": 8192, "ffn": 28672, "kv": 1024}
LLAMA_7B = {"layers": 32, "hidden": 4096, "ffn": 11008, "kv": 4096}


def _block_weights(shape: dict) -> list[tuple[int, int]]:
    """(N outputs, K inputs) of the seven linears of a Llama block."""
    h, f, kv = shape["hidden"], shape["ffn"], shape["kv"]
    return [(h, h), (kv, h), (kv, h), (h, h), (f, h), (f, h), (h, f)]


def scale_70b() -> str:
    """Sequential GPTQ of a 70B model, computed from the 7B shape's measured per-block phases: Gram matrices and the
    quantized forward scale with the block's parameters, each weight's solve with N·K² + K³ (the loop and the
    Cholesky factorizations); blocks stay in order, a block's seven solves spread over the workers."""
    if not (RESULTS / "scale.json").exists():
        return "(no results yet: `python benchmarks/scale.py` writes `benchmarks/results/scale.json`)"
    import numpy as np

    r = load("scale.json")
    sweep = sorted((row for row in r["rows"] if row["shape"] == "llama2-7b" and row["step"] == "optimize gptq w4 streamed" and "phases_s" in row),
                   key=lambda row: row["layers"])  # fmt: skip
    if len(sweep) < 2:
        return "(needs the 7B-shape GPTQ depth sweep: `python benchmarks/scale.py --big-layers 2 4`)"
    layers = np.array([row["layers"] for row in sweep])
    per_block = {k: float(np.polyfit(layers, [row["phases_s"][k] for row in sweep], 1)[0]) for k in ("grams", "solves", "forward")}
    params = lambda shape: sum(n * k for n, k in _block_weights(shape))  # noqa: E731
    solve_cost = lambda n, k: n * k * k + k**3  # noqa: E731
    ratio = params(LLAMA_70B) / params(LLAMA_7B)
    unit = per_block["solves"] / sum(solve_cost(n, k) for n, k in _block_weights(LLAMA_7B))  # seconds per unit of N·K² + K³
    solves = sorted((unit * solve_cost(n, k) for n, k in _block_weights(LLAMA_70B)), reverse=True)
    serial = (per_block["grams"] + per_block["forward"]) * ratio
    moved = sum(4 * n * k + 8 * k * k for n, k in _block_weights(LLAMA_70B)) / 1e9  # fp32 weight + fp64 Gram per solve
    rows = []
    for workers in (1, 2, 4, 7):
        loads = [0.0] * workers
        for t in solves:  # longest first onto the least loaded worker
            loads[loads.index(min(loads))] += t
        block = serial + max(loads)
        rows.append([str(workers), f"{serial:.0f}", f"{max(loads):.0f}", f"{block:.0f}", f"{block * LLAMA_70B['layers'] / 3600:.1f}",
                     f"{moved:.1f}" if workers > 1 else "0"])  # fmt: skip
    head = ["workers", "Gram + forward s per block", "solves s per block", "block s", "80 blocks, h", "GB sent per block"]
    note = (f"Computed, not measured: the 7B shape's per-block phases ({per_block['grams']:.1f} s Gram matrices, "
            f"{per_block['solves']:.1f} s solves, {per_block['forward']:.1f} s quantized forward; slopes of the depth sweep) "
            f"scaled to a 70B block ({ratio:.2f}x the parameters; solves by N·K² + K³ per weight). The largest Gram matrix "
            f"(down_proj, K = {LLAMA_70B['ffn']:,}) is {8 * LLAMA_70B['ffn'] ** 2 / 1e9:.1f} GB in float64: solved in the "
            "process that built it, it is factored in its own memory; a Ray worker receives it read-only (from the "
            "object store) and factors a copy, so a worker needs twice that. One weight's solve is one work item, so "
            "beyond two workers the largest solve (down_proj) sets the block's time.")
    return "\n\n".join([note, _table(head, rows), stamp("scale.json")])


def scale_passes() -> str:
    if not (RESULTS / "scale_passes.json").exists():
        return "(no results yet: `python benchmarks/scale.py --nodes ...` writes `benchmarks/results/scale_passes.json`)"
    r = load("scale_passes.json")
    passes = list(dict.fromkeys(row["pass"] for row in r["rows"]))
    sizes = sorted({row["nodes"] for row in r["rows"]})
    seconds = {(row["pass"], row["nodes"]): row["seconds"] for row in r["rows"]}
    table = [[name, *(f"{seconds[name, n]:.3f}" for n in sizes),
              f"{_log_slope([row for row in r['rows'] if row['pass'] == name], 'nodes', 'seconds'):.2f}"] for name in passes]  # fmt: skip
    head = ["pass", *(f"{n:,} nodes, s" for n in sizes), "log-log slope"]
    return "\n\n".join([f"{r['protocol']}.", _table(head, table), stamp("scale_passes.json")])


def _log_slope(rows: list[dict], x: str, y: str) -> float | None:
    import numpy as np

    if len({row[x] for row in rows}) < 2:
        return None
    return float(np.polyfit(np.log([row[x] for row in rows]), np.log([row[y] for row in rows]), 1)[0])


def _layers(counts: dict | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) if counts else "-"


def allocate_smollm2() -> str:
    r = load("allocate_smollm2.json")
    rows = [[row["variant"], f"{row['bits']:.2f}", _ppl(row["ppl"]), _layers(row.get("layers_per_format"))] for row in r["rows"]]
    return "\n\n".join([f"{r['model']}; {r['protocol']}.", _table(["variant", "bits/weight", "perplexity", "layers per format"], rows),
                        stamp("allocate_smollm2.json")])  # fmt: skip


def hawq_smollm2() -> str:
    r = load("hawq_smollm2.json")
    rows = [[row["variant"], f"{row['bits']:.2f}", _ppl(row["ppl"]), _layers(row.get("layers_per_format"))] for row in r["rows"]]
    return "\n\n".join([_table(["variant", "bits/weight", "perplexity", "layers per format"], rows),
                        f"Sensitivities (Hessian traces) computed in {r['sensitivity_seconds']:.1f} s.", stamp("hawq_smollm2.json")])  # fmt: skip


def allocate_formats_minilm() -> str:
    r = load("allocate_formats_minilm.json")
    rows = [[row["variant"], f"{row['bits']:.3f}", _cos(row["cosine"]), _layers(row.get("layers_per_format"))] for row in r["rows"]]
    return "\n\n".join([f"{r['model']}; {r['protocol']}.", _table(["variant", "bits/weight", "cosine", "layers per format"], rows),
                        stamp("allocate_formats_minilm.json")])  # fmt: skip


def kernels() -> str:
    return "\n\n".join([kernels_table.tables(), stamp("kernels.json")])


def llm_export() -> str:
    return "\n\n".join([llm_tables.export_table(), stamp("llm_export.json")])


def llm_passes() -> str:
    return "\n\n".join([llm_tables.passes_table(), stamp("llm_passes.json")])


def llm_decode() -> str:
    return "\n\n".join([llm_tables.decode_table(), stamp("llm_decode.json")])


def llm_profile() -> str:
    if not (RESULTS / "llm_profile.json").exists():
        return "(no results yet: `python benchmarks/llm_profile.py` writes `benchmarks/results/llm_profile.json`)"
    r = load("llm_profile.json")
    d, p = r["decode"], r["prefill"]
    ops = list(d["kernel_ms_by_op"])
    rows = [[op, f"{d['kernel_ms_by_op'][op]:.3f}", f"{100 * d['kernel_ms_by_op'][op] / d['kernel_ms']:.1f}",
             f"{p['kernel_ms_by_op'].get(op, 0.0):.1f}"] for op in ops]  # fmt: skip
    rows.append(["all kernels", f"{d['kernel_ms']:.3f}", "100.0", f"{sum(p['kernel_ms_by_op'].values()):.1f}"])
    rows.append(["ORT run (kernels + session)", f"{d['model_run_ms']:.3f}", "-", f"{p['model_run_ms']:.1f}"])
    rows.append(["Python call (binding, run, logits)", f"{d['python_wall_ms_median']:.3f}", "-", f"{p['python_wall_ms']:.1f}"])
    table = _table(["op type", "decode ms per token", "share of decode kernels %", "prefill ms"], rows)
    read = r["read_per_decode_step"]
    floor = (f"A decode step reads {read['matmulnbits_mb']:.1f} MB of MatMulNBits weights and scales, "
             f"{read['other_constants_mb'] + read.get('gathered_rows_mb', 0.0):.2f} MB of other constants and embedding rows, and "
             f"{read['kv_cache_mb']:.1f} MB of KV cache (at mid-generation)")  # fmt: skip
    if "read_gbps" in read:
        floor += (f"; at the read bandwidth measured in the same run ({read['read_gbps']:.1f} GB/s, a 256 MiB sum on the same threads) "
                  f"that alone takes {read['floor_ms']:.2f} ms")  # fmt: skip
    elif "floor_ms" in read:
        floor += f"; at the measured copy bandwidth ({read['copy_gbps']:.1f} GB/s) that alone takes {read['floor_ms']:.2f} ms"
    return "\n\n".join([f"{r['model']}; {r['protocol']}:", table, floor + ".", stamp("llm_profile.json")])


def tvm_node_suite() -> str:
    r = load("tvm_node_suite.json")
    counts = _table(["outcome", "cases"], [[k, v] for k, v in r["counts"].items()])
    reasons = _table(["reason (most frequent 10)", "cases"], [[x["reason"], x["cases"]] for x in r["reasons"][:10]])
    return "\n\n".join([f"{r['cases']} node tests of ONNX {r['onnx']}:", counts, reasons, stamp("tvm_node_suite.json")])


def fuzz() -> str:
    if not (RESULTS / "fuzz.json").exists():
        return "(no results yet: `python benchmarks/fuzz.py` writes `benchmarks/results/fuzz.json`)"
    r = load("fuzz.json")
    exact = set(r.get("exact_cases", []))
    rows = [[f"`{case}`", "exact" if case in exact else "lossy", n, r["crashes"].get(case, 0), r["mismatches"].get(case, 0),
             r["contract_violations"].get(case, 0), r.get("declines", {}).get(case, 0)]
            for case, n in r["cases_per_pass"].items()]  # fmt: skip
    head = ["case", "kind", "checks", "crashes", "mismatches", "contract violations", "declines"]
    shards = r.get("shards") or [{"start": r.get("start", 0), "graphs": r["graphs"], "commit": r.get("commit"), "seconds": r["seconds"]}]
    shard_rows = [[f"{s['start']}-{s['start'] + s['graphs'] - 1}", s["graphs"], (s.get("commit") or "-")[:12], f"{s['seconds']['total']:.0f}"] for s in shards]
    failures = [[f"`{f['pass']}`", f["kind"], f["reason"]] for f in r["failures"]] or [["-", "none", "-"]]
    return "\n\n".join([f"{r['graphs']} random graphs (seed `{r.get('seed', '?')}`), {r.get('graphs_skipped', 0)} of them skipped "
                        "(ONNX Runtime refuses the generated graph itself):", _table(head, rows),
                        "Shards:", _table(["graphs", "count", "commit", "seconds"], shard_rows),
                        "Distinct failures (reproducers in the results file):", _table(["case", "kind", "reason"], failures),
                        stamp("fuzz.json")])  # fmt: skip


def scripts() -> str:
    """Every script under benchmarks/: what it writes, where the docs show it, and whether `make bench` runs it."""
    in_bench = make_bench_scripts()
    written = {script: [f for f, s in WRITERS.items() if s == script] for script in WRITERS.values()}
    rows = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        script = path.name
        if script in GENERATORS:
            rows.append([f"`{script}`", "prints docs tables (measures nothing)", "-", "-"])
            continue
        files = ", ".join(f"`{f}`" for f in written.get(script, [])) or "-"
        target, title = SECTIONS.get(script, ("", ""))
        link = f"[{title}]({target})" if target else "-"
        rows.append([f"`python benchmarks/{script}`", files, link, "yes" if script in in_bench else "no"])
    return _table(["script", "results file", "docs", "run by `make bench`"], rows)


def make_bench_scripts() -> set[str]:
    """The benchmark scripts the Makefile's `bench` target runs."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(r"^bench:.*?\n((?:\t.*\n?)*)", text, re.M)
    return set(re.findall(r"benchmarks/(\w+\.py)", match.group(1))) if match else set()


TABLES: dict[str, Callable[[], str]] = {
    "canonical-efficientnet": canonical_efficientnet,
    "quant-smollm2": quant_smollm2,
    "lowbit-smollm2": lowbit_smollm2,
    "lowbit-smollm2-large": lambda: lowbit_smollm2("lowbit_smollm2_large.json"),
    "lowbit-minilm": lowbit_minilm,
    "quant-minilm": quant_minilm,
    "quant-effnet": quant_effnet,
    "exclude-effnet": exclude_effnet,
    "cast-bf16": cast_bf16,
    "transforms": transforms,
    "transforms-layers": transforms_layers,
    "multless": multless,
    "sparse": sparse,
    "allocate-smollm2": allocate_smollm2,
    "hawq-smollm2": hawq_smollm2,
    "allocate-formats-minilm": allocate_formats_minilm,
    "kernels": kernels,
    "tvm-node-suite": tvm_node_suite,
    "fuzz": fuzz,
    "llm-export": llm_export,
    "llm-passes": llm_passes,
    "llm-decode": llm_decode,
    "llm-profile": llm_profile,
    "scale": scale,
    "scale-passes": scale_passes,
    "scale-ray": scale_ray,
    "scale-70b": scale_70b,
    "scripts": scripts,
}


def render(name: str) -> str:
    if name not in TABLES:
        raise KeyError(f"unknown docs table '{name}'; the tables are: {', '.join(TABLES)}")
    return TABLES[name]().strip()


def update(text: str) -> str:
    """``text`` with every generated block rewritten from the results files."""
    return BLOCK.sub(lambda m: f"<!-- table: {m['name']} -->\n{render(m['name'])}\n<!-- /table: {m['name']} -->", text)


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def main(argv: list[str]) -> int:
    if argv and not argv[0].startswith("-"):
        print(render(argv[0]))
        return 0
    stale = []
    for page in pages():
        text = page.read_text()
        fresh = update(text)
        if fresh != text:
            stale.append(page.relative_to(ROOT))
            if "--check" not in argv:
                page.write_text(fresh)
    if "--check" in argv and stale:
        print(f"stale generated tables in {', '.join(map(str, stale))}; run `python benchmarks/docs_tables.py`.")
        return 1
    for page in stale:
        print(f"rewrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
