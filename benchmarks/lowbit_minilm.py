"""Sign-plane weights on all-MiniLM-L6-v2 (a post-norm BERT encoder): the binarize pass against learned block
reconstruction (the ``reconstruct`` pass, ``grid = "binary"``), blocks cut at the LayerNorm after each residual Add,
and against distillation (reconstruct's end-to-end phase with ``tune_weights``: the signs learn too).

Rows: the binarize pass with GPTQ rounding (its strongest solver: act-order, damp 0.003); reconstruct with its
defaults; reconstruct with ``--tune`` end-to-end steps on every α (relative squared error of the sentence
embedding, the pass's default learning rate); and the distillation rows, ``--distill`` end-to-end steps on every α
and latent weight, with and without direction matching of every block's output (``tune_match``). Every row
quantizes all 36 linears of the six layers. Calibration and training set: ``wiki-sentences`` (1,024 sentences of
gensim's Wikipedia sample). The distillation settings are the first ones tried; ``--validate`` also scores 256
other sentences of that sample, where settings are to be compared. ``--sentences N`` (", N sentences") trains the
distillation rows on N sentences of the sample: wiki-sentences' 1,024 first (the per-block phase reads those alone,
``start_samples``, so it is the other rows'), then others spread over the sample, never a validation sentence; their
end-to-end phase keeps ``--holdout`` of the added sentences out and keeps the step where those scored best.
``--batch N`` (", N per step") averages each distillation step's gradient over N sentences (``tune_batch``; one
otherwise), so the same steps read N times the sentences. ``--floats LR`` (", float vectors learned") lets the distillation rows' biases and LayerNorm scales and shifts learn
too (``tune_floats``, at ``tune_float_lr`` LR). Scored: mean and minimum cosine between the model's and the fp32 export's sentence
embeddings over the 151 sentences of the Lee test corpus (``minilm_cos``) and over the first 256 sentences of the
Lee background corpus; neither corpus is read by any row. Writes benchmarks/results/lowbit_minilm.json.

    python benchmarks/lowbit_minilm.py [--tune STEPS] [--distill STEPS [STEPS ...]] [--lr LR] [--match W] [--validate]
                                       [--sentences N [--holdout N] [--check STEPS]] [--batch N] [--floats LR] [--rows I ...]
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
from bitfold.eval.models import minilm
from bitfold.eval.tasks import MINILM_SEQ, minilm_cos, sentence_feeds
from bitfold.passes.canonical import CANONICAL
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.bench import provenance
from bitfold.tools.files import write_atomic

RESULTS = Path(__file__).parent / "results"
BINARY = {"name": "reconstruct", "grid": "binary", "format": "fake"}


def _validation_indices(count: int) -> list[int]:
    """Of ``count`` sentences, the 256 that score settings: evenly spread over those ``wiki-sentences`` does not hold."""
    training = set(wiki_training_indices(count))
    others = [i for i in range(count) if i not in training]
    return [others[i] for i in np.linspace(0, len(others) - 1, 256).round().astype(int)]


def validation_sentences() -> list[str]:
    """256 sentences of the Wikipedia sample that ``wiki-sentences`` does not hold: the choice of settings."""
    sentences = wiki_sentences()
    return [sentences[i] for i in _validation_indices(len(sentences))]


def training_sentences(count: int) -> list[str]:
    """``count`` sentences of the Wikipedia sample: ``wiki-sentences``' 1,024 first, then others spread evenly over
    the sample, none of them a validation sentence."""
    sentences = wiki_sentences()
    first = wiki_training_indices(len(sentences))
    taken = set(first) | set(_validation_indices(len(sentences)))
    rest = [i for i in range(len(sentences)) if i not in taken]
    if not len(first) <= count <= len(first) + len(rest):
        raise SystemExit(f"--sentences takes {len(first)} to {len(first) + len(rest)}, not {count}")
    added = [rest[i] for i in np.linspace(0, len(rest) - 1, count - len(first)).round().astype(int)] if count > len(first) else []
    return [sentences[i] for i in first + added]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tune", type=int, default=64, metavar="STEPS", help="end-to-end steps of the scales-only row")
    parser.add_argument("--distill", type=int, nargs="+", default=[2048], metavar="STEPS", help="end-to-end steps of the distillation rows: one row per value, the matched row at the first")
    parser.add_argument("--lr", type=float, default=1e-2, help="tune_weight_lr of the distillation rows")
    parser.add_argument("--match", type=float, default=1.0, help="tune_match of the matched distillation row")
    parser.add_argument("--rows", nargs="*", type=int, help="run only these rows (0-based), keeping the others' results")
    parser.add_argument("--validate", action="store_true", help="also score the validation sentences")
    parser.add_argument("--sentences", type=int, default=1024, metavar="N", help="training sentences of the distillation rows (1,024: wiki-sentences)")
    parser.add_argument("--holdout", type=int, default=0, metavar="N", help="with --sentences: the distillation rows' early-stopping sentences (tune_holdout)")
    parser.add_argument("--check", type=int, default=16, metavar="STEPS", help="with --holdout: steps between two scores of the held-out sentences")
    parser.add_argument("--floats", type=float, default=None, metavar="LR", help="the distillation rows' float vectors learn too, at this rate (tune_floats)")
    parser.add_argument("--batch", type=int, default=1, metavar="N", help="the distillation rows' sentences per end-to-end step, gradients averaged (tune_batch)")
    args = parser.parse_args()
    if args.holdout and args.sentences <= 1024:
        parser.error("--holdout draws among the sentences --sentences adds to the 1,024: give --sentences N > 1024")
    stamp = provenance()
    reference = export_minilm()
    fp32, _ = bitfold.optimize(bitfold.clone(reference), list(CANONICAL))
    calibration = CalibrationData.from_source("wiki-sentences", fp32)
    background = lee_sentences("calibration")[:256]
    distill = {**BINARY, "tune_loss": "mse", "tune_weights": True, "tune_weight_lr": args.lr}
    trained, more = calibration, ""
    if args.sentences > 1024:  # the per-block phase on the 1,024 as every row; the end-to-end phase on them all
        trained = CalibrationData(sentence_feeds(minilm()[1], training_sentences(args.sentences), MINILM_SEQ), name=f"wiki, {args.sentences} sentences")
        distill = {**distill, "start_samples": 1024}
        if args.holdout:
            distill = {**distill, "tune_holdout": args.holdout, "tune_check": args.check}
        more = f", {args.sentences} sentences" + (", early stopping" if args.holdout else "")
    if args.batch > 1:
        distill = {**distill, "tune_batch": args.batch}
        more += f", {args.batch} per step"
    if args.floats is not None:
        distill = {**distill, "tune_floats": True, "tune_float_lr": args.floats}
        more += ", float vectors learned"
    runs = [
        ("binarize (GPTQ), 1 plane", {"name": "binarize", "keep_ends": False, "gptq": True, "act_order": True, "damp": 0.003}),
        ("reconstruct binary, 1 plane", BINARY),
        (f"reconstruct binary + end to end ({args.tune} steps), 1 plane", {**BINARY, "tune_steps": args.tune, "tune_loss": "mse"}),
        *[(f"reconstruct binary + distillation ({steps} steps{more}), 1 plane", {**distill, "tune_steps": steps}) for steps in args.distill],
        (f"reconstruct binary + distillation ({args.distill[0]} steps{more}, direction matching), 1 plane", {**distill, "tune_steps": args.distill[0], "tune_match": args.match}),
    ]  # fmt: skip
    path = RESULTS / "lowbit_minilm.json"
    previous = json.loads(path.read_text()) if args.rows and path.exists() else {"rows": []}
    # rows not rerun are kept, each with the commit that measured it
    kept = [{**row, "commit": row.get("commit", previous.get("commit"))} for row in previous["rows"]]
    rows = []
    for i, (variant, step) in enumerate(runs):
        if args.rows and i not in args.rows:
            continue
        start = time.perf_counter()
        model, report = bitfold.optimize(bitfold.clone(fp32), [step], trained if "tune_weights" in step else calibration)
        seconds = time.perf_counter() - start
        test, other = minilm_cos(model, reference), minilm_cos(model, reference, background)
        rows.append({"variant": variant, "step": step, "cosine": test.value, "min_cosine": test.detail["min_cosine"],
                     "cosine_background": other.value, "min_cosine_background": other.detail["min_cosine"],
                     "optimize_s": round(seconds, 1), "notes": [n for n in report.passes[0].notes if "→" in n]})  # fmt: skip
        if args.validate:
            rows[-1]["cosine_validation"] = minilm_cos(model, reference, validation_sentences()).value
        if "tune_weights" in step:
            rows[-1]["training_sentences"] = len(trained)
        print({k: v for k, v in rows[-1].items() if k != "notes"}, flush=True)
        _write(path, stamp, _merged(kept, rows))  # after each measured row: a long run keeps what it has
    _write(path, stamp, _merged(kept, rows))


def _merged(kept: list[dict], rows: list[dict]) -> list[dict]:
    """This run's rows merged into the kept ones: each replaces its variant's in place, a new variant goes last."""
    merged = list(kept)
    for row in rows:
        same = [i for i, old in enumerate(merged) if old["variant"] == row["variant"]]
        if same:
            merged[same[0]] = row
        else:
            merged.append(row)
    return merged


def _write(path: Path, stamp: dict, rows: list[dict]) -> None:
    result = {**stamp, "model": "all-MiniLM-L6-v2, seq 128",
              "protocol": "calibration and training: wiki-sentences (1,024 sentences of gensim's Wikipedia sample); scored: cosine to "
              "the fp32 export's sentence embedding over the 151 sentences of lee.cor and the first 256 sentences of lee_background.cor "
              "(mean and minimum); every linear of the six layers on one sign plane, α per output", "rows": rows}  # fmt: skip
    write_atomic(path, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    main()
