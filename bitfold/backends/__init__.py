"""Backends: turn an onnx-ir model into something that runs.

``compile(model, backend, device)`` returns a :class:`Runnable`. Every backend has the same two faces: ``run``
maps a feed dict to an output dict, ``bench`` times repeated runs and returns latency statistics in ms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import onnx_ir as ir

from bitfold.errors import BitfoldError


class Runnable(Protocol):
    backend: str
    device: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def bench(self, feeds: Mapping[str, np.ndarray], warmup: int = 10, iters: int = 50) -> dict[str, float]: ...

    def times(self, feeds: Mapping[str, np.ndarray], iters: int) -> list[float]: ...


class Timed:
    """``bench`` for a runnable that implements ``times``."""

    def times(self, feeds: Mapping[str, np.ndarray], iters: int) -> list[float]:
        raise NotImplementedError

    def bench(self, feeds: Mapping[str, np.ndarray], warmup: int = 10, iters: int = 50) -> dict[str, float]:
        self.times(feeds, warmup)
        return latency_stats(self.times(feeds, iters))


BACKENDS = ("ort", "tvm")


def compile(model: ir.Model, backend: str = "ort", device: str = "auto", **options) -> Runnable:  # noqa: A001
    """Compile ``model`` for ``backend`` ("ort" or "tvm") on ``device`` ("cpu", "cuda", or "auto": CUDA when
    present)."""
    if backend == "ort":
        from bitfold.backends.ort import OrtRunnable

        return OrtRunnable(model, device=device, **options)
    if backend == "tvm":
        from bitfold.backends.tvm import TvmRunnable

        return TvmRunnable(model, device=device, **options)
    raise BitfoldError(f"unknown backend '{backend}'; choose one of: {', '.join(BACKENDS)}.")


def latency_stats(seconds: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p90/mean/min of per-run times, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "iters": int(ms.size),
    }
