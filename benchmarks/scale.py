"""Memory and time at scale: seeded random-weight models of SmolLM2-135M's, TinyLlama-1.1B's and Llama-2-7B's
shapes, written by ``bitfold synth-llm`` (bf16 safetensors), then int4 weights (group 128, lm_head kept float, QDQ)
by ``bitfold optimize`` straight from the model folder: round-to-nearest streamed (``--stream``) and, where the
machine can hold it, in memory; GPTQ streamed, block by block (sequential: each block on the Gram matrices of what
the already-quantized blocks compute; 16 x 512 calibration tokens), below 2 B parameters. Depth sweeps repeat the
streamed runs at TinyLlama's and at Llama-2-7B's block shapes with fewer layers: the per-layer cost of the 7B
shape's GPTQ, whose whole run takes hours on 2 cores.

Every step is one ``bitfold`` command in its own process: wall time, and peak resident memory as the kernel counts
it for that process's own program (``VmHWM``, read every 50 ms, so a peak between two samples is not missed); the
resident memory samples are kept for the plot. Writes benchmarks/results/scale.json (one row per step, a rerun
replaces its own rows) and scale.png (peak memory and time against parameters, log-log, with the fitted slopes).

With ``--nodes L [L ...]`` it measures instead each canonical pass's time against graph size: a narrow Llama
(hidden 32) of L layers, exported in process, each pass run alone through the pipeline (pass time as the report
records it, and the whole call with the pipeline's instrumentation). Writes scale_passes.json and scale_passes.png.

With ``--allocate`` it times the bit-allocation sweep (``bitfold allocate``, GPTQ sensitivities of int4 and int3 for
every SmolLM2-135M layer but lm_head on 16 × 128 Lee tokens, logits of the first 2 samples) serially and with
``--ray`` on a local cluster of 2 one-thread workers: each its own process, interleaved, ``--repeats`` times; the
two must write the same recipe and the same sensitivities. A third process times Ray's start and stop alone.
Writes scale_ray.json.

    python benchmarks/scale.py [--shapes smollm2-135m tinyllama-1.1b llama2-7b] [--layers 2 4 8] [--big-layers 2 4] [--work DIR]
    python benchmarks/scale.py --nodes 20 60 200 600 1800
    python benchmarks/scale.py --allocate [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bitfold.llm.synthetic import parameter_count, shape_config  # noqa: E402
from bitfold.tools.bench import merge_rows, provenance, run_measured  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
RECIPE = '[[pass]]\nname = "quantize-weights"\nmethod = "rtn"\nbits = 4\ngroup_size = 128\nexclude = ["*lm_head*"]\n'
#: sequential GPTQ (reconstruct with no learning steps): each block's weights on the Gram matrices of what the
#: already-quantized blocks compute; act_order, damp 0.003, first token weighted 64, no range clipping
GPTQ_RECIPE = ('[[pass]]\nname = "reconstruct"\nbits = 4\ngroup_size = 128\nclip_steps = 0\nround_steps = 0\nclip = "none"\n'
               'exclude = ["*lm_head*"]\n')  # fmt: skip
CALIBRATION = (16, 512)  # GPTQ calibration: samples x tokens (seeded random token ids: the weights are random too)
#: a whole 7B model's sequential GPTQ runs for about an hour on 2 cores: only with --whole-7b-gptq
GPTQ_MAX_PARAMS = 2e9
#: the in-memory run holds the float model and its rewrite: only below this many parameters on a 24 GB machine
IN_MEMORY_MAX_PARAMS = 2e9
SWEEP_SHAPE = "tinyllama-1.1b"
STEPS = ("synth-llm", "optimize rtn w4 streamed", "optimize gptq w4 streamed", "optimize rtn w4 in memory")
ORDER = [f"{shape} L{layers} {step}" for shape in ("smollm2-135m", "tinyllama-1.1b", "llama2-7b") for layers in (2, 4, 8, 16, 22, 30, 32)
         for step in STEPS]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="*", default=["smollm2-135m", "tinyllama-1.1b", "llama2-7b"])
    parser.add_argument("--layers", nargs="*", type=int, default=[2, 4, 8], help=f"depth sweep at {SWEEP_SHAPE}'s block shape")
    parser.add_argument("--big-layers", nargs="*", type=int, default=[2, 4], help="depth sweep at llama2-7b's block shape")
    parser.add_argument("--work", type=Path, help="scratch folder for the models (default: a temporary folder, removed)")
    parser.add_argument("--nodes", nargs="*", type=int, help="instead: canonical pass time against graph size, at these layer counts")
    parser.add_argument("--allocate", action="store_true", help="instead: the allocation sweep, serial against Ray")
    parser.add_argument("--repeats", type=int, default=3, help="with --allocate or --nodes: interleaved runs of each (medians reported)")
    parser.add_argument("--steps", nargs="*", choices=STEPS, default=list(STEPS), help="only these steps (synth-llm always runs)")
    parser.add_argument("--whole-7b-gptq", action="store_true", help="also GPTQ the whole-depth 7B shape (about an hour)")
    args = parser.parse_args()
    stamp = provenance()
    if args.nodes:
        return pass_scaling(args.nodes, stamp, args.repeats)
    if args.allocate:
        return allocate_sweep(args.repeats, stamp)
    work = Path(tempfile.mkdtemp(prefix="bitfold-scale-", dir=args.work))
    recipe, gptq = work / "rtn.toml", work / "gptq.toml"
    recipe.write_text(RECIPE)
    gptq.write_text(GPTQ_RECIPE)
    runs = [(shape, None) for shape in args.shapes] + [(SWEEP_SHAPE, n) for n in args.layers] + [("llama2-7b", n) for n in args.big_layers]
    rows = []
    try:
        for shape, layers in runs:
            cfg = shape_config(shape, num_hidden_layers=layers)
            params, depth = parameter_count(cfg), cfg["num_hidden_layers"]
            folder = work / f"{shape}-L{depth}"
            steps = [("synth-llm", ["synth-llm", shape, "-o", str(folder / "hf"), "--layers", str(depth)]),
                     ("optimize rtn w4 streamed", ["optimize", str(folder / "hf"), "-r", str(recipe), "-o", str(folder / "s" / "model.onnx"), "--stream"])]  # fmt: skip
            if params < GPTQ_MAX_PARAMS or args.whole_7b_gptq:
                steps.append(("optimize gptq w4 streamed", ["optimize", str(folder / "hf"), "-r", str(gptq), "-o", str(folder / "g" / "model.onnx"),
                                                           "--stream", "--calibration", str(folder / "calibration.npz"),
                                                           "--report", str(folder / "gptq_report.json")]))  # fmt: skip
            if params < IN_MEMORY_MAX_PARAMS:
                steps.append(("optimize rtn w4 in memory", ["optimize", str(folder / "hf"), "-r", str(recipe), "-o", str(folder / "m" / "model.onnx")]))
            steps = [(step, command) for step, command in steps if step == "synth-llm" or step in args.steps]
            for step, command in steps:
                if step == "optimize gptq w4 streamed":
                    _calibration(folder / "hf", folder / "calibration.npz")
                result = run_measured([sys.executable, "-m", "bitfold", *command])
                if result["returncode"] != 0:
                    raise SystemExit(f"{shape} L{depth} {step} failed:\n{result['stderr_tail']}")
                out = folder / {"synth-llm": "hf", "optimize rtn w4 streamed": "s", "optimize gptq w4 streamed": "g"}.get(step, "m")
                rows.append({"model": "synthetic", "variant": f"{shape} L{depth} {step}", "shape": shape, "layers": depth, "params": params,
                             "full_depth": layers is None, "commit": stamp["commit"], "machine": stamp["machine"],
                             "step": step, "wall_s": result["wall_s"], "peak_rss_gb": round(result["peak_rss_bytes"] / 1e9, 3),
                             "written_gb": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9, 3),
                             "trace": result["trace"][:: max(1, len(result["trace"]) // 200)]})  # fmt: skip
                if step == "optimize gptq w4 streamed":  # the pass's own split: Gram matrices, solves, quantized forward
                    notes = json.loads((folder / "gptq_report.json").read_text())["passes"][0]["notes"]
                    phases = next(n for n in notes if n.startswith("sequential GPTQ seconds: ")).split(": ", 1)[1].split(" (")[0]
                    rows[-1]["phases_s"] = {k: float(v) for k, v in (part.split() for part in phases.split(", "))}
                print({k: v for k, v in rows[-1].items() if k != "trace"}, flush=True)
                if step != "synth-llm":
                    shutil.rmtree(out)
                _write(rows, stamp)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _calibration(folder: Path, path: Path) -> None:
    """The GPTQ calibration file for the model in ``folder``: CALIBRATION prefills of seeded random token ids."""
    from bitfold.llm.export import export_llm
    from bitfold.llm.feeds import prefill

    model, cfg, _ = export_llm(folder)  # the graph only: its weights stay in the safetensors
    rng = np.random.default_rng(0)
    samples, tokens = CALIBRATION
    feeds = [prefill(model, rng.integers(0, cfg.vocab_size, (1, tokens))) for _ in range(samples)]
    np.savez(path, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})


NARROW = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)


def pass_scaling(depths: list[int], stamp: dict, repeats: int = 3) -> None:
    import gc
    import statistics
    import time

    import bitfold
    from bitfold.llm.export import export_llm
    from bitfold.llm.synthetic import write_synthetic
    from bitfold.passes.canonical import CANONICAL

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for depth in depths:
            folder = write_synthetic(Path(work) / f"L{depth}", shape_config(NARROW, num_hidden_layers=depth), dtype="fp32")
            start = time.perf_counter()
            model, _, _ = export_llm(folder)
            export_s = time.perf_counter() - start
            nodes = sum(1 for _ in model.graph)
            rows.append({"model": "synthetic", "variant": f"L{depth} export-llm graph", "layers": depth, "nodes": nodes,
                         "pass": "export-llm graph", "seconds": round(export_s, 4), "with_pipeline_s": round(export_s, 4)})  # fmt: skip
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in CANONICAL}
            for _ in range(repeats):  # interleaved: each pass once per round
                for name in CANONICAL:  # each alone, on the exported graph (they change nothing here but still visit it)
                    gc.collect()  # the previous call's garbage is not this one's time
                    start = time.perf_counter()
                    _, report = bitfold.optimize(model, [name])
                    runs[name].append((report.passes[0].seconds, time.perf_counter() - start))
            for name, times in runs.items():
                rows.append({"model": "synthetic", "variant": f"L{depth} {name}", "layers": depth, "nodes": nodes, "pass": name,
                             "seconds": round(statistics.median(t for t, _ in times), 4),
                             "with_pipeline_s": round(statistics.median(t for _, t in times), 4),
                             "runs_s": [round(t, 4) for t, _ in times]})  # fmt: skip
                print(rows[-1], flush=True)
    result = {**stamp, "protocol": f"narrow Llama {NARROW}, fp32, exported in process; each canonical pass alone through the "
              f"pipeline, {repeats} interleaved runs after a garbage collection: median seconds inside the pass (report) and of "
              "the whole call", "rows": rows}  # fmt: skip
    write_atomic(RESULTS / "scale_passes.json", json.dumps(result, indent=1).encode())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["pass"] for r in rows):
        mine = [r for r in rows if r["pass"] == name]
        fitted = slope(mine, "nodes", "seconds")
        ax.loglog([r["nodes"] for r in mine], [r["seconds"] for r in mine], "o-", label=f"{name} (slope {fitted:.2f})")
    ax.set(xlabel="nodes", ylabel="seconds", title="pass time against graph size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, RESULTS / "scale_passes.png")
    plt.close(fig)


RAY_START = "import ray; ray.init(include_dashboard=False, log_to_driver=False, logging_level='ERROR'); ray.shutdown()"


def allocate_sweep(repeats: int, stamp: dict) -> None:
    import bitfold
    from bitfold.eval.models import export_smollm2, smollm2
    from bitfold.eval.tasks import lee_windows, lm_feeds
    from bitfold.passes.canonical import CANONICAL

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, _ = bitfold.optimize(export_smollm2(128), list(CANONICAL))
        bitfold.save(model, work / "smollm2-128.onnx")
        feeds = list(lm_feeds(lee_windows(smollm2()[1], range(464, 480), 128)))
        np.savez(work / "calibration.npz", **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
        base = [sys.executable, "-m", "bitfold", "allocate", str(work / "smollm2-128.onnx"), "--bits", "3.5", "--formats", "int4,int3",
                "--method", "gptq", "--calibration", str(work / "calibration.npz"), "--exclude", "*lm_head*", "--samples", "2"]  # fmt: skip
        variants = {"serial": [], "ray 2 workers x 1 thread": ["--ray", "--workers", "2", "--worker-threads", "1"]}
        rows, outputs = [], {}
        for repeat in range(repeats):
            for variant, extra in variants.items():
                out = work / f"{len(rows)}"
                result = run_measured([*base, "-o", str(out) + ".toml", "--report", str(out) + ".json", *extra])
                if result["returncode"] != 0:
                    raise SystemExit(f"allocate {variant} failed:\n{result['stderr_tail']}")
                outputs.setdefault(variant, []).append((Path(str(out) + ".toml").read_text(), json.loads(Path(str(out) + ".json").read_text())))
                rows.append({"variant": variant, "repeat": repeat, "wall_s": result["wall_s"],
                             "peak_rss_gb": round(result["peak_rss_bytes"] / 1e9, 3)})  # fmt: skip
                print(rows[-1], flush=True)
            start = run_measured([sys.executable, "-c", RAY_START])
            rows.append({"variant": "ray start and stop", "repeat": repeat, "wall_s": start["wall_s"]})
    reference = outputs["serial"][0]
    identical = all(o == reference for found in outputs.values() for o in found)
    medians = {v: float(np.median([r["wall_s"] for r in rows if r["variant"] == v])) for v in (*variants, "ray start and stop")}
    result = {**stamp, "model": "SmolLM2-135M-Instruct",
              "protocol": "bitfold allocate --bits 3.5 --formats int4,int3 --method gptq --samples 2 on the 128-token "
              "export, calibration Lee 128-token windows 464-479, lm_head excluded; each run its own process, variants "
              "interleaved; wall seconds and VmHWM of the driver process (Ray workers not counted)",
              "identical_recipe_and_sensitivities": identical, "median_wall_s": medians,
              "ray_over_serial": medians["ray 2 workers x 1 thread"] / medians["serial"], "rows": rows}  # fmt: skip
    write_atomic(RESULTS / "scale_ray.json", json.dumps(result, indent=1).encode())
    print({k: result[k] for k in ("identical_recipe_and_sensitivities", "median_wall_s", "ray_over_serial")})


def _write(rows: list[dict], stamp: dict) -> None:
    path = RESULTS / "scale.json"
    if path.exists():
        rows = merge_rows(json.loads(path.read_text())["rows"], rows, order=ORDER)
    result = {
        **stamp,
        "protocol": "seeded random weights (bitfold synth-llm, bf16 safetensors, 1 GiB shards); int4 group 128, QDQ, "
        "lm_head float: RTN (quantize-weights), and GPTQ block by block (reconstruct, no learning steps, act_order, "
        f"no clipping) on {CALIBRATION[0]} x {CALIBRATION[1]} calibration tokens (seeded random ids); bitfold optimize on "
        "the model folder (exported on the fly); each step its own process: wall time and peak resident memory (VmHWM, "
        "the process's own high-water mark)",
        "rows": rows,
    }
    write_atomic(path, json.dumps(result, indent=1).encode())
    _plot(rows, RESULTS / "scale.png")


def slope(rows: list[dict], x: str, y: str) -> float | None:
    """Least-squares slope of log(y) on log(x) over ``rows`` (None below two distinct x)."""
    xs = np.log([r[x] for r in rows])
    if len(set(xs.round(6))) < 2:
        return None
    return float(np.polyfit(xs, np.log([r[y] for r in rows]), 1)[0])


COLORS = {"synth-llm": "tab:gray", "optimize rtn w4 streamed": "tab:blue", "optimize gptq w4 streamed": "tab:green",
          "optimize rtn w4 in memory": "tab:red"}  # fmt: skip


def _plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for step, color in COLORS.items():
        full = sorted((r for r in rows if r["step"] == step and r.get("full_depth", r["shape"] != SWEEP_SHAPE or r["layers"] == 22)),
                      key=lambda r: r["params"])  # fmt: skip
        for ax, key in ((axes[0], "peak_rss_gb"), (axes[1], "wall_s")):
            if full:
                s = slope(full, "params", key)
                ax.loglog([r["params"] for r in full], [r[key] for r in full], "o-", color=color,
                          label=f"{step}" + (f" (slope {s:.2f})" if s is not None else ""))  # fmt: skip
        for shape, marker in ((SWEEP_SHAPE, "o"), ("llama2-7b", "^")):
            sweep = sorted((r for r in rows if r["step"] == step and r["shape"] == shape), key=lambda r: r["layers"])
            if len(sweep) < 2 or step == "synth-llm":
                continue
            s = slope(sweep, "layers", "wall_s")
            axes[2].loglog([r["layers"] for r in sweep], [r["wall_s"] for r in sweep], marker + "-", color=color,
                           label=f"{step}, {shape} blocks, time" + (f" (slope {s:.2f})" if s is not None else ""))  # fmt: skip
            axes[2].loglog([r["layers"] for r in sweep], [r["peak_rss_gb"] * 100 for r in sweep], marker + "--", color=color, alpha=0.5,
                           label=f"{step}, {shape} blocks, peak GB x 100")  # fmt: skip
    axes[0].set(xlabel="parameters", ylabel="peak resident memory, GB", title="memory against model size")
    axes[1].set(xlabel="parameters", ylabel="wall time, s", title="time against model size")
    axes[2].set(xlabel="layers (at a fixed block shape)", ylabel="s (time), GB x 100 (memory)", title="against depth")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
