"""The docs tables of benchmarks/results/kernels.json (written by benchmarks/kernel_speed.py), as Markdown.

    python benchmarks/kernels_table.py      # print them; benchmarks/docs_tables.py writes them into docs/measured.md
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def tables() -> str:
    """The M = 1 and M = 16 kernel tables, the Hadamard table and, when measured, the SmolLM2 end-to-end table."""
    result = json.loads((RESULTS / "kernels.json").read_text())
    machine = result["machine"]
    rows = result["kernels"]
    roofline = max(r["read_gbps"] / r["roofline_fraction"] for r in rows if r["roofline_fraction"] > 0)
    lines = [f"Copy bandwidth {machine['copy_gbps']:.1f} GB/s, roofline (best read rate in the run) {roofline:.1f} GB/s, "
             f"{machine['cores']} cores.", ""]  # fmt: skip
    shapes = list(dict.fromkeys((r["k"], r["n"]) for r in rows))
    for m in (1, 16):
        lines += [f"M = {m}: speed-up over ORT fp32 MatMul (µs at {shapes[-1][0]}×{shapes[-1][1]}; roofline fraction there)", ""]
        lines.append("| kernel | " + " | ".join(f"{k}×{n}" for k, n in shapes) + " | µs | roofline |")
        lines.append("|---|" + "---|" * (len(shapes) + 2))
        for label in dict.fromkeys(r["kernel"] for r in rows if r["m"] == m):
            cells = {(r["k"], r["n"]): r for r in rows if r["m"] == m and r["kernel"] == label}
            big = cells[shapes[-1]]
            ratios = " | ".join(f"{cells[s]['speedup_vs_ort_fp32']:.2f}×" for s in shapes)
            lines.append(f"| {label} | {ratios} | {big['us']:.0f} | {big['roofline_fraction'] * 100:.0f} % |")
        lines.append("")
    lines += ["| Hadamard rows × n | µs | bound µs | ratio |", "|---|---|---|---|"]
    for h in result["hadamard"]:
        lines.append(f"| {h['m']} × {h['n']} | {h['us']:.1f} | {h['bound_us']:.1f} | {h['ratio_to_bound']:.1f}× |")
    if result.get("smollm2"):
        tokens = sorted({r["tokens"] for r in result["smollm2"]})
        lines += ["", "| SmolLM2-135M | " + " | ".join(f"{t} token{'s' if t > 1 else ''} ms (vs ORT fp32, vs ORT int4)" for t in tokens) + " |",
                  "|---|" + "---|" * len(tokens)]  # fmt: skip
        for variant in dict.fromkeys(r["variant"] for r in result["smollm2"]):
            cells = [next((r for r in result["smollm2"] if r["variant"] == variant and r["tokens"] == t), None) for t in tokens]
            text = [f"{c['ms']:.1f} ({c['vs_ort_fp32']:.2f}, {c['vs_ort_int4']:.2f})" if c else "-" for c in cells]
            lines.append(f"| {variant} | " + " | ".join(text) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables())
