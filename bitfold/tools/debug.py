"""Pass-level numeric debugging: which pass of a recipe broke accuracy, and at which node.

``debug(model, steps, feeds)`` runs the steps one at a time through the pass manager's instrumentation (time,
ops added/removed, parameter bytes). After each it compares the graph outputs with the input model's (cumulative
error) and with the previous model's (the pass's own error: max abs, relative L2, cosine, SQNR). The first pass
whose own relative error exceeds ``tolerance`` is the culprit (errors are relative to the reference's size, but
never to less than a floor tied to the model's scale, ``DebugReport.floor``, so an output that is near zero for the
given input does not turn rounding into a large relative error); inside it, every float tensor of the rewritten
graph that maps to one of the input graph — by name, else through provenance (a node stamped ``bitfold.from`` with one
origin, whose output leaves the group of nodes made from that origin, stands for the origin's output) — is
exposed as an output of both graphs, and the first one in the rewritten graph's order whose error exceeds the
tolerance names the first node that went wrong (its producer). The worst pass (the culprit, else the largest own
error) is also diffed node by node (``bitfold.tools.graph_diff``); ``reduce=True`` shrinks the culprit's input to
the smallest subgraph still showing its error (``bitfold.tools.reduce``). Steps are recipe entries (names or
dicts) or pass instances (for passes outside the registry).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from bitfold.frontend.onnx_io import clone
from bitfold.errors import BitfoldError
from bitfold.passes.registry import FROM_KEY, BitfoldPass
from bitfold.pipeline import PassRecord, Recipe, run_pass
from bitfold.tools.compare import TensorError, run_exposing
from bitfold.tools.graph_diff import GraphDiff, diff, to_svg
from bitfold.tools.reduce import Repro, reduce


#: How many units in the last place of the model's scale an output may move by when only the order of its
#: floating-point operations changes (reassociated sums, fused or folded constants): errors up to this size are
#: rounding, never a culprit.
ROUNDING_ULPS = 16


def model_scale(arrays: Iterable[np.ndarray]) -> float:
    """S: the median, over the floating-point arrays given (every tensor of the input model on the feeds), of each
    one's root-mean-square over its finite values: the typical size of the values the model computes. A median, so
    neither masks filled with the float minimum nor outputs that are near zero for this input set it."""
    sizes = []
    for a in arrays:
        if isinstance(a, np.ndarray) and a.dtype.kind == "f" and a.size:
            finite = a[np.isfinite(a)].astype(np.float64)
            sizes.append(float(np.sqrt(np.mean(finite**2))) if finite.size else 0.0)
    return float(np.median(sizes)) if sizes else 0.0


@dataclasses.dataclass
class Unmatched:
    """A pattern pass's best partial match left in its output, from onnxscript's MatchingTracer."""

    rule: str
    node: str
    status: str  # NO_MATCH | CONDITION_FAILED | REPLACEMENT_FAILED
    reason: str


@dataclasses.dataclass
class PassDiagnosis:
    index: int
    name: str
    own: list[TensorError]  # graph outputs against the previous model
    cumulative: list[TensorError]  # graph outputs against the input model
    record: PassRecord  # time, op delta, parameter bytes
    unmatched: list[Unmatched] = dataclasses.field(default_factory=list)  # pattern passes: why candidates stayed

    @property
    def own_rel(self) -> float:
        return max((e.rel for e in self.own), default=0.0)


@dataclasses.dataclass
class DebugReport:
    tolerance: float
    passes: list[PassDiagnosis]
    #: S, the model's scale (``model_scale`` of the input model's tensors on the feeds), which sets the error floor.
    scale: float = 0.0
    culprit: int | None = None  # index into passes
    first_node: str | None = None
    first_tensor: TensorError | None = None
    tensors: list[TensorError] = dataclasses.field(default_factory=list)  # the culprit's mapped intermediates
    worst: int | None = None  # the pass diffed: the culprit, else the largest own error
    diff: GraphDiff | None = None
    diff_svg: str = ""
    repro: Repro | None = None
    reduce_note: str = ""  # why the culprit could not be reduced

    def floor(self, dtype: np.dtype = np.dtype(np.float32)) -> float:
        """The error floor for a tensor of ``dtype``: ROUNDING_ULPS · ε(dtype) · S / tolerance.

        Errors are relative to max(‖reference‖₂, √n · floor), so a pass is over the tolerance only where its error
        exceeds both tolerance · ‖reference‖₂ and ROUNDING_ULPS ulps of the model's scale S per element: a tensor
        that is near zero for this input (a detector's map with nothing to detect) is measured against the scale
        of the model's values rather than against its own vanishing size. Non-float tensors get no floor.
        """
        dtype = np.dtype(dtype)
        if dtype.kind != "f" or not self.tolerance:
            return 0.0
        return ROUNDING_ULPS * float(np.finfo(dtype).eps) * self.scale / self.tolerance

    def floor_note(self) -> str:
        """One sentence saying how errors are measured, for the report's text."""
        return (f"Errors are relative to max(‖reference‖₂, √n · floor), floor = {ROUNDING_ULPS}·ε·S / tolerance "
                f"= {self.floor():.3g} for float32 with S = {self.scale:.3g} (the median RMS of the input model's float "
                f"tensors on these inputs): a difference within {ROUNDING_ULPS} ulps of the model's scale is "
                f"rounding, even where an output is near zero.")  # fmt: skip

    def to_json(self) -> str:
        data = dataclasses.asdict(dataclasses.replace(self, diff_svg="", repro=None))
        del data["diff_svg"]
        data["floor"], data["floor_note"] = self.floor(), self.floor_note()
        if self.repro is not None:
            data["repro"] = {"nodes": self.repro.nodes, "depth": self.repro.depth, "error": self.repro.error}
        return json.dumps(data, indent=2)


def _build(step: str | Mapping[str, Any] | BitfoldPass, calibration: Any) -> BitfoldPass:
    p = step if isinstance(step, BitfoldPass) else Recipe.from_list([step]).build(calibration)[0]
    if p.needs_calibration:
        if calibration is None:
            raise BitfoldError(f"pass '{p.name}' needs calibration data; pass --calibration FILE.npz or a source name.")
        if p.calibration is None:  # a pass instance the caller built without it
            p.calibration = calibration
    return p


def _errors(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], names: Sequence[str], report: DebugReport) -> list[TensorError]:
    return [TensorError.of(n, got[n], ref[n], report.floor(np.asarray(ref[n]).dtype)) for n in names]


def debug(
    model: ir.Model,
    steps: Sequence[str | Mapping[str, Any] | BitfoldPass],
    feeds: Mapping[str, np.ndarray],
    calibration: Any = None,
    tolerance: float = 1e-3,
    reduce_culprit: bool = False,
) -> DebugReport:
    """Run ``steps`` on a copy of ``model`` one at a time and locate the first pass and node exceeding ``tolerance``."""
    current = clone(model)
    outputs = [v.name for v in current.graph.outputs]
    computed = run_exposing(current, feeds, [v.name for n in current.graph for v in n.outputs if v.dtype in _MAYBE_FLOAT])
    reference = {name: computed[name] for name in outputs}
    report = DebugReport(tolerance, [], scale=model_scale([*feeds.values(), *computed.values()]))
    del computed
    previous = reference
    worst: tuple[float, ir.Model, ir.Model] | None = None
    for index, step in enumerate(steps):
        p = _build(step, calibration)
        before = clone(current)
        record = run_pass(current, p)
        now = run_exposing(current, feeds)
        diagnosis = PassDiagnosis(index, p.name, _errors(now, previous, outputs, report), _errors(now, reference, outputs, report), record, _unmatched(p, current))
        report.passes.append(diagnosis)
        if report.culprit is None and diagnosis.own_rel > tolerance:
            report.culprit = index
            _locate(report, before, current, feeds)
            if reduce_culprit and report.first_tensor is not None:
                tensor = report.first_tensor.reference or report.first_tensor.name
                try:
                    report.repro = reduce(before, p if isinstance(step, BitfoldPass) else step, tensor, feeds, calibration, tolerance)
                except BitfoldError as e:
                    report.reduce_note = str(e)
        if report.culprit == index or (report.culprit is None and (worst is None or diagnosis.own_rel > worst[0])):
            report.worst, worst = index, (diagnosis.own_rel, before, clone(current))
        previous = now
    if worst is not None:
        report.diff = diff(worst[1], worst[2])
        report.diff_svg = to_svg(worst[1], worst[2], report.diff) if report.diff.size else ""
    return report


def _unmatched(p: BitfoldPass, model: ir.Model) -> list[Unmatched]:
    """Dry-run a pattern pass's rules (a ``rule_set()`` method) on its output with a tracer; a tracer makes
    onnxscript's ``apply_to_model`` change nothing, and the copy keeps even its constant propagation away."""
    if not hasattr(p, "rule_set"):
        return []
    from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

    tracer = MatchingTracer()
    p.rule_set().apply_to_model(clone(model), tracer=tracer)
    return [
        Unmatched(rule.name or type(rule).__name__, info.root_node.name or info.root_node.op_type, info.status.name,
                  info.match_result.reason or "the pattern does not match here")
        for rule, infos in tracer.best_matches_map.items()
        for info in infos
        if info.status != MatchStatus.SUCCESS
    ]  # fmt: skip


_MAYBE_FLOAT = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE, None})


def _mapping(before: ir.Model, after: ir.Model) -> dict[str, str]:
    """Float tensors of ``after`` → the tensor of ``before`` they stand for: same name, else through provenance."""
    maybe_float = (ir.DataType.FLOAT, None)  # untyped intermediates are checked on their computed arrays
    floats = {v.name: v for n in before.graph for v in n.outputs if v.dtype in maybe_float}
    origins = {n.name: n for n in before.graph}
    mapping = {v.name: v.name for n in after.graph for v in n.outputs if v.name in floats and v.dtype in maybe_float}
    groups: dict[str, list[ir.Node]] = {}
    for node in after.graph:
        names = [s for s in node.metadata_props.get(FROM_KEY, "").split(",") if s]
        if len(names) == 1 and names[0] in origins:
            groups.setdefault(names[0], []).append(node)
    graph_outputs = set(after.graph.outputs)
    taken = set(mapping.values())
    for origin, nodes in groups.items():
        members = set(nodes)
        exits = [n for n in nodes if any(v in graph_outputs or any(u not in members for u, _ in v.uses()) for v in n.outputs)]
        if len(exits) != 1 or len(exits[0].outputs) != len(origins[origin].outputs):
            continue
        for got, ref in zip(exits[0].outputs, origins[origin].outputs, strict=True):
            if got.name not in mapping and ref.name in floats and ref.name not in taken and got.dtype in maybe_float:
                mapping[got.name] = ref.name
                taken.add(ref.name)
    return mapping


def _locate(report: DebugReport, before: ir.Model, after: ir.Model, feeds: Mapping[str, np.ndarray]) -> None:
    """Name the first tensor (in the rewritten graph's order) that differs beyond tolerance, and its producer."""
    mapping = _mapping(before, after)
    order = [v.name for n in after.graph for v in n.outputs if v.name in mapping]
    got, ref = run_exposing(after, feeds, order), run_exposing(before, feeds, [mapping[n] for n in order])
    report.tensors = [
        dataclasses.replace(TensorError.of(n, got[n], ref[mapping[n]], report.floor(np.float32)), reference=mapping[n] if mapping[n] != n else "")
        for n in order
        if got[n].shape == ref[mapping[n]].shape and got[n].dtype == ref[mapping[n]].dtype == np.float32
    ]
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
    def ops(counts: dict[str, int], sign: str) -> str:
        return " ".join(f"{sign}{n} {op}" for op, n in counts.items())

    rows = "".join(
        f"<tr{' class=bad' if p.index == report.culprit else ''}><td>{p.index}</td><td>{html.escape(p.name)}</td>"
        f"<td>{p.own_rel:.3g}</td><td>{max((e.rel for e in p.cumulative), default=0):.3g}</td>"
        f"<td>{min((e.sqnr_db for e in p.own), default=float('inf')):.1f}</td><td>{p.record.seconds:.2f}</td>"
        f"<td>{html.escape(ops(p.record.ops_added, '+'))} {html.escape(ops(p.record.ops_removed, '-'))}</td>"
        f"<td>{p.record.param_bytes_before / 1e6:.3f} → {p.record.param_bytes_after / 1e6:.3f}</td></tr>"
        for p in report.passes
    )
    tensors = "".join(
        f"<tr{' class=bad' if e.rel > report.tolerance else ''}><td>{html.escape(e.name)}</td><td>{html.escape(e.reference)}</td><td>{e.rel:.3g}</td><td>{e.max_abs:.3g}</td>"
        f"<td>{e.cosine:.6f}</td></tr>"
        for e in report.tensors[:200]
    )
    verdict = (
        f"First pass over tolerance {report.tolerance:g}: <b>{html.escape(report.passes[report.culprit].name)}</b> (step {report.culprit}); "
        f"first node: <b>{html.escape(report.first_node or 'not localized')}</b>"
        if report.culprit is not None
        else f"No pass exceeds the tolerance {report.tolerance:g}."
    )
    verdict += f"<br>{html.escape(report.floor_note())}"
    if report.repro is not None:
        verdict += (f"<br>Reduced repro: {report.repro.nodes} nodes ({report.repro.depth} producer layers above the first bad tensor), "
                    f"pass error {report.repro.error:.3g} — repro.onnx, repro_inputs.npz and repro.toml beside this page.")  # fmt: skip
    elif report.reduce_note:
        verdict += f"<br>Not reduced: {html.escape(report.reduce_note)}"
    changes = ""
    if report.diff is not None and report.worst is not None:
        d = report.diff
        changes = (f"<h2>Graph diff of step {report.worst}: {html.escape(report.passes[report.worst].name)}</h2>"
                   f"<p>{len(d.added)} nodes added, {len(d.removed)} removed, {len(d.changed)} changed"
                   f"{' (first 60 and their neighbours drawn)' if d.size > 60 else ''}.</p>{report.diff_svg}")  # fmt: skip
    unmatched = "".join(
        f"<tr><td>{p.index}: {html.escape(p.name)}</td><td>{html.escape(u.rule)}</td><td>{html.escape(u.node)}</td>"
        f"<td>{u.status}</td><td>{html.escape(u.reason)}</td></tr>"
        for p in report.passes
        for u in p.unmatched
    )
    if unmatched:
        unmatched = ("<h2>Why patterns did not match (best partial matches left)</h2><table><tr><th>pass</th><th>rule</th>"
                     f"<th>node</th><th>status</th><th>reason</th></tr>{unmatched}</table>")  # fmt: skip
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font:14px sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px}}
tr.bad{{background:#fdd}} svg{{max-width:100%;height:auto}}</style></head><body><h1>{html.escape(title)}</h1><p>{verdict}</p>
<img alt="per-pass error" src="data:image/png;base64,{image}">
<h2>Passes</h2><table><tr><th>step</th><th>pass</th><th>own rel. error</th><th>cumulative rel. error</th><th>SQNR dB</th>
<th>seconds</th><th>ops</th><th>parameter MB</th></tr>{rows}</table>
{changes}
{unmatched}
<h2>Tensors of the culprit pass (rewritten graph order)</h2><table><tr><th>tensor</th><th>input graph's tensor (if renamed)</th>
<th>rel.</th><th>max abs</th><th>cosine</th></tr>{tensors}</table>
</body></html>"""
    write_atomic(path, page.encode())


def screenshot(page, png, size: tuple[int, int] = (1280, 1600)) -> bool:
    """Render an HTML file to PNG with headless Chromium; False when no Chromium is installed."""
    import shutil
    import subprocess
    from pathlib import Path

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        return False
    png = Path(png).resolve()
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size[0]},{size[1]}",
         f"--screenshot={png}", Path(page).resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return png.exists()
