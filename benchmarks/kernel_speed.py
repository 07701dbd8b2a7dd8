"""Kernel roofline: every bitfold kernel against ORT fp32 MatMul, torch fp32 and ORT's int4 MatMulNBits, for decode
(M = 1) and small-batch (M = 16) shapes, with the bytes each reads and its fraction of this machine's bandwidth.

Protocol: each runtime runs in its own process (ORT, torch, TVM: their worker threads spin after a call, and in
one process they took the cores from each other, inflating whichever ran next by up to 3×), the processes one at a
time in alternating rounds (ORT torch TVM ORT torch TVM …, ``--process-rounds``). Inside a process, ORT sessions
share one global thread pool; every runtime uses all cores. Weights are cold, as in a decoder: every candidate
cycles through distinct copies of its weights, at least 64 MiB in all (at most 64 copies, so shapes under 0.5 MiB
stay partly in the 32 MiB L3). Inside a process the candidates of one (M, K, N) run in interleaved rounds of
``--iters`` consecutive runs; a time is the median over all runs of all rounds.
ORT MatMulNBits is int4, block 128, symmetric, ``accuracy_level = 4`` (its fastest: activations quantized to int8
per block); so does bitfold's ``int4 acc4`` row (the same MatMulNBits op and attribute, AVX-512 VNNI kernel). The
other bitfold kernels compute exactly in fp32 (no activation quantization), from random weights in each
format (fp32 re-laid in column strips, the layout the TVM backend gives every large fp32 MatMul weight;
ShiftAddLLM q = 3, group 128; binary with per-output scale and mean; XNOR with binarized activations;
ternary; shift 4-bit; 2:4; unstructured 50 % CSR; 4×4 blocks 50 %).

Bandwidth: ``copy`` is a 256 MiB torch copy on all cores (bytes read per second); the roofline is the best read
rate in the run, copy or ORT's fp32 GEMV (the issue's rule). A kernel's fraction = (bytes it reads / time) / roofline.
The Hadamard rows time the O(n log n) transform of M rows of n = 4096 (hot: it reads only activations, which the
previous op has just written) against the larger of two floors: reading and
writing the M · n activations once at the copy bandwidth, and M · n · log2(n) additions at full vector width on
every core (two vector adds per cycle at the nominal clock); ``call_us`` is the cost of calling a compiled kernel that
copies one float (paid by every kernel call from Python), and the ratio after it compares the rest with the bound.

End-to-end (``--e2e``): SmolLM2-135M forward of 1 token (a decode step without KV cache) and of 128 tokens
(prefill): ORT fp32, TVM fp32, ORT int4 (MatMulNBits acc-4, group 128) and bitfold formats through TVM (int4
MatMulNBits acc-4 kernel, ShiftAddLLM q3, binary, 2:4 magnitude), each variant in its own process, one at a time,
variants alternating over ``--e2e-rounds`` rounds.
Weights are RTN/ magnitude (speed only; accuracy is in the other tables); the LM head stays fp32 in every variant. Writes benchmarks/results/kernels.{json,png}.

    python benchmarks/kernel_speed.py [--rounds 10] [--iters 5] [--e2e] [--only int4 ShiftAddLLM]
    python benchmarks/kernel_speed.py --e2e-only [--e2e-tokens 1]      # only the SmolLM2 rows (of one length)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import onnx_ir as ir  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from onnxruntime.capi import _pybind_state  # noqa: E402

from bitfold.kernels import bcq as k_bcq  # noqa: E402
from bitfold.kernels import binary as k_binary  # noqa: E402
from bitfold.kernels import build  # noqa: E402
from bitfold.kernels import csr as k_csr  # noqa: E402
from bitfold.kernels import dense as k_dense  # noqa: E402
from bitfold.kernels import hadamard as k_hadamard  # noqa: E402
from bitfold.kernels import nbits as k_nbits  # noqa: E402
from bitfold.kernels import shift as k_shift  # noqa: E402
from bitfold.kernels import sparse as k_sparse  # noqa: E402
from bitfold.kernels import ternary as k_ternary  # noqa: E402
from bitfold.ops import bcq, binary, block_csr, csr, shift, sparse, ternary  # noqa: E402
from bitfold.quant import matmulnbits  # noqa: E402
from bitfold.tools.bench import provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]
CORES = os.cpu_count() or 1
COLD_BYTES = 64 << 20


def copies(nbytes: int) -> int:
    return int(min(64, max(2, -(-COLD_BYTES // max(nbytes, 1)))))


# ---- ONNX Runtime single-op models --------------------------------------------------------------------------------


def _ort_session(node: ir.Node, x: ir.Value, initializers: list[ir.Value], opsets: dict) -> ort.InferenceSession:
    node.outputs[0].name, node.outputs[0].dtype = "y", ir.DataType.FLOAT
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=initializers, opset_imports=opsets)
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    options.log_severity_level = 3
    data = ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _init(name: str, array: np.ndarray) -> ir.Value:
    return ir.val(name, const_value=ir.tensor(array, name=name))


def ort_fp32(w: np.ndarray, m: int) -> list:
    sessions = []
    for i in range(copies(w.nbytes)):
        x = ir.val("x", ir.DataType.FLOAT, ir.Shape([m, w.shape[0]]))
        weight = _init("w", w + np.float32(i * 1e-7))
        sessions.append(_ort_session(ir.node("MatMul", [x, weight]), x, [weight], {"": 18}))
    return [lambda xs, s=s: s.run(None, {"x": xs}) for s in sessions]


def ort_int4(b: np.ndarray, s: np.ndarray, m: int, k: int) -> list:
    n = b.shape[0]
    runners = []
    for i in range(copies(b.nbytes + s.nbytes)):
        x = ir.val("x", ir.DataType.FLOAT, ir.Shape([m, k]))
        inits = [_init("b", b), _init("s", s.reshape(-1) * np.float32(1 + i * 1e-7))]
        attributes = {"K": k, "N": n, "bits": 4, "block_size": 128, "accuracy_level": 4}
        session = _ort_session(ir.node("MatMulNBits", [x, *inits], domain="com.microsoft", attributes=attributes), x, inits, {"": 18, "com.microsoft": 1})
        runners.append(lambda xs, session=session: session.run(None, {"x": xs}))
    return runners


# ---- bitfold kernels ----------------------------------------------------------------------------------------------


def formats(k: int, n: int, rng: np.random.Generator, int4: tuple) -> dict[str, tuple]:
    """label → (kernel, prepared operands) for random weights of shape [k, n] in every format."""
    b, s = int4
    signs = rng.choice([-1, 1], (3, k, n))
    trits = rng.integers(-1, 2, (k, n))
    units = shift.decode(rng.integers(0, 16, (k, n)), 4, True)
    dense = rng.standard_normal((k, n)).astype(np.float32)
    two_four = dense.copy().reshape(k // 4, 4, n)
    np.put_along_axis(two_four, np.argsort(np.abs(two_four), axis=1)[:, :2], 0.0, axis=1)
    two_four = two_four.reshape(k, n)
    half = dense * (rng.random((k, n)) < 0.5)
    keep = np.repeat(np.repeat(rng.random((n // 4, k // 4)) < 0.5, 4, 0), 4, 1).T
    p1, a1, m1, q1, v1, t1 = binary.pack(signs[:1], rng.random((1, n)), rng.standard_normal(n) * 0.01)
    cases = {
        "fp32 (strip layout)": (k_dense.KERNEL, [dense], {"K": k}),
        "int4 (MatMulNBits)": (k_nbits.KERNEL, [b, s], {"K": k, "N": n, "bits": 4, "block_size": 128}),
        "int4 acc4 (int8 activations)": (k_nbits.KERNEL, [b, s], {"K": k, "N": n, "bits": 4, "block_size": 128, "accuracy_level": 4}),
        "ShiftAddLLM q3 (BCQ LUT)": (k_bcq.KERNEL, list(bcq.pack(signs, rng.random((3, -(-k // 128), n)))), {"K": k, "group_size": 128}),
        "binary": (k_binary.KERNEL, [p1, a1, m1, q1, v1, t1], {"K": k}),
        "binary XNOR": (k_binary.KERNEL, [p1, a1, m1, q1, v1, t1], {"K": k, "binarize_input": 1}),
        "ternary": (k_ternary.KERNEL, list(ternary.pack(trits, rng.random(n))), {"K": k}),
        "shift 4-bit": (k_shift.KERNEL, list(shift.pack(units, rng.random(n), 4, True)), {"K": k, "zero": 1}),
        "2:4 sparse": (k_sparse.KERNEL, list(sparse.pack(two_four, 2, 4)), {"K": k, "n": 2, "m": 4}),
        "CSR 50%": (k_csr.CSR, [v.astype(np.float32) if i == 0 else v for i, v in enumerate(csr.pack(half))], {"K": k}),
        "block-CSR 4x4 50%": (k_csr.BLOCK_CSR, [v.astype(np.float32) if i == 0 else v for i, v in enumerate(block_csr.pack(dense * keep, 4, 4))], {"K": k, "n": n}),
    }
    return {label: (kernel, kernel.prepare([None, *weights], attrs)) for label, (kernel, weights, attrs) in cases.items()}


def tvm_runners(kernel, prepared, m: int, x: np.ndarray) -> list:
    """One runner per copy of the kernel's operands on the device."""
    built = build.build(kernel, prepared, m, "cpu")
    arguments = [built.arguments(x, built.upload(prepared)) for _ in range(copies(prepared.nbytes))]
    return [lambda xs, args=args: built.function(*args) for args in arguments]


def torch_runners(w: np.ndarray, x: np.ndarray) -> list:
    xt = torch.from_numpy(x)
    weights = [torch.from_numpy(w.copy()) for _ in range(copies(w.nbytes))]
    return [lambda xs, wt=wt: torch.matmul(xt, wt) for wt in weights]


def measure(candidates: dict[str, list], x: np.ndarray, rounds: int, iters: int) -> dict[str, float]:
    """Median seconds per run of each candidate (a list of runners over weight copies), interleaved rounds."""
    for runners in candidates.values():
        for run in runners[:3]:
            run(x)
    times: dict[str, list[float]] = {label: [] for label in candidates}
    for r in range(rounds):
        for label, runners in candidates.items():
            time.sleep(0.05)  # the previous candidate's worker threads stop spinning
            for i in range(iters):
                run = runners[(r * iters + i) % len(runners)]
                start = time.perf_counter()
                run(x)
                times[label].append(time.perf_counter() - start)
    return {label: float(np.median(t)) for label, t in times.items()}


def copy_bandwidth() -> float:
    torch.set_num_threads(CORES)
    a = torch.ones(64 << 20)  # 256 MiB
    b = torch.empty_like(a)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - start)
    return a.numel() * 4 / float(np.median(times))


def int4_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 RTN of w [K, N] in ORT's MatMulNBits layout, block 128: (B, scales)."""
    k, n = w.shape
    block = 128
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    scale = np.abs(padded.reshape(blocks, block, n)).max(axis=1) / 7 + 1e-12  # [blocks, N]
    codes = np.clip(np.round(padded.reshape(blocks, block, n) / scale[:, None]), -8, 7).reshape(-1, n)[:k] + 8
    b, s, _ = matmulnbits.pack(codes.T.astype(np.uint8), scale.T.astype(np.float32), None, 4, block)
    return b, s


def _config(m: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    """The same weights, activations and format generator in every process."""
    rng = np.random.default_rng([m, k, n])
    return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), rng.standard_normal((m, k)).astype(np.float32), rng


def worker(runtime: str, rounds: int, iters: int, only: list[str] | None) -> dict[str, list]:
    """Times (s) of this runtime's candidates for every (M, K, N): key "m,k,n,label" → [median, bytes]."""
    results = {}
    for m in (1, 16):
        for k, n in SHAPES:
            w, x, rng = _config(m, k, n)
            b, s = int4_weights(w)
            if runtime == "ort":
                candidates = {"ORT fp32 MatMul": (ort_fp32(w, m), w.nbytes), "ORT int4 MatMulNBits acc4": (ort_int4(b, s, m, k), b.nbytes + s.nbytes)}
            elif runtime == "torch":
                candidates = {"torch fp32": (torch_runners(w, x), w.nbytes)}
            else:
                candidates = {
                    f"bitfold {label}": (tvm_runners(kernel, prepared, m, x), prepared.nbytes)
                    for label, (kernel, prepared) in formats(k, n, rng, (b, s)).items()
                    if not only or any(o in label for o in only)
                }
            times = measure({label: runners for label, (runners, _) in candidates.items()}, x, rounds, iters)
            for label, (_, nbytes) in candidates.items():
                results[f"{m},{k},{n},{label}"] = [times[label], int(nbytes)]
    return results


def _spawn(*args: str) -> object:
    done = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def kernel_table(rounds: int, iters: int, process_rounds: int, only: list[str] | None) -> tuple[list[dict], float]:
    copy = copy_bandwidth()
    samples: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    for _ in range(process_rounds):
        for runtime in ("ort", "torch", "tvm"):
            extra = ["--only", *only] if only else []
            for key, (t, nbytes) in _spawn("--worker", runtime, "--rounds", str(rounds), "--iters", str(iters), *extra).items():
                samples.setdefault(key, []).append(t)
                sizes[key] = nbytes
    rows = []
    for key, ts in samples.items():
        m, k, n, label = key.split(",", 3)
        t = float(np.median(ts))
        rows.append({"m": int(m), "k": int(k), "n": int(n), "kernel": label, "us": t * 1e6, "bytes": sizes[key], "read_gbps": sizes[key] / t / 1e9})
    def at(r, prefix):  # noqa: E306
        return next(o["us"] for o in rows if (o["m"], o["k"], o["n"]) == (r["m"], r["k"], r["n"]) and o["kernel"].startswith(prefix))

    roofline = max(copy, *(r["bytes"] / (r["us"] * 1e-6) for r in rows if r["kernel"] == "ORT fp32 MatMul"))
    for r in rows:
        r["speedup_vs_ort_fp32"] = at(r, "ORT fp32") / r["us"]
        r["speedup_vs_ort_int4"] = at(r, "ORT int4") / r["us"]
        r["roofline_fraction"] = r["read_gbps"] * 1e9 / roofline
    order = ["ORT fp32 MatMul", "torch fp32", "ORT int4 MatMulNBits acc4"]
    rows.sort(key=lambda r: (r["m"], r["k"] * r["n"], r["k"], order.index(r["kernel"]) if r["kernel"] in order else len(order)))
    for m in (1, 16):
        for k, n in SHAPES:
            print(f"M={m} {k}x{n}: " + ", ".join(f"{r['kernel']} {r['us']:.0f}us" for r in rows if (r["m"], r["k"], r["n"]) == (m, k, n)), flush=True)
    return rows, copy


def _peak_adds() -> float:
    """fp32 additions per second at full width: cores × 16 lanes × 2 vector adds per cycle × the nominal clock."""
    mhz = max(float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("cpu MHz"))
    return CORES * build.schedule.lanes(build.target("cpu")) * 2 * mhz * 1e6


def call_overhead(rounds: int) -> float:
    """Seconds of one call of a compiled TVM kernel that copies one float: the fixed cost every kernel call pays
    from Python (argument conversion, packed-function dispatch)."""
    from tvm.script import tirx as T

    @T.prim_func
    def copy_one(x: T.Buffer((1,), "float32"), y: T.Buffer((1,), "float32")):
        y[0] = x[0]

    function = tvm.compile(tvm.IRModule({"main": copy_one}), target=build.target("cpu"))["main"]
    args = [tvm.runtime.tensor(np.zeros(1, np.float32)) for _ in range(2)]
    return measure({"call": [lambda xs: function(*args)]}, np.zeros(1, np.float32), rounds, 5)["call"]


def hadamard_rows(rounds: int, copy: float) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    call = call_overhead(rounds)
    for m in (1, 16, 128):
        n = 4096
        prepared = k_hadamard.prepare([None, np.ones((1, 1))], {"K": n})
        x = rng.standard_normal((m, n)).astype(np.float32)
        # hot: the transform reads only activations that the previous op has just written (no weights to cycle)
        t = measure({"hadamard": tvm_runners(k_hadamard.KERNEL, prepared, m, x)[:1]}, x, rounds, 5)["hadamard"]
        memory = 2 * m * n * 4 / copy  # read x and write y once
        arithmetic = m * n * np.log2(n) / _peak_adds()  # n log2 n additions per row at full vector width
        bound = max(memory, arithmetic)
        rows.append({"m": m, "n": n, "us": t * 1e6, "bound_us": bound * 1e6, "memory_bound_us": memory * 1e6,
                     "add_bound_us": arithmetic * 1e6, "ratio_to_bound": t / bound, "call_us": call * 1e6,
                     "ratio_to_bound_after_call": (t - call) / bound})  # fmt: skip
        print(f"Hadamard M={m} n={n}: {t * 1e6:.1f}us, bound {bound * 1e6:.1f}us, call {call * 1e6:.1f}us", flush=True)
    return rows


# ---- end to end ----------------------------------------------------------------------------------------------------


VARIANTS = {
    "ORT fp32": (None, "ort"),
    "TVM fp32": (None, "tvm"),
    "ORT int4 MatMulNBits acc4": ({"name": "quantize-weights", "format": "matmulnbits", "bits": 4, "group_size": 128, "accuracy_level": 4}, "ort"),
    "bitfold int4 (TVM)": ({"name": "quantize-weights", "format": "matmulnbits", "bits": 4, "group_size": 128, "accuracy_level": 4}, "tvm"),
    "bitfold ShiftAddLLM q3 (TVM)": ({"name": "shiftadd", "q": 3, "group_size": 128, "gptq": False}, "tvm"),
    "bitfold binary (TVM)": ({"name": "binarize"}, "tvm"),
    "bitfold 2:4 (TVM)": ({"name": "prune", "method": "magnitude", "pattern": "nm:2:4", "format": "sparse"}, "tvm"),
}


def e2e_worker(label: str, seq: int, iters: int) -> list[float]:
    """Seconds per forward of one variant (this process runs nothing else)."""
    import bitfold
    from bitfold.backends.ort import OrtRunnable
    from bitfold.eval.models import export_smollm2
    from bitfold.passes.canonical import CANONICAL

    step, backend = VARIANTS[label]
    model, _ = bitfold.optimize(export_smollm2(seq), list(CANONICAL) + ([step] if step else []))
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 49152, (1, seq)), "attention_mask": np.ones((1, seq), np.int64)}
    runnable = OrtRunnable(model, device="cpu") if backend == "ort" else bitfold.compile(model, "tvm", "cpu")
    runnable.times(feeds, 3)
    return runnable.times(feeds, iters)


def e2e(iters: int, rounds: int, tokens: tuple[int, ...] = (1, 128)) -> list[dict]:
    """Each variant's process ``rounds`` times, variants alternating (the machine's state drifts between
    processes); a time is the median over all runs of all rounds. One run per sequence length."""
    rows = []
    for seq in tokens:
        times: dict[str, list[float]] = {label: [] for label in VARIANTS}
        for _ in range(rounds):
            for label in VARIANTS:
                times[label] += _spawn("--e2e-worker", label, "--tokens", str(seq), "--iters", str(iters))
        medians = {label: float(np.median(t)) * 1e3 for label, t in times.items()}
        for label, ms in medians.items():
            rows.append({"tokens": seq, "variant": label, "ms": ms, "vs_ort_fp32": ms / medians["ORT fp32"], "vs_ort_int4": ms / medians["ORT int4 MatMulNBits acc4"]})
        print(f"SmolLM2 {seq} tokens: " + ", ".join(f"{label} {ms:.1f}ms" for label, ms in medians.items()), flush=True)
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    for ax, m in zip(axes, (1, 16), strict=True):
        sub = [r for r in rows if r["m"] == m]
        labels = list(dict.fromkeys(r["kernel"] for r in sub))
        width = 0.8 / len(SHAPES)
        for i, (k, n) in enumerate(SHAPES):
            values = [next((r["speedup_vs_ort_fp32"] for r in sub if r["kernel"] == label and (r["k"], r["n"]) == (k, n)), 0) for label in labels]
            ax.barh(np.arange(len(labels)) + i * width, values, width, label=f"{k}x{n}")
        ax.set_yticks(np.arange(len(labels)) + 0.4, labels, fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"M = {m}: speed-up over ORT fp32 MatMul (cold weights)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iters", type=int, default=5, help="consecutive runs per candidate and round")
    parser.add_argument("--process-rounds", type=int, default=2, help="alternations of the ORT, torch and TVM processes")
    parser.add_argument("--e2e", action="store_true", help="also time SmolLM2-135M end to end")
    parser.add_argument("--only", nargs="*", help="bitfold kernels whose label contains one of these")
    parser.add_argument("--e2e-only", action="store_true", help="rerun only the SmolLM2 rows, keep the others")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="alternations of the SmolLM2 variants' processes")
    parser.add_argument("--e2e-iters", type=int, default=10, help="SmolLM2 forwards per process")
    parser.add_argument("--e2e-tokens", type=int, nargs="+", default=[1, 128], choices=[1, 128],
                        help="with --e2e-only: the sequence lengths to rerun (the others' rows are kept)")
    parser.add_argument("--hadamard-only", action="store_true", help="rerun only the Hadamard rows, keep the others")
    parser.add_argument("--worker", choices=["ort", "torch", "tvm"], help=argparse.SUPPRESS)
    parser.add_argument("--e2e-worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(CORES)
    if args.worker == "ort":
        _pybind_state.set_global_thread_pool_sizes(CORES, 1)
    if args.worker:
        print(json.dumps(worker(args.worker, args.rounds, args.iters, args.only)))
        return
    if args.e2e_worker:
        print(json.dumps(e2e_worker(args.e2e_worker, args.tokens, args.iters)))
        return
    stamp = provenance()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "kernels.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    if args.e2e_only:
        fresh = e2e(args.e2e_iters, args.e2e_rounds, tuple(args.e2e_tokens))
        kept = [row for row in previous.get("smollm2", []) if row["tokens"] not in args.e2e_tokens]
        result = {**previous, "smollm2": sorted(kept + fresh, key=lambda row: row["tokens"])}
    elif args.hadamard_only:
        result = {**previous, "hadamard": hadamard_rows(args.rounds, copy_bandwidth())}
    else:
        rows, copy = kernel_table(args.rounds, args.iters, args.process_rounds, args.only)
        result = {
            "machine": {"cores": CORES, "copy_gbps": copy / 1e9, "torch": torch.__version__},
            "kernels": rows,
            "hadamard": hadamard_rows(args.rounds, copy),
            "smollm2": e2e(args.e2e_iters, args.e2e_rounds) if args.e2e else previous.get("smollm2", []),
        }
    # The stamp is this run's, also where rows of an earlier run are kept; "machine" keeps the measured cores and copy
    # bandwidth (kernels_table.py reads them) beside the machine's description.
    machine = {**result.get("machine", {}), "platform": stamp["machine"]}
    result = {**result, "command": stamp["command"], "commit": stamp["commit"], "machine": machine}
    write_atomic(path, json.dumps(result, indent=2).encode())
    _plot(result["kernels"], RESULTS / "kernels.png")


if __name__ == "__main__":
    main()
