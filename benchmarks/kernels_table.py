"""Print the docs tables of benchmarks/results/kernels.json (written by benchmarks/kernel_speed.py) as Markdown.

    python benchmarks/kernels_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    result = json.loads((RESULTS / "kernels.json").read_text())
    machine = result["machine"]
    rows = result["kernels"]
    roofline = max(r["read_gbps"] / r["roofline_fraction"] for r in rows if r["roofline_fraction"] > 0)
    print(f"copy {machine['copy_gbps']:.1f} GB/s, roofline {roofline:.1f} GB/s, {machine['cores']} cores\n")
    shapes = list(dict.fromkeys((r["k"], r["n"]) for r in rows))
    for m in (1, 16):
        print(f"M = {m}: speed-up over ORT fp32 MatMul (µs at {shapes[-1][0]}×{shapes[-1][1]}; roofline fraction there)\n")
        print("| kernel | " + " | ".join(f"{k}×{n}" for k, n in shapes) + " | µs | roofline |")
        print("|---|" + "---|" * (len(shapes) + 2))
        for label in dict.fromkeys(r["kernel"] for r in rows if r["m"] == m):
            cells = {(r["k"], r["n"]): r for r in rows if r["m"] == m and r["kernel"] == label}
            big = cells[shapes[-1]]
            ratios = " | ".join(f"{cells[s]['speedup_vs_ort_fp32']:.2f}×" for s in shapes)
            print(f"| {label} | {ratios} | {big['us']:.0f} | {big['roofline_fraction'] * 100:.0f} % |")
        print()
    print("| Hadamard rows × n | µs | bound µs | ratio |\n|---|---|---|---|")
    for h in result["hadamard"]:
        print(f"| {h['m']} × {h['n']} | {h['us']:.1f} | {h['bound_us']:.1f} | {h['ratio_to_bound']:.1f}× |")
    if result.get("smollm2"):
        print("\n| SmolLM2-135M | " + " | ".join(f"{t} token{'s' if t > 1 else ''} ms (vs ORT fp32, vs ORT int4)" for t in (1, 128)) + " |")
        print("|---|---|---|")
        for variant in dict.fromkeys(r["variant"] for r in result["smollm2"]):
            cells = [next(r for r in result["smollm2"] if r["variant"] == variant and r["tokens"] == t) for t in (1, 128)]
            print(f"| {variant} | " + " | ".join(f"{c['ms']:.1f} ({c['vs_ort_fp32']:.2f}, {c['vs_ort_int4']:.2f})" for c in cells) + " |")


if __name__ == "__main__":
    main()
