"""The docs' language-model tables (Markdown) from benchmarks/results/llm_{export,passes,decode}.json.

    python benchmarks/llm_tables.py      # print them; benchmarks/docs_tables.py writes them into docs/measured.md
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def export_table() -> str:
    r = json.loads((RESULTS / "llm_export.json").read_text())
    lines = [f"`{r['command']}` (SmolLM2-135M, fp32 weights {r['fp32_bytes'] / 1e6:.0f} MB):", "",
             "| export method | wall s | peak RSS MB | RSS / fp32 bytes |", "|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        lines.append(f"| {row['method']} | {row['seconds']:.1f} | {row['peak_rss_bytes'] / 1e6:.0f} | {row['rss_over_fp32_bytes']:.2f} |")
    return "\n".join(lines)


def passes_table() -> str:
    r = json.loads((RESULTS / "llm_passes.json").read_text())
    fixed, cached = "fixed-length (traced, no cache)", "KV-cache (export-llm)"
    lines = [f"`{r['command']}`: {r['protocol']}.", "",
             "| recipe | perplexity, fixed-length graph | perplexity, KV-cache graph | relative difference | "
             "same graph reordered: ORT optimizations off / basic | same graph, weights moved one ulp | verdict |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in r["rows"]:
        draws = row.get("spread_draws", {"none": row["spread"]} if "spread" in row else {})
        spread = " / ".join(f"{draws[level]:.1e}" if level in draws else "not measured" for level in ("none", "basic")) if draws else "-"
        ulp = " / ".join(f"{v:.1e}" for k, v in sorted(draws.items()) if k.startswith("ulp-")) or ("not measured" if draws else "-")
        lines.append(f"| {row['variant']} | {row[fixed]['ppl']:.4f} | {row[cached]['ppl']:.4f} | {row['rel_diff']:.1e} | "
                     f"{spread} | {ulp} | {row.get('verdict') or ('agree' if row['rel_diff'] <= 1e-3 else 'differ (spread not measured)')} |")
    return "\n".join(lines)


def _run(row: dict, r: dict) -> str:
    """The run that timed ``row``: its commit (rows of files written before rows named their run: the file's)."""
    return (row.get("run") or {}).get("commit") or r.get("commit") or "?"


def decode_table(prompt: str = "512") -> str:
    r = json.loads((RESULTS / "llm_decode.json").read_text())
    runs = list(dict.fromkeys(_run(row, r) for row in r["rows"]))
    runs.sort(key=lambda run: run != r.get("commit"))  # the file's own (newest) run first, then the others in file order
    several = len(runs) > 1
    lengths = sorted({n for row in r["rows"] for n in row["median"]}, key=int)
    head = ("| runtime / format | Lee perplexity | held-out perplexity | file MB | bits per linear weight | "
            + " | ".join(f"prefill {n} ms | decode tok/s @{n}" for n in lengths) + (" | timed at |" if several else " |"))  # fmt: skip
    lines = [f"`{r['command']}`: {r['protocol']}.", "", head, "|---|---|---|---|---|" + "---|---|" * len(lengths) + ("---|" if several else "")]
    if several:
        commands = "; ".join(f"{run}: `{next(row['run']['command'] for row in r['rows'] if _run(row, r) == run and row.get('run'))}`"
                             for run in runs)  # fmt: skip
        lines[0] += f" Rows were timed in {len(runs)} runs ({commands}); speeds compare within one run, the ratios below do."
    order = {run: i for i, run in enumerate(runs)}
    for row in sorted(r["rows"], key=lambda x: (order[_run(x, r)], -x["median"].get(prompt, {"decode_tok_s": 0})["decode_tok_s"])):
        cells = []
        for n in lengths:
            m = row["median"].get(n)
            cells += [f"{m['prefill_ms']:.0f}", f"{m['decode_tok_s']:.1f}"] if m else ["-", "-"]
        heldout = f"{row['ppl_heldout']:.2f}" if "ppl_heldout" in row else "not measured"
        bpw = f"{row['linear_bpw']:.2f}" if row.get("linear_bpw") else "-"
        tail = f" | {_run(row, r)} |" if several else " |"
        lines.append(f"| {row['label']} | {row['ppl']:.2f} | {heldout} | {row['file_bytes'] / 1e6:.0f} | {bpw} | " + " | ".join(cells) + tail)
    for run in runs:
        lines += _ratios([row for row in r["rows"] if _run(row, r) == run], prompt, f" (run {run})" if several else "")
    return "\n".join(lines)


def _ratios(rows: list[dict], prompt: str, which: str) -> list[str]:
    """Speed ratios of one run's bitfold rows against the same run's llama.cpp and ORT GenAI rows."""
    lines = []
    anchor = next((row for row in rows if row["name"] == "llamacpp-Q4_0"), None)
    genai = next((row for row in rows if row["name"] == "genai-int4-b32"), None)
    if anchor is not None and prompt in anchor["median"]:
        a = anchor["median"][prompt]
        g = genai["median"].get(prompt) if genai is not None else None
        versus = " and ORT GenAI int4 (builder default, block 32)" if g else ""
        lines += ["", f"Ratios at the {prompt}-token prompt against llama.cpp Q4_0{versus}{which} (decode tok/s ratio; prefill time ratio):", ""]
        for row in rows:
            m = row["median"].get(prompt)
            if m and row["tool"] == "bitfold":
                text = f"- {row['name']}: decode {m['decode_tok_s'] / a['decode_tok_s']:.2f}× Q4_0"
                text += f", {m['decode_tok_s'] / g['decode_tok_s']:.2f}× GenAI" if g else ""
                lines.append(text + f"; prefill {m['prefill_ms'] / a['prefill_ms']:.2f}× Q4_0's time")
    ours = [row for row in rows if row["tool"] == "bitfold" and row.get("linear_bpw") and prompt in row["median"]]
    theirs = [row for row in rows if row["name"] in ("llamacpp-Q4_0", "llamacpp-Q4_K_M") and row.get("linear_bpw")
              and prompt in row["median"]]  # fmt: skip
    if ours and theirs:
        lines += ["", "bitfold's best perplexity at no more stored bits per linear weight than a llama.cpp 4-bit file "
                  f"(Lee / held-out perplexity; decode and prefill at the {prompt}-token prompt){which}:", ""]  # fmt: skip
        for ref in theirs:
            fitting = [row for row in ours if row["linear_bpw"] <= ref["linear_bpw"]]
            if not fitting:
                lines.append(f"- {ref['label']}, {ref['linear_bpw']:.2f} bits: no bitfold row stores that few")
                continue
            best = min(fitting, key=lambda row: (row["ppl"], -row["median"][prompt]["decode_tok_s"]))
            m, q = best["median"][prompt], ref["median"][prompt]
            lines.append(f"- {ref['label']}, {ref['linear_bpw']:.2f} bits, {ref['ppl']:.2f} / {ref['ppl_heldout']:.2f}: "
                         f"{best['name']}, {best['linear_bpw']:.2f} bits, {best['ppl']:.2f} / {best['ppl_heldout']:.2f}; decode "
                         f"{m['decode_tok_s'] / q['decode_tok_s']:.2f}× theirs, prefill {m['prefill_ms'] / q['prefill_ms']:.2f}× their time")  # fmt: skip
    same = next((row for row in rows if row["name"] == "llamacpp-Q4_1"), None)
    grid = [row for row in rows if row["name"].startswith("minmax") and prompt in row["median"]]
    if same is not None and prompt in same["median"] and grid:
        q = same["median"][prompt]
        lines += ["", f"The min-max rows hold the layers' weights of llama.cpp's Q4_1 file exactly (its grid; their head is 8-bit), at the {prompt}-token prompt:", ""]
        for row in grid:
            m = row["median"][prompt]
            lines.append(f"- {row['name']}: decode {m['decode_tok_s'] / q['decode_tok_s']:.2f}× Q4_1; prefill "
                         f"{m['prefill_ms'] / q['prefill_ms']:.2f}× Q4_1's time; perplexity {row['ppl']:.2f} against {same['ppl']:.2f}")
    return lines


def tables() -> str:
    parts = []
    for make in (export_table, passes_table, decode_table):
        try:
            parts.append(make())
        except FileNotFoundError as e:
            parts.append(f"(no results yet: {Path(e.filename).name})")
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(tables())
