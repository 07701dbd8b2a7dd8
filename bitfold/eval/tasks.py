"""Real-model evaluation tasks, each computed from an ONNX graph through ONNX Runtime.

``smollm2-ppl``: SmolLM2-135M perplexity on the Lee background corpus. The whole corpus is tokenized with the
model's own tokenizer (``add_special_tokens=False``, 75,680 tokens) and cut into non-overlapping 512-token windows;
windows 0–15 are scored (each predicts its tokens 1..511: 16 × 511 = 8,176 tokens), and calibration draws only
from the last 32 windows, 115–146 (16,384 tokens), so evaluation and calibration text never overlap.
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


def lm_feeds(windows: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    for row in windows:
        yield {"input_ids": row[None, :], "attention_mask": np.ones((1, row.size), dtype=np.int64)}


def perplexity(model: ir.Model, windows: np.ndarray) -> tuple[float, int]:
    """exp(mean next-token NLL) over all windows; returns (perplexity, scored tokens)."""
    runnable = compile(model, "ort", "cpu")
    nll, count = 0.0, 0
    for feeds in lm_feeds(windows):
        logits = next(iter(runnable.run(feeds).values()))[0].astype(np.float64)
        targets = feeds["input_ids"][0, 1:]
        logits = logits[:-1]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        nll -= log_probs[np.arange(targets.size), targets].sum()
        count += targets.size
    return float(np.exp(nll / count)), count


def smollm2_ppl(model: ir.Model) -> TaskResult:
    from bitfold.eval.models import smollm2

    _, tokenizer = smollm2()
    ppl, tokens = perplexity(model, lee_windows(tokenizer, EVAL_WINDOWS))
    return TaskResult("smollm2-ppl", "perplexity", ppl, {"windows": "0-15", "window": WINDOW, "scored_tokens": tokens})


TASKS = {"smollm2-ppl": smollm2_ppl}
