"""Low-bit weight solvers on SmolLM2-135M at W4, W3 and W2 (g128), on the calibration corpus and a held-out one:
GPTQ, QuantEase and learned block reconstruction (the ``reconstruct`` pass), all on the same symmetric grid; and GPTQ
sequential: GPTQ on what each decoder layer reads in the already-quantized model (reconstruct's start, nothing learned),
also true-sequential (each layer's linears in graph order, each on its input computed with the ones before it quantized),
and either with the float model's inputs summed into each Gram matrix (``float_inputs``, its weight chosen on Lee
windows 16-31, which neither calibration nor the scores below read).

RTN rows round each weight to the nearest point of the same grid (no clipping, no calibration): the baseline whose gap
to FP32 the docs table reports each row closing, on Lee and held out. GPTQ and QuantEase run with the quantization table's GPTQ settings (act-order, sink weight 64, output clip, damp
0.003; the strongest GPTQ there): QuantEase starts from GPTQ's solution and keeps its scales, so any difference is
the coordinate descent's. ``reconstruct`` runs with its defaults (GPTQ with the same settings on what each decoder
layer reads in the quantized model, then learned rounding); ``--tune STEPS`` rows ("+ end to end") add that many
end-to-end steps on every scale against the float model's logits; with ``--tune-weights`` ("+ end to end, codes
learned") the codes learn too (a latent value per weight, its rounded integer code or its signs taken
straight-through); ``--tune-schedule cosine`` (", cosine") decays the learning rates along a half cosine;
``--tune-holdout N`` (", early stopping") keeps N calibration windows out of the end-to-end phase and keeps the step
where their KL was lowest (checked every 16 steps); ``--start-windows N`` (", start on N windows") gives the per-block
phase (GPTQ's start) the first N calibration windows and the end-to-end phase all of them.
``--methods sequential-tune`` ("GPTQ sequential + end to end") skips the per-block phase: GPTQ sequential, then the
``--tune`` steps. Sign-plane rows (``--binary 1 2 pb ternary``): the binarize pass with GPTQ rounding against
reconstruct's binary grid (bits in the JSON: the number of planes), PB-LLM (a tenth of the weights int8, by Hessian
salience) and BitNet b1.58's ternary grid with γ per output the same way (the binarize and ternarize passes with GPTQ
rounding against reconstruct's). Binary-code rows
(``--shiftadd Q``): ShiftAddLLM's format (α a sum of two powers of two) through the shiftadd pass with the same
GPTQ settings against reconstruct's ``bcq`` grid (bits: the number of planes); with ``--shiftadd-sequential``
("ShiftAddLLM (GPTQ) sequential + end to end") the learned row skips the per-block phase as ``sequential-tune`` does:
the shiftadd solver on what each decoder layer reads in the already-quantized model, then the ``--tune`` steps. Calibration: the built-in
``lee-text`` source (Lee background windows 115-146); ``--calibration large``: Lee background windows 32-146 (115
windows, 58,880 tokens; windows 16-31 stay free for choosing settings), every row of that protocol in its own results
file (lowbit_smollm2_large.json). Scored: Lee windows 0-15 (8,176 tokens) and the held-out Lee
test corpus (9 windows of 512, never used for calibration or for choosing a default). lm_head stays fp32. Weights
are emitted as ``fake`` (the dequantized values in float): the rows measure the weights alone.
Writes benchmarks/results/lowbit_smollm2.json (``--calibration large``: lowbit_smollm2_large.json), one row at a time
(a rerun replaces its own rows), and a .png beside it: each reconstruct row's per-block error at its start and
learned.

    python benchmarks/lowbit_smollm2.py [--bits 4 3 2] [--methods rtn gptq gptq-sequential[-float] gptq-true-sequential[-float] quantease reconstruct] [--asymmetric] [--binary 1 2]
                                        [--shiftadd 3 2 [--shiftadd-sequential]] [--tune STEPS [--tune-weights] [--tune-lr LR] [--tune-schedule cosine] [--tune-holdout N]]
                                        [--start-windows N] [--suffix TEXT] [--learned-only] [--calibration large]
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import bitfold  # noqa: E402
from bitfold.eval.models import export_smollm2, smollm2  # noqa: E402
from bitfold.eval.tasks import CALIB_WINDOWS, heldout_windows, lee_windows, lm_feeds, perplexity, smollm2_ppl  # noqa: E402
from bitfold.passes.canonical import CANONICAL  # noqa: E402
from bitfold.passes.learned.reconstruct import ReconstructConfig  # noqa: E402
from bitfold.quant.calibration import CalibrationData  # noqa: E402
from bitfold.tools.bench import merge_rows, provenance  # noqa: E402
from bitfold.tools.files import save_figure, write_atomic  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: calibration protocols: the Lee background windows each calibrates on, and the results file its rows go to (one
#: file per protocol: rows calibrated on different data are never in one table)
CALIBRATION = {"standard": (CALIB_WINDOWS, "lowbit_smollm2"), "large": (range(32, 147), "lowbit_smollm2_large")}
GPTQ = {"act_order": True, "sink_weight": 64.0, "clip": "output", "damp": 0.003}
NAMES = {"rtn": "RTN", "gptq": "GPTQ", "gptq-sequential": "GPTQ sequential", "gptq-sequential-float": "GPTQ sequential + float inputs",
         "gptq-true-sequential": "GPTQ true-sequential", "gptq-true-sequential-float": "GPTQ true-sequential + float inputs",
         "quantease": "QuantEase", "reconstruct": "reconstruct", "sequential-tune": "GPTQ sequential"}
#: GPTQ layer by layer on what each decoder layer reads in the already-quantized model: reconstruct's GPTQ start
#: with nothing learned (no clipping gains, no rounding steps)
SEQUENTIAL = {"name": "reconstruct", "clip_steps": 0, "round_steps": 0, "true_sequential": False}
#: the same with each decoder layer's linears solved in graph order, each on its input computed with the ones before
#: it already quantized
TRUE_SEQUENTIAL = {**SEQUENTIAL, "true_sequential": True}
#: either with each Gram matrix also summing what the float model gives that input, weighted FLOAT_INPUTS: chosen
#: for true-sequential among 1, 3 and 10 on Lee windows 16-31 (neither calibrated on nor scored here)
FLOAT_INPUTS = 3.0
SEQUENTIAL_STEPS = {"gptq-sequential": SEQUENTIAL, "sequential-tune": {"name": "reconstruct", "clip_steps": 0, "round_steps": 0}, "gptq-sequential-float": {**SEQUENTIAL, "float_inputs": FLOAT_INPUTS},
                    "gptq-true-sequential": TRUE_SEQUENTIAL, "gptq-true-sequential-float": {**TRUE_SEQUENTIAL, "float_inputs": FLOAT_INPUTS}}
#: Sign planes (1 bit per weight per plane, α per output): the binarize pass with GPTQ rounding (its strongest
#: solver here) against reconstruct's learned α and signs.
#: PB-LLM (one sign plane, a tenth of the weights int8 by Hessian salience, as the multless table's row) and BitNet
#: b1.58's ternary grid with γ per output: the binarize and ternarize passes with GPTQ rounding against reconstruct's
#: learned rows. Keyed by what --binary names: 1 and 2 sign planes, pb, ternary.
SOLVER = {"keep_ends": False, "gptq": True, "act_order": True, "sink_weight": 64.0, "damp": 0.003}
BINARY = {
    "binarize (GPTQ), 1 plane": ("1", {"name": "binarize", **SOLVER}),
    "reconstruct binary, 1 plane": ("1", {"name": "reconstruct", "grid": "binary"}),
    "binarize (GPTQ), 2 planes": ("2", {"name": "binarize", "planes": 2, **SOLVER}),
    "reconstruct binary, 2 planes": ("2", {"name": "reconstruct", "grid": "binary", "planes": 2}),
    "PB-LLM (GPTQ, Hessian salience), ρ 0.1": ("pb", {"name": "binarize", "salient_ratio": 0.1, "salience": "hessian", **SOLVER}),
    "reconstruct PB-LLM, ρ 0.1": ("pb", {"name": "reconstruct", "grid": "binary", "salient_ratio": 0.1, "salience": "hessian"}),
    "ternarize (GPTQ), γ per output": ("ternary", {"name": "ternarize", "per_channel": True, **SOLVER}),
    "reconstruct ternary, γ per output": ("ternary", {"name": "reconstruct", "grid": "ternary"}),
}
#: the JSON's bits of those rows: sign planes (PB-LLM: its one plane), 2 for ternary (as TernaryMatMul stores a trit)
BINARY_BITS = {"1": 1, "2": 2, "pb": 1, "ternary": 2}
#: reconstruct's note per block: relative output error at the start → after the scale phase → after rounding
BLOCK_NOTE = re.compile(r"output error ([\d.e+-]+) \(start\) → ([\d.e+-]+) \(clipping\) → ([\d.e+-]+) \(rounding\)")
#: with no per-block steps (the end-to-end phase alone learns): the error each block starts from, which it keeps
START_NOTE = re.compile(r"output error ([\d.e+-]+) from the start, no per-block steps")
TUNE_NOTE = re.compile(r"end to end \((\d+) steps(?:, weights learned)?(?:, \d+ float vectors learned)?\): kl ([\d.e+-]+) → ([\d.e+-]+)(?:.*; (\d+) of (\d+) codes changed)?")
HOLDOUT_NOTE = re.compile(r"held out \((\d+) samples\) ([^;]+); kept step (\d+)")
CHECK = re.compile(r"(\d+): ([\d.e+-]+)")
#: reconstruct's note on where its time went: seconds collecting the first inputs, in the blocks, end to end
SECONDS_NOTE = re.compile(r"^seconds: .*blocks")
PHASE = re.compile(r"(inputs|blocks|end to end) ([\d.]+)")
#: ShiftAddLLM binary codes (q sign planes, α per plane and 128 inputs, α a sum of two powers of two): the shiftadd
#: pass with the GPTQ settings above against reconstruct's learned α and codes.
SHIFTADD = {"name": "shiftadd", "group_size": 128, "keep_ends": False, "act_order": True, "sink_weight": 64.0, "damp": 0.003}
def _tuned_name(variant: str) -> str:
    """A sign-plane row's variant with the end-to-end phase: 'reconstruct binary, 1 plane' → 'reconstruct binary + end to end, 1 plane'."""
    return variant.replace(",", " + end to end,", 1)


ORDER = (["FP32"] + [f"{name} W{bits} g128{grid}" for bits in (4, 3, 2) for grid in ("", " asym")
                     for name in [*dict.fromkeys(NAMES.values()), *(f"{base} + end to end{codes}{decay}{stop}{start}{steps}" for base in ("reconstruct", "GPTQ sequential")
                                                                     for codes in ("", ", codes learned") for decay in ("", ", cosine")
                                                                     for stop in ("", ", early stopping") for start in ("", *(f", start on {n} windows" for n in (16, 32, 64)))
                                                                     for steps in ("", *(f", {n} steps" for n in (192, 256))))]]
         + [v for variant in BINARY for v in (variant, _tuned_name(variant)) if v == variant or "reconstruct" in v]
         + [f"{name} q{q} g128" for q in (4, 3, 2) for name in ("ShiftAddLLM (GPTQ)", "reconstruct bcq", "reconstruct bcq + end to end",
                                                           "reconstruct bcq + end to end, codes learned",
                                                           *(f"ShiftAddLLM (GPTQ) sequential + end to end{decay}{stop}{steps}" for decay in ("", ", cosine")
                                                             for stop in ("", ", early stopping") for steps in ("", *(f", {n} steps" for n in (192, 256)))))])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--methods", nargs="*", choices=list(NAMES), default=[m for m in NAMES if m != "sequential-tune"], help="integer-grid rows (none: --methods)")
    parser.add_argument("--asymmetric", action="store_true", help="the integer rows on the asymmetric grid (a zero point per group)")
    parser.add_argument("--binary", nargs="*", choices=["1", "2", "pb", "ternary"], default=["1", "2"],
                        help="sign-plane rows to run: 1 or 2 planes, pb (PB-LLM), ternary (none: --binary)")  # fmt: skip
    parser.add_argument("--shiftadd", nargs="*", choices=[2, 3, 4], type=int, default=[], help="binary-code rows (sign planes q) to run")
    parser.add_argument("--shiftadd-sequential", action="store_true",
                        help="binary-code rows: the learned row without per-block steps (the solver layer by layer, then --tune steps)")
    parser.add_argument("--learned-only", action="store_true", help="sign-plane and binary-code rows: reconstruct's only (the solvers' rows kept)")
    parser.add_argument("--tune", type=int, default=0, metavar="STEPS",
                        help="reconstruct rows: also this many end-to-end steps on the scales (variant '+ end to end')")  # fmt: skip
    parser.add_argument("--tune-weights", action="store_true", help="reconstruct rows (integer and binary-code) with --tune: the codes learn end to end too")
    parser.add_argument("--tune-lr", type=float, default=None, metavar="LR", help="with --tune: the scale factors' learning rate (default: the pass's)")
    parser.add_argument("--tune-schedule", choices=["constant", "cosine"], default="constant",
                        help="with --tune: learning rates held, or decayed along a half cosine (variant ', cosine')")  # fmt: skip
    parser.add_argument("--tune-holdout", type=int, default=0, metavar="N",
                        help="with --tune: calibration windows held out of the end-to-end phase to pick its step (variant ', early stopping')")  # fmt: skip
    parser.add_argument("--tune-weight-lr", type=float, default=None, metavar="LR",
                        help="with --tune-weights: the latent codes' learning rate (default: the pass's)")  # fmt: skip
    parser.add_argument("--start-windows", type=int, default=0, metavar="N",
                        help="with --tune: the per-block phase (GPTQ's start) reads the first N calibration windows, the end-to-end phase all (variant ', start on N windows')")  # fmt: skip
    parser.add_argument("--hold-activations", action="store_true",
                        help="with --tune: every block's activations held through a step's backward pass, not recomputed (tune_recompute = false: the same scales, less time per step, more memory)")  # fmt: skip
    parser.add_argument("--suffix", default="", metavar="TEXT",
                        help="with --tune: appended to the variant of every integer and binary-code '+ end to end' row: keeps rows that differ in a setting the name does not carry (e.g. ', 192 steps')")  # fmt: skip
    parser.add_argument("--calibration", choices=list(CALIBRATION), default="standard",
                        help="calibration windows: the built-in lee-text source's 32 (standard) or Lee windows 32-146 (large, its own results file)")  # fmt: skip
    args = parser.parse_args()
    if args.tune_weights and not args.tune:
        parser.error("--tune-weights belongs to the end-to-end phase: give --tune STEPS")
    if args.tune_weight_lr is not None and not args.tune_weights:
        parser.error("--tune-weight-lr needs --tune-weights")
    if "sequential-tune" in args.methods and not args.tune:
        parser.error("--methods sequential-tune is GPTQ sequential followed by the end-to-end phase: give --tune STEPS")
    if (args.tune_lr is not None or args.tune_schedule != "constant" or args.tune_holdout) and not args.tune:
        parser.error("--tune-lr, --tune-schedule and --tune-holdout belong to the end-to-end phase: give --tune STEPS")
    codes = {"tune_weights": True} if args.tune_weights else {}
    if args.tune_lr is not None:
        codes["tune_lr"] = args.tune_lr
    if args.tune_schedule != "constant":
        codes["tune_schedule"] = args.tune_schedule
    if args.tune_holdout:
        codes["tune_holdout"] = args.tune_holdout
    if args.tune_weight_lr is not None:
        codes["tune_weight_lr"] = args.tune_weight_lr
    if args.hold_activations:
        if not args.tune:
            parser.error("--hold-activations belongs to the end-to-end phase: give --tune STEPS")
        codes["tune_recompute"] = False
    if args.shiftadd_sequential and not (args.tune and args.shiftadd):
        parser.error("--shiftadd-sequential is the shiftadd solver followed by the end-to-end phase: give --shiftadd Q and --tune STEPS")
    if args.suffix and not args.tune:
        parser.error("--suffix names end-to-end rows: give --tune STEPS")
    if args.start_windows:
        if not args.tune:
            parser.error("--start-windows splits the windows between the per-block and the end-to-end phase: give --tune STEPS")
        codes["start_samples"] = args.start_windows
    stamp = provenance()
    _, tokenizer = smollm2()
    heldout = heldout_windows(tokenizer)
    fp32, _ = bitfold.optimize(export_smollm2(), list(CANONICAL))
    windows, results = CALIBRATION[args.calibration]
    # statistics collected once, reused by every row
    calibration = (CalibrationData.from_source("lee-text", fp32) if args.calibration == "standard"
                   else CalibrationData(list(lm_feeds(lee_windows(tokenizer, windows)))))  # fmt: skip
    write = functools.partial(_write, stamp=stamp, name=results, windows=windows)
    rows = [{"model": "SmolLM2", "variant": "FP32", "method": "-", "bits": 32, "ppl": smollm2_ppl(fp32).value, "ppl_heldout": perplexity(fp32, heldout)[0]}]
    print(rows[-1], flush=True)
    write(rows)
    runs = []
    # what an end-to-end row's variant says of its settings (integer and binary-code rows alike)
    tuned = (" + end to end" + (", codes learned" if args.tune_weights else "")
             + (", cosine" if args.tune_schedule == "cosine" else "")
             + (", early stopping" if args.tune_holdout else "")
             + (f", start on {args.start_windows} windows" if args.start_windows else "") + args.suffix) if args.tune else ""  # fmt: skip
    for bits in args.bits:
        for method in args.methods:
            tune = {"tune_steps": args.tune, **codes}
            step = ({"name": "reconstruct", **tune} if method == "reconstruct"
                    else {**SEQUENTIAL_STEPS[method], **tune} if method == "sequential-tune"
                    else {"name": "quantize-weights", "method": "rtn"} if method == "rtn"
                    else SEQUENTIAL_STEPS.get(method, {"name": "quantize-weights", "method": method, **GPTQ}))  # fmt: skip
            grid = {"symmetric": False} if args.asymmetric else {}
            name = f"{NAMES[method]}{tuned if method in ('reconstruct', 'sequential-tune') else ''}"
            runs.append((f"{name} W{bits} g128{' asym' if args.asymmetric else ''}", method, bits, {**step, "bits": bits, "group_size": 128, **grid}))
    for variant, (kind, step) in BINARY.items():
        if kind in args.binary and (step["name"] == "reconstruct" or not args.learned_only):
            if step["name"] == "reconstruct" and args.tune:
                variant, step = _tuned_name(variant), {**step, "tune_steps": args.tune}
            runs.append((variant, step["name"], BINARY_BITS[kind], step))
    for q in args.shiftadd:
        if not args.learned_only:
            runs.append((f"ShiftAddLLM (GPTQ) q{q} g128", "shiftadd", q, {**SHIFTADD, "q": q}))
        learned = {"name": "reconstruct", "grid": "bcq", "bits": q, "group_size": 128, "tune_steps": args.tune, **codes}
        if args.shiftadd_sequential:
            learned = {**learned, "clip_steps": 0, "round_steps": 0}
        name = "ShiftAddLLM (GPTQ) sequential" if args.shiftadd_sequential else "reconstruct bcq"
        runs.append((f"{name}{tuned} q{q} g128", "reconstruct", q, learned))
    for variant, method, bits, step in runs:
        step = {**step, "format": "fake", "exclude": ["*lm_head*"]}
        start = time.perf_counter()
        model, report = bitfold.optimize(bitfold.clone(fp32), [step], calibration)
        seconds = time.perf_counter() - start
        rows.append({"model": "SmolLM2", "variant": variant, "method": method, "bits": bits,
                     "ppl": smollm2_ppl(model).value, "ppl_heldout": perplexity(model, heldout)[0],
                     "optimize_s": round(seconds, 1), "command": stamp["command"], "commit": stamp["commit"], "machine": stamp["machine"]})  # fmt: skip
        blocks = [[float(x) for x in m.groups()] if m.re is BLOCK_NOTE else [float(m[1])] * 3
                  for note in report.passes[0].notes if (m := BLOCK_NOTE.search(note) or START_NOTE.search(note))]  # fmt: skip
        if blocks:  # reconstruct: each block's calibration error at its start, after the first phase, at the end
            rows[-1]["block_losses"] = blocks
            seconds = next(({k: float(v) for k, v in PHASE.findall(n)} for n in report.passes[0].notes if SECONDS_NOTE.match(n)), {})
            if seconds:  # where its time went: the first inputs, the blocks, the end-to-end phase
                rows[-1]["seconds"] = {**seconds, "per_block": round(seconds["blocks"] / len(blocks), 1)}
                if "end to end" in seconds:
                    rows[-1]["seconds"]["per_step"] = round(seconds["end to end"] / step["tune_steps"], 2)
        for note in report.passes[0].notes:
            if m := TUNE_NOTE.search(note):  # reconstruct's end-to-end phase: the KL on the calibration windows
                rows[-1]["end_to_end"] = {"steps": int(m[1]), "kl_start": float(m[2]), "kl_end": float(m[3]),
                                          "codes_learned": "weights learned" in note}  # fmt: skip
                if m[4] is not None:
                    rows[-1]["end_to_end"]["codes_changed"] = int(m[4]) / int(m[5])
                rows[-1]["end_to_end"]["lr"] = step.get("tune_lr", ReconstructConfig.tune_lr)
                rows[-1]["end_to_end"]["schedule"] = step.get("tune_schedule", ReconstructConfig.tune_schedule)
                # KL before and after: on the calibration windows, or with early stopping on its held-out windows alone
                rows[-1]["end_to_end"]["kl_on"] = "held-out windows" if "on the held-out samples" in note else "calibration windows"
                if m := HOLDOUT_NOTE.search(note):  # early stopping: the held-out windows' KL at each check, the step kept
                    rows[-1]["end_to_end"]["holdout"] = {"windows": int(m[1]), "kl": [[int(a), float(b)] for a, b in CHECK.findall(m[2])],
                                                         "kept_step": int(m[3])}  # fmt: skip
                if step.get("tune_weights"):
                    rows[-1]["end_to_end"]["weight_lr"] = step.get("tune_weight_lr", ReconstructConfig.tune_weight_lr)
        print(rows[-1], flush=True)
        del model
        write(rows)  # after every row: a long run that stops keeps what it measured


def _write(rows: list[dict], stamp: dict, name: str, windows: range) -> None:
    """The rows merged into the protocol's JSON (a rerun replaces its own rows, the others stay), stamped with this run."""
    path = RESULTS / f"{name}.json"
    if path.exists():
        rows = merge_rows(json.loads(path.read_text())["rows"], rows, order=ORDER)
    result = {
        **stamp,
        "model": "SmolLM2-135M-Instruct (weights from a Q4_1 GGUF: 32-element blocks with offset)",
        "protocol": f"calibration: Lee windows {windows.start}-{windows.stop - 1} ({len(windows)} windows of 512 tokens); scored: Lee windows 0-15 of 512 tokens "
        "(8,176 tokens) and the held-out Lee test corpus (9 windows of 512); lm_head fp32; GPTQ settings as the quantization table's; "
        "reconstruct with its defaults; '+ end to end' rows then learn every scale against the float logits on the same "
        "calibration windows (steps and KL before and after in the row's end_to_end record), ', codes learned' rows the codes "
        "too",
        "rows": rows,
    }
    write_atomic(path, json.dumps(result, indent=2).encode())
    _plot(rows, RESULTS / f"{name}.png")


def _plot(rows: list[dict], path: Path) -> None:
    """Each reconstruct row's per-block calibration error: at its start and at the end."""
    learned = [r for r in rows if r.get("block_losses")]
    if not learned:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, row in enumerate(learned):
        losses = np.asarray(row["block_losses"])
        color = f"C{i}"
        ax.plot(losses[:, 0], "--", color=color, lw=1, label=f"{row['variant']}: start")
        ax.plot(losses[:, 2], "-", color=color, label=f"{row['variant']}: learned")
    ax.set_xlabel("block (decoder layer)")
    ax.set_ylabel("output error / target mean square")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: per-block error on the calibration windows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
