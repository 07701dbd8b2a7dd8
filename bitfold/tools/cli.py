"""The ``bitfold`` command line.

User mistakes (``BitfoldError``) print one sentence on stderr and exit with code 2; Ctrl-C exits with code 130;
internal bugs exit 1 with a traceback. Inputs are never modified; every output path is checked before any work and
written atomically, so a failure or an interruption leaves no partial file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bitfold.errors import BitfoldError, ExportError, InputSpecError

err = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
out = Console(width=None if sys.stdout.isatty() else 140)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except BitfoldError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted (Ctrl-C); files not yet complete were not written.", highlight=False, markup=False)
        return 130
    except Exception:  # an internal bug: show everything
        traceback.print_exc()
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitfold", description="Graph-rewriting compiler toolkit for cheap inference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("export", help="export a PyTorch module to ONNX")
    p.add_argument("factory", metavar="MODULE:FACTORY", help="importable module (or file.py) and a function returning an nn.Module")
    p.add_argument("--shape", action="append", required=True, metavar="NAME=DIMS", help="one per forward input, in order, e.g. x=1x3x224x224")
    p.add_argument("--dtype", action="append", default=[], metavar="NAME=DTYPE", help="input dtype (default float32), e.g. ids=int64")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.set_defaults(func=_export)

    p = sub.add_parser("inspect", help="op histogram, parameters, bytes, opsets, inputs and outputs")
    p.add_argument("model", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("passes", help="list the registered passes and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_passes)

    p = sub.add_parser("optimize", help="run a recipe (or a list of passes) over a model")
    p.add_argument("model", type=Path, help="an .onnx file, or a causal LM's Hugging Face folder, .gguf file or 'smollm2' "
                   "(exported as export-llm does, with genai_config.json and the tokenizer files written beside the output)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("-r", "--recipe", type=Path, help="recipe TOML file")
    group.add_argument("-p", "--passes", metavar="PASS[,PASS]", help="comma-separated pass names, default parameters")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--report", type=Path, help="write the per-pass report as JSON")
    p.add_argument("--verify", action="store_true", help="after every pass: onnx.checker, ORT run, error vs the input model")
    p.add_argument("--calibration", metavar="FILE.npz|SOURCE", help="calibration data: an .npz (samples on a leading axis), lee-text, lee-sentences, wiki-sentences or skimage-photos")
    p.add_argument("--max-error", type=float, metavar="E", help="leave the last step's most harmful layers float until the output error <= E (recipe key max_error)")
    p.add_argument("--stream", action="store_true", help="keep weights on disk: read each when a pass uses it, write each "
                   "rewritten one to a scratch file beside the output (memory follows the largest weight, not the model; "
                   "calibration and --verify still run the whole model)")
    _add_ray_options(p, "GPTQ's per-layer solves")
    _add_input_options(p)
    p.set_defaults(func=_optimize)

    p = sub.add_parser("debug", help="run a recipe pass by pass and locate the first pass and node that break accuracy")
    p.add_argument("model", type=Path)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("-r", "--recipe", type=Path, help="recipe TOML file")
    group.add_argument("-p", "--passes", metavar="PASS[,PASS]", help="comma-separated pass names, default parameters")
    p.add_argument("-o", "--output", required=True, type=Path, help="directory for report.json and report.html")
    p.add_argument("--tolerance", type=float, default=1e-3, help="relative output error a pass may add (default 1e-3)")
    p.add_argument("--calibration", metavar="FILE.npz|SOURCE", help="calibration data, as for optimize")
    p.add_argument("--reduce", action="store_true", help="shrink the culprit's input to the smallest subgraph still showing its "
                   "error; writes DIR/repro.onnx, repro_inputs.npz, repro.toml (and repro_calibration.npz if the pass calibrates)")
    _add_input_options(p)
    p.set_defaults(func=_debug)

    p = sub.add_parser("allocate", help="mixed-precision weights: per-layer sensitivity, integer program, a recipe")
    p.add_argument("model", type=Path)
    p.add_argument("--bits", type=float, required=True, help="average bits per weight, scales included (e.g. 3.5)")
    p.add_argument("--formats", default="int8,int4,int3", help="candidate formats, comma-separated, of: int8,int4,int3,int2,shift4,bcq3,bcq2,binary,2:4-int4")
    p.add_argument("--calibration", metavar="FILE.npz|SOURCE", required=True, help="samples the sensitivities are measured on")
    p.add_argument("-o", "--output", required=True, type=Path, help="the recipe TOML to write")
    p.add_argument("--method", choices=("rtn", "gptq", "reconstruct"), default="rtn",
                   help="quantizer measured and written into the recipe: rtn (default), gptq, or reconstruct (learned per block; one run per format)")
    p.add_argument("--format", choices=("fake", "qdq", "matmulnbits"), default="fake",
                   help="how the recipe stores the integer formats (default fake); matmulnbits holds int8 in groups of 128, costed so")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="layers left float (repeatable), e.g. '*lm_head*'")
    p.add_argument("--samples", type=int, default=4, help="calibration samples the sensitivities are measured on (default 4)")
    p.add_argument("--report", type=Path, help="write the sensitivities, costs and choice as JSON")
    _add_ray_options(p, "the per-layer sensitivity runs")
    p.set_defaults(func=_allocate)

    p = sub.add_parser("export-llm", help="export a causal LM (HF folder, .gguf, or smollm2) to a KV-cache ONNX graph")
    p.add_argument("source", metavar="SOURCE", help="a Hugging Face model folder (config.json + safetensors), a .gguf file, or 'smollm2'")
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--max-length", type=int, default=2048, help="context length written to genai_config.json (default 2048)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and activations (default fp32)")
    p.add_argument("--seq-len", type=int, help="instead: trace transformers into the fixed-length graph input_ids[1, N] -> "
                   "logits without a cache (smollm2 only; the graph earlier benchmarks use)")
    p.set_defaults(func=_export_llm)

    p = sub.add_parser("synth-llm", help="write a seeded random-weight causal LM of a given shape (for memory and time at scale)")
    p.add_argument("shape", metavar="SHAPE", help="one of: smollm2-135m, tinyllama-1.1b, llama2-7b; or a .json file of "
                   "config keys (model_type, hidden_size, ...; transformers' defaults fill the rest)")
    p.add_argument("-o", "--output", required=True, type=Path, help="a new folder (config.json + sharded safetensors)")
    p.add_argument("--layers", type=int, help="number of decoder layers instead of the shape's")
    p.add_argument("--vocab-size", type=int, help="vocabulary size instead of the shape's (e.g. to fit --tokenizer)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="weights on disk (default bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="copy this folder's tokenizer files (or 'smollm2': the built-in model's) beside the weights")
    p.set_defaults(func=_synth_llm)

    p = sub.add_parser("generate", help="generate text with a KV-cache model from export-llm")
    p.add_argument("model", type=Path, help="model.onnx with its tokenizer files beside it")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-length", type=int, help="cache capacity (default: prompt + new tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="no chat template, even when the tokenizer has one")
    p.add_argument("--backend", choices=("ort", "tvm"), default="ort", help="ort (default) or tvm (fixed-capacity cache, "
                   "bucketed prefill; the first prompt of a new bucket length builds once)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--kv-cache", choices=("float32", "float16"), help="ort: the cache's element type (default: the graph's); "
                   "float16 halves the bytes each decode step reads, attention then computes in float16")
    p.add_argument("--json", action="store_true", help="print the result (text, tokens, timings) as JSON instead of streaming")
    p.set_defaults(func=_generate)

    p = sub.add_parser("eval", help="evaluate a model on a real-model task")
    p.add_argument("model", type=Path)
    p.add_argument("--task", required=True, choices=["ppl", "smollm2-ppl", "effnet-agree", "minilm-cos"],
                   help="ppl: perplexity on --text with the tokenizer beside the model; smollm2-ppl: the Lee protocol")
    p.add_argument("--text", type=Path, help="for --task ppl: a UTF-8 text file")
    p.add_argument("--window", type=int, default=512, help="for --task ppl: tokens per window (default 512)")
    p.add_argument("--windows", type=int, help="for --task ppl: score only the first N windows")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)

    p = sub.add_parser("run", help="run a model on inputs")
    p.add_argument("model", type=Path)
    p.add_argument("--backend", default="ort", choices=["ort", "tvm"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--output", type=Path, help="write outputs to this .npz")
    _add_input_options(p)
    p.set_defaults(func=_run)

    p = sub.add_parser("bench", help="latency of one or more models; ratios against the first")
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--backend", default="ort", choices=["ort", "tvm"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iters", type=int, default=20, help="runs per model per round")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", action="store_true")
    _add_input_options(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("demo", help="optimize, verify and benchmark built-in models (no files, no network)")
    p.add_argument("--llm", action="store_true", help="also SmolLM2-135M: export, 4-bit GPTQ, generated text, perplexity "
                   "and decode speed of fp32 and 4-bit side by side (a few minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=2, help="threads for the LLM part (default 2)")
    p.set_defaults(func=_demo)
    return parser


def _add_ray_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help=f"spread {what} over a Ray cluster at ADDRESS "
                   "(e.g. auto, ray://head:10001); without one, a local cluster of this machine's cores. Same result as without")
    p.add_argument("--workers", type=int, help="with --ray: worker processes (default: the cluster's CPUs / --worker-threads)")
    p.add_argument("--worker-threads", type=int, default=1, help="with --ray: threads per worker (default 1)")


def _executor(args):
    """The executor --ray asks for (a context manager), or a null context."""
    if getattr(args, "ray", None) is None:
        if getattr(args, "workers", None) is not None:
            raise BitfoldError("--workers needs --ray.")
        return contextlib.nullcontext()
    from bitfold.parallel import RayExecutor, executing

    return executing(RayExecutor(args.ray or None, workers=args.workers, threads=args.worker_threads))


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", type=Path, help=".npz with one array per graph input (default: seeded random)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS", help="size of dynamic dimensions for random inputs")


def _feeds(args, model) -> dict:
    from bitfold.frontend.inputs import check_feeds, parse_shape, sample_feeds
    from bitfold.tools.files import load_arrays

    if args.inputs:
        feeds = load_arrays(args.inputs)
        check_feeds(model, feeds)
        return feeds
    return sample_feeds(model, dict(parse_shape(s) for s in args.shape))


def _calibration(args, model):
    """``--calibration`` as data: an .npz, or a built-in source sized by ``--shape`` and tokenized with the
    tokenizer files beside the model."""
    from bitfold.frontend.inputs import parse_shape
    from bitfold.quant.calibration import CalibrationData

    if not args.calibration:
        return None
    shapes = dict(parse_shape(s) for s in getattr(args, "shape", []))
    folder = args.model if args.model.is_dir() else args.model.parent  # a language model's folder holds its tokenizer
    return CalibrationData.from_source(args.calibration, model, shapes=shapes, model_dir=folder)


def _export(args) -> None:
    import numpy as np
    import torch

    from bitfold.frontend import from_torch, save
    from bitfold.frontend.inputs import parse_shape
    from bitfold.frontend.onnx_io import check_output

    check_output(args.output)
    module = _load_factory(args.factory)()
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"'{args.factory}' returned {type(module).__name__}, not a torch.nn.Module.")
    shapes = [parse_shape(s) for s in args.shape]
    dtypes = {}
    for item in args.dtype:
        name, _, dtype = item.partition("=")
        try:
            dtypes[name] = getattr(torch, np.dtype(dtype).name)
        except (TypeError, AttributeError):
            raise InputSpecError(f"--dtype '{item}' does not name a dtype; write e.g. --dtype ids=int64.") from None
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for name, shape in shapes:
        dtype = dtypes.get(name, torch.float32)
        if dtype.is_floating_point:
            inputs.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            inputs.append(torch.randint(0, 2, shape, generator=generator).to(dtype))
    model = from_torch(module, tuple(inputs), input_names=[n for n, _ in shapes])
    save(model, args.output)
    err.print(f"wrote {args.output}")


def _load_factory(spec: str):
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ExportError(f"'{spec}' is not MODULE:FACTORY; write e.g. mypkg.models:build or models.py:build.")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ExportError(f"python file '{path}' does not exist.")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise ExportError(f"cannot import '{target}': {e}; check the module name and PYTHONPATH.") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ExportError(f"'{target}' has no callable '{attr}'; name a function that returns the model.")
    return factory


def _inspect(args) -> None:
    from bitfold.frontend import load
    from bitfold.summary import summarize

    summary = summarize(load(args.model))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=str(args.model), show_header=False)
    for key in ("producer", "ir_version", "opsets", "nodes", "depth", "parameters", "parameter_bytes", "functions"):
        table.add_row(key, str(summary[key]))
    table.add_row("inputs", "\n".join(summary["inputs"]))
    table.add_row("outputs", "\n".join(summary["outputs"]))
    table.add_row("ops", "\n".join(f"{op}: {n}" for op, n in summary["ops"].items()))
    out.print(table)


def _passes(args) -> None:
    from bitfold.passes import describe, registered

    info = [describe(cls) for cls in registered().values()]
    if args.json:
        print(json.dumps(info, indent=2))
        return
    table = Table(title="bitfold passes")
    for column in ("pass", "family", "what it does", "parameters"):
        table.add_column(column)
    for p in info:
        params = "\n".join(f"{q['name']} = {q['default']!r}  ({q['type']})" for q in p["params"]) or "-"
        table.add_row(p["name"], p["family"], p["doc"], params)
    out.print(table)


def _optimize(args) -> None:
    from bitfold.frontend import load
    from bitfold.frontend.onnx_io import check_output
    from bitfold.pipeline import Recipe
    from bitfold.tools.files import refuse_overwrite, write_atomic

    refuse_overwrite(args.model, args.output)
    for path in (args.output, args.report):
        if path is not None:
            check_output(path)
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe.from_names(args.passes)
    llm = str(args.model) == "smollm2" or (args.model / "config.json").is_file() or args.model.suffix.lower() == ".gguf"
    if llm:  # a language model's own files: exported on the fly, weights read from them as passes need them
        from bitfold.llm.export import export_llm, write_sidecar

        model, cfg, folder = export_llm(args.model)
    else:
        model = load(args.model)
    if args.stream:  # say which steps will hold every weight anyway, before the work starts
        for step in recipe.steps:
            reason = step.build().holds_whole_model
            if reason:
                err.print(f"[yellow]note:[/] {escape(step.name)} does not stream: {escape(reason)}.", highlight=False, soft_wrap=True)
    with _streamed(model, args.output) if args.stream else contextlib.nullcontext(), _executor(args):
        report = _run_recipe(args, recipe, model)
    if llm:
        write_sidecar(args.output, folder, cfg, max_length=2048)
    if args.report:
        write_atomic(args.report, report.to_json().encode())
    err.print(report.table())
    err.print(f"wrote {args.output}")


@contextlib.contextmanager
def _streamed(model, output: Path):
    """Weights read from disk when used and rewritten ones stored in a scratch folder beside ``output`` (in its
    nearest existing folder; removed at the end, whatever happens)."""
    import shutil
    import tempfile

    from bitfold.frontend.stream import WeightStore, read_on_demand, storing

    read_on_demand(model)
    beside = next(p for p in (output.parent, *output.parent.parents) if p.exists())  # create no folder ourselves
    scratch = Path(tempfile.mkdtemp(prefix=f".{output.name}.stream.", dir=beside))
    store = None
    try:
        store = WeightStore(scratch)
        with storing(store):
            yield store
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _run_recipe(args, recipe, model):
    """Run ``recipe`` on ``model`` with a progress bar, save the result; returns the pipeline's report."""
    from bitfold.frontend import save
    from bitfold.pipeline import Pipeline, Recipe, Step

    feeds = _feeds(args, model) if args.verify or args.inputs or args.max_error is not None else None
    calibration = _calibration(args, model)
    if args.max_error is not None:  # the exclusion loop on the last step, as its recipe key max_error would
        last = recipe.steps[-1]
        recipe = Recipe((*recipe.steps[:-1], Step(last.name, last.params, args.max_error)))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("optimize", total=len(recipe.steps))
        pipeline = Pipeline(
            recipe,
            verify=args.verify,
            on_pass_start=lambda i, n, p: bar.update(task, description=f"[{i + 1}/{n}] {p.name}"),
            on_pass_end=lambda record: bar.advance(task),
        )
        model, report = pipeline.run(model, calibration, feeds=feeds)
    for record in report.passes:
        for note in record.notes if "max_error" in record.params else ():
            err.print(f"{record.name}: {note}")
    save(model, args.output, external_data=True if args.stream else None)  # streamed: tensor by tensor, never one proto
    return report


def _debug(args) -> None:
    import numpy as np

    from bitfold.frontend import load, save
    from bitfold.frontend.onnx_io import check_output
    from bitfold.pipeline import Recipe
    from bitfold.tools.debug import debug, write_html
    from bitfold.tools.files import save_arrays, write_atomic

    check_output(args.output, folder=True)
    recipe = Recipe.load(args.recipe) if args.recipe else Recipe.from_names(args.passes)
    model = load(args.model)
    calibration = _calibration(args, model)
    steps = recipe.to_list()
    report = debug(model, steps, _feeds(args, model), calibration, args.tolerance, reduce_culprit=args.reduce)
    args.output.mkdir(parents=True, exist_ok=True)
    write_atomic(args.output / "report.json", report.to_json().encode())
    write_html(report, args.output / "report.html", f"bitfold debug: {args.model.name}")
    if report.repro is not None:
        save(report.repro.model, args.output / "repro.onnx")
        save_arrays(args.output / "repro_inputs.npz", report.repro.feeds)
        write_atomic(args.output / "repro.toml", Recipe.from_list([steps[report.culprit]]).to_toml().encode())
        if report.repro.calibration is not None:
            samples = list(report.repro.calibration)
            save_arrays(args.output / "repro_calibration.npz", {k: np.stack([s[k] for s in samples]) for k in samples[0]})
    err.print(report.floor_note())
    for p in report.passes:
        err.print(f"{p.index:3d} {p.name:28s} own rel. error {p.own_rel:.3g}")
        for u in p.unmatched:
            err.print(f"      not matched ({u.rule}, {u.node}): {u.reason}")
    if report.culprit is not None:
        err.print(f"first pass over {args.tolerance:g}: {report.passes[report.culprit].name} (step {report.culprit}); first node: {report.first_node}")
        if report.repro is not None:
            err.print(f"reduced to {report.repro.nodes} nodes (error {report.repro.error:.3g}): {args.output / 'repro.onnx'}")
        elif report.reduce_note:
            err.print(f"not reduced: {report.reduce_note}")
    else:
        err.print(f"no pass exceeds {args.tolerance:g}")
    err.print(f"wrote {args.output / 'report.html'}")


def _allocate(args) -> None:
    import json

    from bitfold.frontend import load
    from bitfold.frontend.onnx_io import check_output
    from bitfold.tools.allocate import measure, solve
    from bitfold.tools.files import refuse_overwrite, write_atomic

    refuse_overwrite(args.model, args.output)
    for path in (args.output, args.report):
        if path is not None:
            check_output(path)
    model = load(args.model)
    calibration = _calibration(args, model)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    with _executor(args):
        measured = measure(model, calibration, formats, args.samples, args.exclude, {"method": args.method, "format": args.format})
    allocation = solve(measured, args.bits)
    write_atomic(args.output, allocation.recipe(method=args.method, exclude=args.exclude).to_toml().encode())
    if args.report:
        data = {"layers": allocation.layers, "formats": allocation.formats, "sensitivity": allocation.sensitivity.tolist(),
                "cost_bits": allocation.cost.tolist(), "choice": [allocation.formats[c] for c in allocation.choice],
                "bits_per_weight": allocation.bits_per_weight}  # fmt: skip
        write_atomic(args.report, json.dumps(data, indent=2).encode())
    counts = {f: int((allocation.choice == i).sum()) for i, f in enumerate(allocation.formats)}
    err.print(f"{allocation.bits_per_weight:.3f} bits per weight; layers per format: {counts}")
    err.print(f"wrote {args.output}")


def _run(args) -> None:
    from bitfold.backends import compile
    from bitfold.frontend import load
    from bitfold.frontend.onnx_io import check_output
    from bitfold.tools.files import save_arrays

    if args.output is not None:
        check_output(args.output)
    model = load(args.model)
    outputs = compile(model, args.backend, args.device).run(_feeds(args, model))
    if args.output:
        save_arrays(args.output, outputs)
        err.print(f"wrote {args.output}")
    for name, value in outputs.items():
        out.print(f"{name}: {value.dtype}{list(value.shape)}  mean={value.mean():.6g} absmax={abs(value).max():.6g}")


def _bench(args) -> None:
    from bitfold.backends import compile
    from bitfold.frontend import load
    from bitfold.tools.bench import compare

    models = [load(path) for path in args.models]
    feeds = [_feeds(args, m) for m in models]
    options = {"spinning": len(models) == 1} if args.backend == "ort" else {}
    runnables = [compile(m, args.backend, args.device, **options) for m in models]
    stats = compare(runnables, feeds, warmup=args.warmup, rounds=args.rounds, iters=args.iters)
    rows = [{"model": str(path), **s} for path, s in zip(args.models, stats, strict=True)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    _print_table(f"{args.backend} latency ({runnables[0].device}), interleaved rounds", ("model", "p50 ms", "p90 ms", "mean ms", "vs first"),
                 [(r["model"], f"{r['p50']:.3f}", f"{r['p90']:.3f}", f"{r['mean']:.3f}", f"{r['ratio']:.2f}×") for r in rows])  # fmt: skip


def _print_table(title: str, columns: tuple[str, ...], rows) -> None:
    """A rich table, the first column left-aligned, the others right-aligned."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column == columns[0] else "right")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _export_llm(args) -> None:
    from bitfold.frontend import save
    from bitfold.frontend.onnx_io import check_output

    check_output(args.output)
    if args.seq_len is not None:
        if args.source != "smollm2":
            raise BitfoldError("--seq-len (the fixed-length traced graph) is only for 'smollm2'; drop it to export a KV-cache graph.")
        from bitfold.eval.models import export_smollm2

        with err.status(f"tracing smollm2 (seq_len {args.seq_len})..."):
            model = export_smollm2(args.seq_len)
        save(model, args.output)
        err.print(f"wrote {args.output}")
        return
    from bitfold.llm.export import export_llm, write_llm

    if args.max_length < 1:
        raise BitfoldError(f"--max-length must be positive, got {args.max_length}.")
    with err.status(f"exporting {args.source}..."):
        model, cfg, folder = export_llm(args.source, args.dtype)
        write_llm(model, args.output, folder, cfg, args.max_length)
    err.print(f"wrote {args.output} ({cfg.model_type}, {cfg.num_layers} layers, {args.dtype}) with genai_config.json and the tokenizer files")


def _synth_llm(args) -> None:
    from bitfold.frontend.onnx_io import check_output
    from bitfold.llm.synthetic import parameter_count, shape_config, write_synthetic

    check_output(args.output, folder=True)
    if args.output.exists():
        raise BitfoldError(f"'{args.output}' exists; give a new folder for the synthetic model.")
    for flag, value in (("--layers", args.layers), ("--vocab-size", args.vocab_size)):
        if value is not None and value < 1:
            raise BitfoldError(f"{flag} must be positive, got {value}.")
    shape = args.shape
    if shape.endswith(".json"):
        if not Path(shape).is_file():
            raise BitfoldError(f"shape file '{shape}' does not exist; give a shape name or a .json file of config keys.")
        try:
            shape = json.loads(Path(shape).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BitfoldError(f"'{args.shape}' is not valid JSON ({e.msg} at line {e.lineno}).") from None
        except (OSError, UnicodeDecodeError) as e:
            raise BitfoldError(f"'{args.shape}' could not be read as UTF-8 JSON ({type(e).__name__}).") from None
        if not isinstance(shape, dict):
            raise BitfoldError(f"'{args.shape}' must hold one JSON object of config keys.")
    cfg = shape_config(shape, num_hidden_layers=args.layers, vocab_size=args.vocab_size)
    tokenizer = None
    if args.tokenizer is not None:
        tokenizer = _tokenizer_folder(args.tokenizer, cfg["vocab_size"])
    params = parameter_count(cfg)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(f"writing {params / 1e9:.2f}B parameters", total=1.0)
        write_synthetic(args.output, cfg, dtype=args.dtype, seed=args.seed, tokenizer=tokenizer,
                        progress=lambda done, total: bar.update(task, completed=done / total))  # fmt: skip
    err.print(f"wrote {args.output} ({cfg['model_type']}, {cfg['num_hidden_layers']} layers, {params:,} parameters, {args.dtype})")


def _tokenizer_folder(source: str, vocab_size: int) -> Path:
    """The folder whose tokenizer files a synthetic model gets; refused when its vocabulary exceeds the model's."""
    if source == "smollm2":
        from bitfold.llm.builtin import smollm2_folder

        folder = smollm2_folder()
    else:
        folder = Path(source)
    if not (folder / "tokenizer.json").is_file():
        raise BitfoldError(f"'{folder}' has no tokenizer.json; give a Hugging Face model folder or 'smollm2'.")
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    except Exception as e:  # the tokenizers library raises its own exception type  # noqa: BLE001
        raise BitfoldError(f"'{folder / 'tokenizer.json'}' could not be read as a tokenizer: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if size > vocab_size:
        raise BitfoldError(f"the tokenizer in '{folder}' has {size} tokens but the model's vocabulary is {vocab_size}; "
                           "use a tokenizer that fits or a shape with a larger vocabulary.")  # fmt: skip
    return folder


def _generate(args) -> None:
    from bitfold.llm.generate import generate

    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise BitfoldError(f"prompt file '{args.prompt_file}' does not exist.")
        prompt = args.prompt_file.read_text(encoding="utf-8")
    else:
        prompt = args.prompt
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise BitfoldError("--max-new-tokens must be ≥ 1, --temperature ≥ 0 and --top-p in (0, 1].")

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(args.model, prompt, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed, raw=args.raw, threads=args.threads,
                      backend=args.backend, kv_cache=args.kv_cache, on_text=None if args.json else show)  # fmt: skip
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return
    sys.stdout.write("\n")
    err.print(f"prompt {result.prompt_tokens} tokens, prefill {result.prefill_ms:.1f} ms; "
              f"{len(result.tokens)} new tokens, decode {result.decode_tokens_per_s:.1f} tokens/s")  # fmt: skip


def _eval(args) -> None:
    from bitfold.eval.tasks import TASKS, text_ppl
    from bitfold.frontend import load

    if args.task == "ppl":
        from bitfold.llm.generate import load_tokenizer

        if args.text is None or not args.text.is_file():
            raise BitfoldError("--task ppl needs --text FILE, an existing UTF-8 text file.")
        if args.window < 2:
            raise BitfoldError(f"--window must be at least 2 tokens, got {args.window}.")
        try:
            text = args.text.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise BitfoldError(f"'{args.text}' is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv.") from None
        tokenizer = load_tokenizer(args.model.parent)
        model = load(args.model)
        with err.status("evaluating perplexity..."):
            result = text_ppl(model, tokenizer, text, args.window, args.windows)
    else:
        with err.status(f"evaluating {args.task}..."):
            result = TASKS[args.task](load(args.model))
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return
    detail = ", ".join(f"{k}={v}" for k, v in result.detail.items())
    out.print(f"{result.task}: {result.metric} = {result.value:.4f}  ({detail})")


def _demo(args) -> None:
    from bitfold.tools.demo import run_demo

    with err.status("exporting, optimizing, verifying and benchmarking built-in models..."):
        rows = run_demo()
    table = Table(title="bitfold demo: canonical recipe, verified with ONNX Runtime")
    for column in ("model", "nodes", "ops removed", "params KB", "max rel err", "ORT p50 ms", "speedup"):
        table.add_column(column, justify="left" if column in ("model", "ops removed") else "right")
    for r in rows:
        table.add_row(
            r["model"],
            f"{r['nodes_before']} → {r['nodes_after']}",
            _top_ops(r["ops_removed"]),
            f"{r['kb_before']:.1f} → {r['kb_after']:.1f}",
            f"{r['max_rel_err']:.1e}",
            f"{r['p50_ms_before']:.3f} → {r['p50_ms_after']:.3f}",
            f"{r['speedup']:.2f}×",
        )
    out.print(table)
    if args.llm:
        _demo_llm(args)


def _demo_llm(args) -> None:
    import tempfile

    from bitfold.tools.demo_llm import PROMPT, run_llm_demo

    with tempfile.TemporaryDirectory(prefix="bitfold-demo-") as tmp, err.status("SmolLM2...") as status:
        rows = run_llm_demo(Path(tmp), threads=args.threads, status=lambda text: status.update(text + "..."))
    _print_table(f"SmolLM2-135M: fp32 and 4-bit, {args.threads} threads, ONNX Runtime, KV cache",
                 ("model", "file MB", "Lee ppl (windows 0-3)", "prefill ms", "decode tok/s"),
                 [(r["model"], f"{r['bytes'] / 1e6:.0f}", f"{r['ppl']:.2f}", f"{r['prefill_ms']:.0f}", f"{r['decode_tok_s']:.0f}")
                  for r in rows])  # fmt: skip
    out.print(f"[bold]prompt:[/] {PROMPT}", highlight=False)
    for r in rows:
        out.print(f"[bold]{r['model']}:[/] {r['text']}", highlight=False)


def _top_ops(ops: dict[str, int], k: int = 3) -> str:
    ranked = sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{op}×{n}" for op, n in ranked[:k])
    return text + (f", +{len(ranked) - k} more" if len(ranked) > k else "")


if __name__ == "__main__":
    sys.exit(main())
