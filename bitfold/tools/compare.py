"""Comparing a rewritten model with its reference: run a graph with intermediates exposed, and measure one tensor's
error against another (max abs, relative L2 against a floor, cosine, SQNR). Shared by ``debug`` and ``reduce``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from bitfold.backends.ort import OrtRunnable
from bitfold.frontend.onnx_io import clone


@dataclasses.dataclass
class TensorError:
    name: str
    max_abs: float
    #: ‖got − ref‖₂ / max(‖ref‖₂, √n · floor): relative L2 error, against at least ``floor`` per element.
    rel: float
    cosine: float
    sqnr_db: float
    reference: str = ""  # the input graph's tensor it was compared with, when the pass renamed it
    floor: float = 0.0  # the smallest per-element magnitude ``rel`` is taken relative to

    @classmethod
    def of(cls, name: str, got: np.ndarray, ref: np.ndarray, floor: float = 0.0) -> TensorError:
        g, r = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
        same = g == r  # equal infinities (attention masks) count as no error
        if (~same & ~(np.isfinite(g) & np.isfinite(r))).any():
            return cls(name, float("inf"), float("inf"), float("nan"), float("-inf"), floor=floor)
        g, r = g[~same | np.isfinite(r)], r[~same | np.isfinite(r)]
        diff = float(np.linalg.norm(g - r))
        norm = float(np.linalg.norm(r))
        cosine = float(g @ r / (np.linalg.norm(g) * norm)) if norm and np.linalg.norm(g) else float(diff == 0)
        sqnr = float(20 * np.log10(norm / diff)) if diff else float("inf")
        size = max(norm, float(np.sqrt(r.size)) * floor)
        return cls(name, float(np.abs(g - r).max(initial=0.0)), diff / size if size else diff, cosine, sqnr, floor=floor)


def run_exposing(model: ir.Model, feeds: Mapping[str, np.ndarray], names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The graph outputs, plus the named intermediates exposed as extra outputs of a copy (under ONNX Runtime,
    graph optimizations off so every tensor exists as the graph states it)."""
    copy = clone(model)
    values = {v.name: v for node in copy.graph for v in node.outputs}
    present = {v.name for v in copy.graph.outputs}
    for name in names:
        if name not in present:
            copy.graph.outputs.append(values[name])
    return OrtRunnable(copy, device="cpu", optimization="none").run(dict(feeds))
