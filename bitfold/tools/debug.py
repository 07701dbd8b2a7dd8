"""Pass-level numeric debugging: which pass of a recipe broke accuracy, and at which node.

``debug(model, steps, feeds)`` runs the steps one at a time. After each it compares the graph outputs with the
input model's (cumulative error) and with the previous model's (the pass's own error: max abs, relative L2,
cosine, SQNR). The first pass whose own error exceeds ``tolerance`` is the culprit; inside it, every float tensor
present by name before and after the pass is exposed as an output of both graphs, and the first one in the
rewritten graph's order whose error exceeds the tolerance names the first node that went wrong (its producer).
Steps are recipe entries (names or dicts) or pass instances (for passes outside the registry).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitfold.backends.ort import OrtRunnable
from bitfold.passes.registry import BitfoldPass
from bitfold.pipeline import optimize


@dataclasses.dataclass
class TensorError:
    name: str
    max_abs: float
    rel: float
    cosine: float
    sqnr_db: float

    @classmethod
    def of(cls, name: str, got: np.ndarray, ref: np.ndarray) -> TensorError:
        g, r = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
        same = g == r  # equal infinities (attention masks) count as no error
        if (~same & ~(np.isfinite(g) & np.isfinite(r))).any():
            return cls(name, float("inf"), float("inf"), float("nan"), float("-inf"))
        g, r = g[~same | np.isfinite(r)], r[~same | np.isfinite(r)]
        diff = float(np.linalg.norm(g - r))
        norm = float(np.linalg.norm(r))
        cosine = float(g @ r / (np.linalg.norm(g) * norm)) if norm and np.linalg.norm(g) else float(diff == 0)
        sqnr = float(20 * np.log10(norm / diff)) if diff else float("inf")
        return cls(name, float(np.abs(g - r).max(initial=0.0)), diff / norm if norm else diff, cosine, sqnr)


@dataclasses.dataclass
class PassDiagnosis:
    index: int
    name: str
    own: list[TensorError]  # graph outputs against the previous model
    cumulative: list[TensorError]  # graph outputs against the input model

    @property
    def own_rel(self) -> float:
        return max((e.rel for e in self.own), default=0.0)


@dataclasses.dataclass
class DebugReport:
    tolerance: float
    passes: list[PassDiagnosis]
    culprit: int | None = None  # index into passes
    first_node: str | None = None
    first_tensor: TensorError | None = None
    tensors: list[TensorError] = dataclasses.field(default_factory=list)  # the culprit's mapped intermediates

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def _outputs(model: ir.Model, feeds: Mapping[str, np.ndarray], names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The graph outputs, plus the named intermediates exposed as extra outputs of a copy."""
    copy = ir.from_proto(ir.to_proto(model))
    values = {v.name: v for node in copy.graph for v in node.outputs}
    present = {v.name for v in copy.graph.outputs}
    for name in names:
        if name not in present:
            copy.graph.outputs.append(values[name])
    return OrtRunnable(copy, device="cpu", optimization="none").run(dict(feeds))


def _errors(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], names: Sequence[str]) -> list[TensorError]:
    return [TensorError.of(n, got[n], ref[n]) for n in names]


def debug(model: ir.Model, steps: Sequence[str | Mapping[str, Any] | BitfoldPass], feeds: Mapping[str, np.ndarray],
          calibration: Any = None, tolerance: float = 1e-3) -> DebugReport:  # fmt: skip
    """Run ``steps`` on a copy of ``model`` one at a time and locate the first pass and node exceeding ``tolerance``."""
    current = ir.from_proto(ir.to_proto(model))
    outputs = [v.name for v in current.graph.outputs]
    reference = _outputs(current, feeds)
    report = DebugReport(tolerance, [])
    previous = reference
    for index, step in enumerate(steps):
        before = ir.from_proto(ir.to_proto(current))
        if isinstance(step, BitfoldPass):
            step.calibration = calibration
            step(current)
            name = step.name
        else:
            current, _ = optimize(current, [step], calibration)
            name = step if isinstance(step, str) else step["name"]
        now = _outputs(current, feeds)
        report.passes.append(PassDiagnosis(index, name, _errors(now, previous, outputs), _errors(now, reference, outputs)))
        if report.culprit is None and report.passes[-1].own_rel > tolerance:
            report.culprit = index
            _locate(report, before, current, feeds)
        previous = now
    return report


def _locate(report: DebugReport, before: ir.Model, after: ir.Model, feeds: Mapping[str, np.ndarray]) -> None:
    """Name the first tensor (in the rewritten graph's order) that differs beyond tolerance, and its producer."""
    float_names = {v.name for n in before.graph for v in n.outputs if v.dtype == ir.DataType.FLOAT}
    order = [v.name for n in after.graph for v in n.outputs if v.name in float_names and v.dtype == ir.DataType.FLOAT]
    got, ref = _outputs(after, feeds, order), _outputs(before, feeds, order)
    report.tensors = [TensorError.of(n, got[n], ref[n]) for n in order if got[n].shape == ref[n].shape]
    producers = {v.name: n.name for n in after.graph for v in n.outputs}
    for error in report.tensors:
        if error.rel > report.tolerance:
            report.first_tensor, report.first_node = error, producers[error.name]
            return


def write_html(report: DebugReport, path, title: str = "bitfold debug") -> None:
    """A self-contained HTML page (inline PNG, no external assets): the per-pass table, the per-pass error plot and
    the culprit's per-tensor errors."""
    import base64
    import html
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bitfold.tools.files import write_atomic

    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [f"{p.index}: {p.name}" for p in report.passes]
    ax.bar(names, [max(p.own_rel, 1e-12) for p in report.passes], color=["#c63" if p.index == report.culprit else "#69c" for p in report.passes])
    ax.axhline(report.tolerance, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("relative output error of the pass")
    ax.tick_params(axis="x", rotation=30, labelsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    image = base64.b64encode(buffer.getvalue()).decode()
    rows = "".join(
        f"<tr{' class=bad' if p.index == report.culprit else ''}><td>{p.index}</td><td>{html.escape(p.name)}</td>"
        f"<td>{p.own_rel:.3g}</td><td>{max((e.rel for e in p.cumulative), default=0):.3g}</td>"
        f"<td>{min((e.sqnr_db for e in p.own), default=float('inf')):.1f}</td></tr>"
        for p in report.passes
    )
    tensors = "".join(
        f"<tr><td>{html.escape(e.name)}</td><td>{e.rel:.3g}</td><td>{e.max_abs:.3g}</td><td>{e.cosine:.6f}</td></tr>"
        for e in report.tensors[:200]
    )
    verdict = (
        f"First pass over tolerance {report.tolerance:g}: <b>{html.escape(report.passes[report.culprit].name)}</b> (step {report.culprit}); "
        f"first node: <b>{html.escape(report.first_node or 'not localized')}</b>"
        if report.culprit is not None
        else f"No pass exceeds the tolerance {report.tolerance:g}."
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font:14px sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px}}
tr.bad{{background:#fdd}}</style></head><body><h1>{html.escape(title)}</h1><p>{verdict}</p>
<img alt="per-pass error" src="data:image/png;base64,{image}">
<h2>Passes</h2><table><tr><th>step</th><th>pass</th><th>own rel. error</th><th>cumulative rel. error</th><th>SQNR dB</th></tr>{rows}</table>
<h2>Tensors of the culprit pass (rewritten graph order)</h2><table><tr><th>tensor</th><th>rel.</th><th>max abs</th><th>cosine</th></tr>{tensors}</table>
</body></html>"""
    write_atomic(path, page.encode())
