"""Fuzz every pass on random graphs: crashes, contract violations and mismatches per pass, with minimal reproducers.

Graph i is built from the seed ``"<seed>:<i>"`` by ``bitfold.tools.fuzz`` (the generator the tests use as a
hypothesis strategy) and every case of ``fuzz.pass_cases()`` (each registered pass, some with several settings,
and the canonical recipe) runs on it through ``bitfold.optimize``: exact cases must keep every output within the
tolerance of the graph's dtype (1e-5 relative for float32, 16 float16 units for float16), lossy cases must keep
finite outputs finite. The first failure of each kind (case, kind, reason) is then shrunk to the smallest graph
that still fails the same way, and written in ``onnx.printer`` syntax (``onnx.parser.parse_model`` reads it back)
with the choice list that rebuilds it (``fuzz.replay``).

A run checks graphs ``start`` .. ``start + graphs - 1`` and writes them as one shard,
benchmarks/results/fuzz/<seed>-<start>-<stop>.json, so a long campaign can run in pieces (on several machines or
days); every shard of the seed is then merged into benchmarks/results/fuzz.json (counts summed, worst errors kept,
the first failure of each signature kept). Shards of one seed must not overlap.

    python benchmarks/fuzz.py [--graphs 10000] [--start 0] [--seed 0] [--jobs 1] [--shrink-budget 200]
    python benchmarks/fuzz.py --merge-only [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from bitfold.tools import fuzz
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=10_000, help="random graphs to check every case on")
    parser.add_argument("--start", type=int, default=0, help="index of the first graph of this shard")
    parser.add_argument("--seed", default="0", help="graph i is built from the seed '<seed>:<i>'")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--shrink-budget", type=int, default=200, help="checks spent shrinking each distinct failure")
    parser.add_argument("--out", type=Path, default=RESULTS / "fuzz.json", help="the merged report")
    parser.add_argument("--merge-only", action="store_true", help="run nothing: merge the seed's shard files into --out")
    args = parser.parse_args()
    if args.graphs < 1 or args.start < 0:
        parser.error("--graphs must be positive and --start non-negative")
    if args.merge_only:
        _merge(args.out, args.seed)
        return

    cases = fuzz.pass_cases()
    start = time.perf_counter()
    with tqdm(total=args.graphs, desc="graphs", unit="graph", file=sys.stderr, disable=False) as bar:

        def progress(result: fuzz.Sweep) -> None:
            bar.update(1)
            bar.set_postfix(failures=len(result.failures), crashes=sum(result.by_kind("crash").values()))

        result = fuzz.sweep(args.graphs, args.seed, cases, jobs=args.jobs, start=args.start, isolate=True, on_graph=progress)
    sweep_seconds = time.perf_counter() - start
    with tqdm(total=len(result.failures), desc="shrink", unit="failure", file=sys.stderr, disable=False) as bar:
        fuzz.minimize_failures(result, cases, jobs=args.jobs, budget=args.shrink_budget, on_failure=lambda _: bar.update(1))

    report = {
        "command": "python benchmarks/fuzz.py " + " ".join(sys.argv[1:]),
        "commit": _commit(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "seed": args.seed,
        "start": args.start,
        "seconds": {"sweep": round(sweep_seconds, 1), "total": round(time.perf_counter() - start, 1)},
        "tolerance": {"float32": fuzz.FLOAT32_TOLERANCE, "float16": fuzz.FLOAT16_TOLERANCE},
        "exact_cases": [c.label for c in cases if c.exact],
        "lossy_cases": [c.label for c in cases if not c.exact],
        **result.to_dict(),
    }
    shard = args.out.parent / "fuzz" / f"{args.seed}-{args.start}-{args.start + args.graphs}.json"
    shard.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(shard, (json.dumps(report, indent=1) + "\n").encode())
    print(f"this shard: {result.graphs} graphs, {len(result.failures)} distinct failures; wrote {shard}")
    _merge(args.out, args.seed)


def _merge(out: Path, seed: str) -> None:
    """Merge every shard file of ``seed`` (beside ``out``, under fuzz/) into ``out``."""
    shards = sorted((out.parent / "fuzz").glob(f"{seed}-*.json"))
    if not shards:
        sys.exit(f"no shard files of seed {seed!r} under {out.parent / 'fuzz'}: run a shard first.")
    merged = fuzz.merge_reports([json.loads(p.read_text()) for p in shards])
    write_atomic(out, (json.dumps(merged, indent=1) + "\n").encode())
    failed = {kind: sum(merged[key].values()) for kind, key in (("crash", "crashes"), ("contract", "contract_violations"), ("mismatch", "mismatches"))}
    print(f"all {len(merged['shards'])} shards: {merged['graphs']} graphs, {sum(merged['cases_per_pass'].values())} cases: "
          f"{failed['crash']} crashes, {failed['contract']} contract violations, {failed['mismatch']} mismatches "
          f"({len(merged['failures'])} distinct); wrote {out}")  # fmt: skip


if __name__ == "__main__":
    main()
