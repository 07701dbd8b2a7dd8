"""Sign-plane weights on all-MiniLM-L6-v2 (a post-norm BERT encoder): the binarize pass against learned block
reconstruction (the ``reconstruct`` pass, ``grid = "binary"``), blocks cut at the LayerNorm after each residual Add,
and against distillation (reconstruct's end-to-end phase with ``tune_weights``: the signs learn too).

Rows: the binarize pass with GPTQ rounding (its strongest solver: act-order, damp 0.003); reconstruct with its
defaults; reconstruct with ``--tune`` end-to-end steps on every α (relative squared error of the sentence
embedding, the pass's default learning rate); and the distillation rows, ``--distill`` end-to-end steps on every α
and latent weight, with and without direction matching of every block's output (``tune_match``). Every row
quantizes all 36 linears of the six layers. Calibration and training set: ``wiki-sentences`` (1,024 sentences of
gensim's Wikipedia sample). The distillation settings are the first ones tried; ``--validate`` also scores 256
other sentences of that sample, where settings are to be compared. Scored: mean and minimum cosine between the model's and the fp32 export's sentence
embeddings over the 151 sentences of the Lee test corpus (``minilm_cos``) and over the first 256 sentences of the
Lee background corpus; neither corpus is read by any row. Writes benchmarks/results/lowbit_minilm.json.

    python benchmarks/lowbit_minilm.py [--tune STEPS] [--distill STEPS [STEPS ...]] [--lr LR] [--match W] [--validate]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import bitfold
from bitfold.eval.calibration import wiki_training_indices
from bitfold.eval.data import lee_sentences, wiki_sentences
from bitfold.eval.models import export_minilm
from bitfold.eval.tasks import minilm_cos
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.bench import provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"
BINARY = {"name": "reconstruct", "grid": "binary", "format": "fake"}


def validation_sentences() -> list[str]:
    """256 sentences of the Wikipedia sample that ``wiki-sentences`` does not hold: the choice of settings."""
    sentences = wiki_sentences()
    training = set(wiki_training_indices(len(sentences)))
    others = [s for i, s in enumerate(sentences) if i not in training]
    return [others[i] for i in np.linspace(0, len(others) - 1, 256).round().astype(int)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", type=int, default=64, metavar="STEPS", help="end-to-end steps of the scales-only row")
    parser.add_argument("--distill", type=int, nargs="+", default=[2048], metavar="STEPS", help="end-to-end steps of the distillation rows: one row per value, the matched row at the first")
    parser.add_argument("--lr", type=float, default=1e-2, help="tune_weight_lr of the distillation rows")
    parser.add_argument("--match", type=float, default=1.0, help="tune_match of the matched distillation row")
    parser.add_argument("--rows", nargs="*", type=int, help="run only these rows (0-based), keeping the others' results")
    parser.add_argument("--validate", action="store_true", help="also score the validation sentences")
    args = parser.parse_args()
    stamp = provenance()
    reference = export_minilm()
    fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
    calibration = CalibrationData.from_source("wiki-sentences", fp32)
    background = lee_sentences("calibration")[:256]
    distill = {**BINARY, "tune_loss": "mse", "tune_weights": True, "tune_weight_lr": args.lr}
    runs = [
        ("binarize (GPTQ), 1 plane", {"name": "binarize", "keep_ends": False, "gptq": True, "act_order": True, "damp": 0.003}),
        ("reconstruct binary, 1 plane", BINARY),
        (f"reconstruct binary + end to end ({args.tune} steps), 1 plane", {**BINARY, "tune_steps": args.tune, "tune_loss": "mse"}),
        *[(f"reconstruct binary + distillation ({steps} steps), 1 plane", {**distill, "tune_steps": steps}) for steps in args.distill],
        (f"reconstruct binary + distillation ({args.distill[0]} steps, direction matching), 1 plane", {**distill, "tune_steps": args.distill[0], "tune_match": args.match}),
    ]  # fmt: skip
    path = RESULTS / "lowbit_minilm.json"
    previous = json.loads(path.read_text()) if args.rows and path.exists() else {"rows": []}
    kept = {row["variant"]: {**row, "commit": row.get("commit", previous.get("commit"))} for row in previous["rows"]}  # who measured it
    rows = []
    for i, (variant, step) in enumerate(runs):
        if args.rows and i not in args.rows:
            if variant in kept:
                rows.append(kept[variant])
            continue
        start = time.perf_counter()
        model, report = bitfold.optimize(bitfold.clone(fp32), [step], calibration)
        seconds = time.perf_counter() - start
        test, other = minilm_cos(model, reference), minilm_cos(model, reference, background)
        rows.append({"variant": variant, "step": step, "cosine": test.value, "min_cosine": test.detail["min_cosine"],
                     "cosine_background": other.value, "min_cosine_background": other.detail["min_cosine"],
                     "optimize_s": round(seconds, 1), "notes": [n for n in report.passes[0].notes if "→" in n]})  # fmt: skip
        if args.validate:
            rows[-1]["cosine_validation"] = minilm_cos(model, reference, validation_sentences()).value
        print({k: v for k, v in rows[-1].items() if k != "notes"}, flush=True)
        _write(path, stamp, rows)  # after each measured row: a long run keeps what it has
    _write(path, stamp, rows)  # with the kept rows after the last measured one


def _write(path: Path, stamp: dict, rows: list[dict]) -> None:
    result = {**stamp, "model": "all-MiniLM-L6-v2, seq 128",
              "protocol": "calibration and training: wiki-sentences (1,024 sentences of gensim's Wikipedia sample); scored: cosine to "
              "the fp32 export's sentence embedding over the 151 sentences of lee.cor and the first 256 sentences of lee_background.cor "
              "(mean and minimum); every linear of the six layers on one sign plane, α per output", "rows": rows}  # fmt: skip
    write_atomic(path, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
