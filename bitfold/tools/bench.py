"""Latency comparison of several runnables: interleaved rounds, medians, ratios to the first (the baseline).

ONNX Runtime sessions in one process each keep a spinning thread pool; timing them back to back lets one pool's
spinning steal the cores of another. Sessions compared here are built with spinning off and timed in interleaved
rounds (A B C A B C ...), and results are reported as medians and as ratios to the first model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bitfold.backends import Runnable, latency_stats


def compare(
    runnables: Sequence[Runnable],
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    warmup: int = 5,
    rounds: int = 10,
    iters: int = 10,
) -> list[dict[str, float]]:
    """Latency stats (ms) per runnable plus ``ratio`` = its p50 / the first runnable's p50."""
    for runnable, feed in zip(runnables, feeds, strict=True):
        runnable.times(feed, warmup)
    times: list[list[float]] = [[] for _ in runnables]
    for _ in range(rounds):
        for index, (runnable, feed) in enumerate(zip(runnables, feeds, strict=True)):
            times[index].extend(runnable.times(feed, iters))
    stats = [latency_stats(t) for t in times]
    for s in stats:
        s["ratio"] = s["p50"] / stats[0]["p50"]
    return stats


def merge_rows(previous: Sequence[dict], rows: Sequence[dict], order: Sequence[str] = ()) -> list[dict]:
    """Result rows of a rerun merged into an earlier table: new rows replace those with the same (model, variant),
    the rest stay; with ``order`` (variant labels), rows are sorted by model, then by their place in it."""
    fresh = {(r["model"], r["variant"]) for r in rows}
    merged = [r for r in previous if (r["model"], r["variant"]) not in fresh] + list(rows)
    if order:
        rank = {label: i for i, label in enumerate(order)}
        merged.sort(key=lambda r: (r["model"], rank.get(r["variant"], len(rank))))
    return merged
