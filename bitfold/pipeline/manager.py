"""The pass manager: runs a recipe and owns everything cross-cutting.

Per pass it measures wall time, the op histogram delta, parameter bytes before/after, and stamps provenance
(``bitfold.pass``) on any node a pass created without it. With ``verify=True`` it also, after every pass:
runs ``onnx.checker`` and names the pass that broke validity; runs the model under ONNX Runtime on sample inputs
and records max abs / max rel error of every graph output against the input model; and checks the pass's
``modified`` claim against :func:`bitfold.quant.calibration.model_key` (a digest of the graph and its tensors).

Relative error is ``max|y - y_ref| / max|y_ref|`` per output (elementwise ratios explode near zero).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bitfold.backends.ort import OrtRunnable
from bitfold.errors import BitfoldError, VerificationError
from bitfold.frontend.inputs import sample_feeds
from bitfold.frontend.onnx_io import serialized
from bitfold.passes.registry import FROM_KEY, PASS_KEY, BitfoldPass, as_calibration
from bitfold.pipeline.recipe import Recipe, Step
from bitfold.pipeline.report import OutputError, PassRecord, PipelineReport
from bitfold.quant.calibration import model_key
from bitfold.summary import op_histogram, parameter_stats, summarize

#: Called before each pass with (index, total, pass) and after it with the finished record.
PassStarted = Callable[[int, int, BitfoldPass], None]
PassFinished = Callable[[PassRecord], None]


class PassContractError(RuntimeError):
    """A pass misreported ``modified`` (an internal bug in that pass, not a user error)."""


class Pipeline:
    """A recipe plus how to run it: ``Pipeline(recipe, verify=True).run(model)``.

    ``verify`` turns on the checker, numeric comparison and ``modified`` checks after each pass. ``on_pass_start``
    and ``on_pass_end`` are the hooks through which progress is shown; passes themselves never print.
    """

    def __init__(
        self,
        recipe: Recipe | list,
        *,
        verify: bool = False,
        on_pass_start: PassStarted | None = None,
        on_pass_end: PassFinished | None = None,
    ) -> None:
        self.recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_list(recipe)
        self.verify = verify
        self.on_pass_start = on_pass_start
        self.on_pass_end = on_pass_end

    def run(
        self,
        model: ir.Model,
        calibration: Any = None,
        *,
        feeds: Mapping[str, np.ndarray] | None = None,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
    ) -> tuple[ir.Model, PipelineReport]:
        """Rewrite ``model`` in place and return it with its report.

        ``calibration`` (a :class:`~bitfold.quant.calibration.CalibrationData` or an iterable of feed dicts, wrapped
        once so the passes share its statistics cache) is the constructor argument of every pass. ``feeds`` are the
        verification inputs (default: seeded samples, symbolic dimensions sized by ``shapes`` or 1).
        """
        calibration = as_calibration(calibration)
        passes = self.recipe.build(calibration)
        for p in passes:
            if p.needs_calibration and p.calibration is None:
                raise BitfoldError(f"pass '{p.name}' needs calibration data; pass --calibration FILE.npz or a source name.")
        report = PipelineReport(input=summarize(model), verified=self.verify)
        reference = None
        if self.verify:
            feeds = dict(feeds) if feeds is not None else sample_feeds(model, shapes)
            reference = _run(model, feeds, "the input model")
            _check(model, "the input model")
        for index, (step, p) in enumerate(zip(self.recipe.steps, passes, strict=True)):
            if self.on_pass_start:
                self.on_pass_start(index, len(passes), p)
            if step.max_error is not None:
                record = _run_within(model, step, calibration, feeds, shapes)
                if self.verify:
                    _check(model, f"the output of pass '{p.name}'")
                    record.errors = _errors(reference, _run(model, feeds, f"the output of pass '{p.name}'"))
            else:
                record = run_pass(model, p, self.verify, feeds, reference)
            report.passes.append(record)
            if self.on_pass_end:
                self.on_pass_end(record)
        report.output = summarize(model)
        return model, report


def optimize(
    model: ir.Model,
    recipe: Recipe | list,
    calibration: Any = None,
    *,
    verify: bool = False,
    feeds: Mapping[str, np.ndarray] | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[ir.Model, PipelineReport]:
    """Run ``recipe`` over ``model`` (rewritten in place); returns the model and a :class:`PipelineReport`."""
    return Pipeline(recipe, verify=verify).run(model, calibration, feeds=feeds, shapes=shapes)


def run_pass(model: ir.Model, p: BitfoldPass, verify: bool = False, feeds=None, reference=None) -> PassRecord:
    """Run one pass in place with the manager's instrumentation (timing, op delta, bytes, provenance stamps; with
    ``verify``, the checker and the output errors against ``reference`` on ``feeds``)."""
    hist_before = op_histogram(model)
    nodes_before = set(ir.traversal.RecursiveGraphIterator(model.graph))
    bytes_before = parameter_stats(model)[1]
    fingerprint = model_key(model) if verify else None
    start = time.perf_counter()
    result = p(model)
    seconds = time.perf_counter() - start
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node not in nodes_before and PASS_KEY not in node.metadata_props:
            node.metadata_props[PASS_KEY] = p.name
            node.metadata_props.setdefault(FROM_KEY, "")
    hist_after = op_histogram(model)
    record = PassRecord(
        name=p.name,
        params=_params(p),
        seconds=seconds,
        modified=result.modified,
        nodes_before=sum(hist_before.values()),
        nodes_after=sum(hist_after.values()),
        ops_added=dict(sorted((hist_after - hist_before).items())),
        ops_removed=dict(sorted((hist_before - hist_after).items())),
        param_bytes_before=bytes_before,
        param_bytes_after=parameter_stats(model)[1],
        notes=list(getattr(p, "notes", [])),
    )
    if verify:
        changed = model_key(model) != fingerprint
        if changed != result.modified:
            said = "modified" if result.modified else "not modified"
            raise PassContractError(f"pass '{p.name}' reported {said} but the model {'did' if changed else 'did not'} change")
        _check(model, f"the output of pass '{p.name}'")
        outputs = _run(model, feeds, f"the output of pass '{p.name}'")
        record.errors = _errors(reference, outputs)
    return record


def _run_within(model: ir.Model, step: Step, calibration: Any, feeds, shapes) -> PassRecord:
    """A step with ``max_error``: the exclusion loop on the verification feeds, else the first four calibration
    samples, else seeded sample inputs; the model's graph is replaced by the loop's result."""
    from bitfold.tools.exclude import keep_within

    samples = [dict(feeds)] if feeds is not None else list(calibration)[:4] if calibration is not None else [sample_feeds(model, shapes)]
    plain = {k: v for k, v in step.to_dict().items() if k != "max_error"}
    kept = keep_within(model, plain, step.max_error, samples, calibration)
    model.graph = kept.model.graph
    model.functions.clear()
    model.functions.update(kept.model.functions)
    record = kept.report.passes[0]
    record.params["max_error"] = step.max_error
    record.notes.append(
        f"exclusion loop: output error {kept.error:.4g} <= {step.max_error:g} with {len(kept.kept)} layer(s) kept float"
        + (f": {', '.join(kept.kept)}" if kept.kept else "")
    )
    return record


def _params(p: BitfoldPass) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(p.config).items()}


def _check(model: ir.Model, who: str) -> None:
    try:
        with serialized(model) as source:
            onnx.checker.check_model(onnx.load_from_string(source) if isinstance(source, bytes) else source)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise VerificationError(f"{who} fails onnx.checker: {first}") from e


def _run(model: ir.Model, feeds, who: str) -> list[np.ndarray]:
    try:
        runnable = OrtRunnable(model, device="cpu")
        outputs = runnable.session.run(None, dict(feeds))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VerificationError(f"{who} does not run under ONNX Runtime: {first}") from e
    return outputs


def _errors(reference: list[np.ndarray], outputs: list[np.ndarray]) -> list[OutputError]:
    errors = []
    for index, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            errors.append(OutputError(index, float("inf"), float("inf")))
            continue
        diff = np.abs(out - ref)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        errors.append(OutputError(index, max_abs, max_abs / scale if scale > 0 else max_abs))
    return errors
