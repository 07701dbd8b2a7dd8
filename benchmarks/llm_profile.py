"""Where a decode step of bitfold's fastest 4-bit SmolLM2 goes: ONNX Runtime's per-node profile of the lowered graph.

The model is llm_decode.py's ``w4-head8`` (GPTQ W4 g128 MatMulNBits at accuracy level 4, 8-bit head), run the way
bitfold's generator runs it (lowered to GroupQueryAttention and fused norms, one bound cache buffer): the first 512
Lee tokens as the prompt, then 128 greedy tokens, 2 threads. ORT's profiler times every kernel; the tables sum them
by op type per decode step and per prefill, beside the wall time Python sees per step (the gap is binding,
session and Python overhead). Profiling adds a little time per node, so read the shares, not the absolute speed
(llm_decode.py measures that). Also reported: the bytes a decode step must read (weights and the KV cache) and what
they cost at the machine's read bandwidth, measured in the same run (the floor no kernel can beat).
``--model`` picks another of llm_decode.py's models, ``--kv-cache float16`` the generator's float16 cache.
Writes benchmarks/results/llm_profile.json. Needs llm_decode.py's models (run it first).

    python benchmarks/llm_profile.py [--new 128] [--model bitfold-w4-head8] [--kv-cache float32|float16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import bitfold
from bitfold.llm.generate import Decoder
from bitfold.tools.bench import provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / ".tmp" / "llm_decode"
MODEL = "bitfold-w4-head8"
PROMPT, THREADS = 512, 2


def _events(path: str) -> tuple[list[dict], list[dict]]:
    """ORT's trace: (model runs in order, node kernel events)."""
    trace = json.loads(Path(path).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    nodes = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    return sorted(runs, key=lambda e: e["ts"]), nodes


def _by_op(runs: list[dict], nodes: list[dict]) -> dict[str, float]:
    """Kernel milliseconds per op type summed over ``runs``, divided by their count."""
    spans = [(r["ts"], r["ts"] + r["dur"]) for r in runs]
    starts = np.array([s for s, _ in spans])
    totals: dict[str, float] = defaultdict(float)
    for e in nodes:
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0 and e["ts"] <= spans[i][1]:
            totals[e["args"].get("op_name", "?")] += e["dur"] / 1e3
    return {op: ms / len(runs) for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def _bytes_read(model) -> dict[str, float]:
    """Bytes of constant tensors read per decode step, by kind: MatMulNBits weights and side tensors, tables a
    Gather indexes (one row per token), other constants."""
    sizes = {name: v.const_value.nbytes for name, v in model.graph.initializers.items() if v.const_value is not None}
    nbits = {v.name for node in model.graph if node.op_type == "MatMulNBits" for v in node.inputs[1:] if v is not None}
    rows = {}
    for name, v in model.graph.initializers.items():
        if v.const_value is not None and v.uses() and all(user.op_type == "Gather" and i == 0 for user, i in v.uses()):
            rows[name] = v.const_value.nbytes / v.const_value.shape[0]  # a decode step gathers one row
    packed = sum(n for name, n in sizes.items() if name in nbits)
    other = sum(n for name, n in sizes.items() if name not in nbits and name not in rows)
    return {"matmulnbits_mb": packed / 1e6, "gathered_rows_mb": sum(rows.values()) / 1e6, "other_constants_mb": other / 1e6}


def _read_bandwidth() -> float:
    """Bytes per second that ``THREADS`` threads read from memory: the sum of a 256 MiB array (four times the last
    level cache of a server CPU), median of 10. A decode step reads its weights and cache once, so this is its floor."""
    import torch

    torch.set_num_threads(THREADS)
    a = torch.ones(64 << 20)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - start)
    return a.numel() * 4 / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new", type=int, default=128, help="greedy tokens after the prompt (default 128)")
    parser.add_argument("--model", default=MODEL, help=f"a model folder under {WORK.relative_to(RESULTS.parent.parent)} (default {MODEL})")
    parser.add_argument("--kv-cache", choices=("float32", "float16"), help="the cache's element type (default: the graph's)")
    args = parser.parse_args()
    stamp = provenance()
    path = WORK / args.model / "model.onnx"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `python benchmarks/llm_decode.py` first (it builds the models).")
    prompt = np.load(WORK / "prompt_ids.npy")[:PROMPT]
    model = bitfold.load(path)
    with tempfile.TemporaryDirectory() as tmp:
        decoder = Decoder(model, max_length=PROMPT + args.new, threads=THREADS, profile=str(Path(tmp) / "decode"), kv_cache=args.kv_cache)
        assert decoder.fusion is not None and decoder.fusion.attention, decoder.fusion and decoder.fusion.reason
        walls = []
        start = time.perf_counter()
        logits = decoder(prompt)
        prefill_wall = time.perf_counter() - start
        for _ in range(args.new - 1):
            token = np.array([int(logits.argmax())])
            start = time.perf_counter()
            logits = decoder(token)
            walls.append(time.perf_counter() - start)
        runs, nodes = _events(decoder.session.end_profiling())
    chunks = -(-PROMPT // decoder.prefill_chunk) if decoder.prefill_chunk else 1  # the prompt's calls (Decoder feeds it in chunks)
    prefill, decode = runs[:chunks], runs[chunks:]
    decode_ms = {op: round(ms, 4) for op, ms in _by_op(decode, nodes).items()}
    kernel_ms = sum(decode_ms.values())
    run_ms = float(np.mean([r["dur"] for r in decode])) / 1e3
    wall_ms = float(np.median(walls)) * 1e3
    element = np.dtype(decoder.dtype).itemsize  # the cache's element as the generator holds it
    kv_per_token = sum(int(v.shape[1]) * int(v.shape[3]) * element for v in model.graph.inputs if v.name.startswith("past_key_values"))
    read = {**_bytes_read(model), "kv_cache_mb": kv_per_token * (PROMPT + args.new // 2) / 1e6}  # the cache at mid-generation
    read_gbps = _read_bandwidth() / 1e9  # the floor: every byte read once at this machine's read bandwidth
    read |= {"read_gbps": read_gbps, "floor_ms": sum(read.values()) / read_gbps}  # MB / (GB/s) = ms
    result = {
        **stamp,
        "model": f"SmolLM2-135M, {args.model} (llm_decode.py), ORT lowered graph, {np.dtype(decoder.dtype).name} KV cache",
        "protocol": f"prompt = first {PROMPT} Lee tokens, {args.new} greedy tokens, {THREADS} threads, ORT profiler on",
        "decode": {"kernel_ms_by_op": decode_ms, "kernel_ms": round(kernel_ms, 3), "model_run_ms": round(run_ms, 3),
                   "python_wall_ms_median": round(wall_ms, 3), "steps": len(decode)},  # fmt: skip
        "prefill": {"kernel_ms_by_op": {op: round(ms * chunks, 3) for op, ms in _by_op(prefill, nodes).items()},
                    "model_run_ms": round(sum(r["dur"] for r in prefill) / 1e3, 3), "python_wall_ms": round(prefill_wall * 1e3, 3),
                    "calls": chunks},  # fmt: skip
        "read_per_decode_step": read,
    }
    print(json.dumps(result, indent=2))
    write_atomic(RESULTS / "llm_profile.json", json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
