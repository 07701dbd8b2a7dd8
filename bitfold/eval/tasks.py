"""Real-model evaluation tasks, each computed from an ONNX graph through ONNX Runtime.

``smollm2-ppl``: SmolLM2-135M perplexity on the Lee background corpus. The whole corpus is tokenized with the
model's own tokenizer (``add_special_tokens=False``, 75,680 tokens) and cut into non-overlapping 512-token windows;
windows 0–15 are scored (each predicts its tokens 1..511: 16 × 511 = 8,176 tokens), and calibration draws only
from the last 32 windows, 115–146 (16,384 tokens), so evaluation and calibration text never overlap. The held-out
text is the Lee test corpus (``lee.cor``, 50 other news documents): every window of it (:func:`heldout_windows`;
9 windows of 512 with SmolLM2's tokenizer), never used for calibration or for choosing defaults.

``effnet-agree``: EfficientNet-Lite0 top-1 agreement and mean KL divergence against the fp32 export, over 500
deterministic crops/flips of 10 scikit-image photos; calibration uses 6 other photos.

``minilm-cos``: all-MiniLM-L6-v2 mean-pooled embeddings, cosine to the fp32 export, over the sentences of the Lee
test corpus (``lee.cor``); calibration sentences come from ``lee_background.cor``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from bitfold.backends import compile

WINDOW = 512
EVAL_WINDOWS = range(0, 16)
CALIB_WINDOWS = range(115, 147)


@dataclasses.dataclass(frozen=True)
class TaskResult:
    task: str
    metric: str
    value: float
    detail: dict


def lee_windows(tokenizer, windows: range, seq_len: int = WINDOW) -> np.ndarray:
    """Token ids of the given non-overlapping windows of the Lee corpus, shape (len(windows), seq_len)."""
    from bitfold.eval.data import lee_text

    ids = np.asarray(tokenizer(lee_text(), add_special_tokens=False)["input_ids"], dtype=np.int64)
    usable = len(ids) // seq_len
    if windows.stop > usable:
        raise ValueError(f"the corpus has {usable} windows of {seq_len} tokens; asked for up to {windows.stop}")
    return ids[: usable * seq_len].reshape(usable, seq_len)[windows.start : windows.stop]


def heldout_windows(tokenizer, seq_len: int = WINDOW) -> np.ndarray:
    """Token ids of every non-overlapping window of the held-out text (the Lee test corpus), (windows, seq_len)."""
    from bitfold.eval.data import lee_test_text

    return text_windows(tokenizer, lee_test_text(), seq_len)


def lm_feeds(windows: np.ndarray, model: ir.Model | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One prefill per window: input_ids and attention_mask, plus position_ids and an empty past for a KV-cache
    graph (when ``model`` is given and has them)."""
    from bitfold.llm.feeds import prefill

    for row in windows:
        if model is None:
            yield {"input_ids": row[None, :], "attention_mask": np.ones((1, row.size), dtype=np.int64)}
        else:
            yield prefill(model, row[None, :])


def perplexity(model: ir.Model, windows: np.ndarray) -> tuple[float, int]:
    """exp(mean next-token NLL) over all windows (each a prefill from an empty cache); (perplexity, scored tokens)."""
    runnable = compile(model, "ort", "cpu")
    nll, count = 0.0, 0
    for feeds in lm_feeds(windows, model):
        logits = runnable.run(feeds)["logits"][0].astype(np.float64)
        targets = feeds["input_ids"][0, 1:]
        logits = logits[:-1]
        log_probs = _log_softmax_rows(logits)
        nll -= log_probs[np.arange(targets.size), targets].sum()
        count += targets.size
    return float(np.exp(nll / count)), count


def _log_softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def smollm2_ppl(model: ir.Model) -> TaskResult:
    from bitfold.eval.models import smollm2

    _, tokenizer = smollm2()
    ppl, tokens = perplexity(model, lee_windows(tokenizer, EVAL_WINDOWS))
    return TaskResult("smollm2-ppl", "perplexity", ppl, {"windows": "0-15", "window": WINDOW, "scored_tokens": tokens})


def text_windows(tokenizer, text: str, window: int = WINDOW, windows: int | None = None) -> np.ndarray:
    """Non-overlapping ``window``-token windows of ``text`` (the first ``windows`` of them, else all)."""
    from bitfold.errors import BitfoldError

    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    usable = len(ids) // window
    if usable == 0:
        raise BitfoldError(f"the text has {len(ids)} tokens, fewer than one window of {window}; give more text or a smaller --window.")
    usable = min(usable, windows) if windows else usable
    return ids[: usable * window].reshape(usable, window)


def text_ppl(model: ir.Model, tokenizer, text: str, window: int = WINDOW, windows: int | None = None) -> TaskResult:
    """Perplexity on the user's own text, in non-overlapping windows, each scored from an empty cache."""
    rows = text_windows(tokenizer, text, window, windows)
    ppl, tokens = perplexity(model, rows)
    return TaskResult("ppl", "perplexity", ppl, {"windows": len(rows), "window": window, "scored_tokens": tokens})


EFFNET_CROPS_PER_PHOTO = 50  # 10 evaluation photos: 500 inputs


def effnet_agree(model: ir.Model, reference: ir.Model | None = None, split: str = "eval") -> TaskResult:
    """Top-1 agreement and mean KL(fp32 ‖ model) of EfficientNet-Lite0 logits over deterministic crops: 500 of the
    evaluation photos, or ``split = "validation"``: 100 of the photo kept for choosing settings."""
    from bitfold.eval.data import photo_crops
    from bitfold.eval.models import efficientnet_lite0
    from bitfold.frontend import from_torch

    if reference is None:
        module, example = efficientnet_lite0()
        reference = from_torch(module, example)
    if split not in ("eval", "validation"):
        raise ValueError(f"split must be 'eval' or 'validation', not {split!r}")
    images = photo_crops(split, EFFNET_CROPS_PER_PHOTO if split == "eval" else 100)
    agree, kl = 0, 0.0
    candidate, base = compile(model, "ort", "cpu"), compile(reference, "ort", "cpu")
    name_c, name_b = model.graph.inputs[0].name, reference.graph.inputs[0].name
    for image in images:
        p = next(iter(base.run({name_b: image[None]}).values()))[0].astype(np.float64)
        q = next(iter(candidate.run({name_c: image[None]}).values()))[0].astype(np.float64)
        agree += int(p.argmax() == q.argmax())
        log_p, log_q = _log_softmax_rows(p), _log_softmax_rows(q)
        kl += float(np.sum(np.exp(log_p) * (log_p - log_q)))
    n = len(images)
    return TaskResult("effnet-agree", "top-1 agreement", agree / n, {"mean_kl": kl / n, "inputs": n})


MINILM_SEQ = 128


def sentence_feeds(tokenizer, sentences: list[str], seq_len: int = MINILM_SEQ) -> list[dict[str, np.ndarray]]:
    """Padded/truncated token ids and masks, one feed per sentence."""
    feeds = []
    for sentence in sentences:
        enc = tokenizer(sentence, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
        feeds.append({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)})
    return feeds


def minilm_cos(model: ir.Model, reference: ir.Model | None = None, sentences: list[str] | None = None) -> TaskResult:
    """all-MiniLM-L6-v2: cosine between the model's and the fp32 export's embeddings over the Lee test corpus
    (``lee.cor``, 50 short news documents, split into sentences; calibration uses ``lee_background.cor``), or over
    ``sentences``."""
    from bitfold.eval.data import lee_sentences
    from bitfold.eval.models import export_minilm, minilm

    _, tokenizer = minilm()
    reference = reference if reference is not None else export_minilm()
    feeds = sentence_feeds(tokenizer, lee_sentences("test") if sentences is None else sentences)
    candidate, base = compile(model, "ort", "cpu"), compile(reference, "ort", "cpu")
    cosines = []
    for feed in feeds:
        a = next(iter(base.run(feed).values()))[0].astype(np.float64)
        b = next(iter(candidate.run(feed).values()))[0].astype(np.float64)
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return TaskResult("minilm-cos", "mean cosine", float(np.mean(cosines)),
                      {"min_cosine": float(np.min(cosines)), "sentences": len(cosines), "seq_len": MINILM_SEQ})  # fmt: skip


TASKS = {"smollm2-ppl": smollm2_ppl, "effnet-agree": effnet_agree, "minilm-cos": minilm_cos}
