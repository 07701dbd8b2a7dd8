"""The pass manager: runs a recipe and owns everything cross-cutting.

Per pass it measures wall time, the op histogram delta, parameter bytes before/after, and stamps provenance
(``bitfold.pass``) on any node a pass created without it (:mod:`bitfold.pipeline.instrument`). With
``verify=True`` it also, after every pass: runs ``onnx.checker`` and names the pass that broke validity; runs the
model under ONNX Runtime on sample inputs and records max abs / max rel error of every graph output against the
input model; and checks the pass's ``modified`` claim against :func:`bitfold.pipeline.instrument.change_key` (a
digest of the graph and its tensors, blind to the order of initializers). A step with ``max_error`` runs through
the exclusion loop (:mod:`bitfold.pipeline.exclude`).

Relative error is ``max|y - y_ref| / max|y_ref|`` per output (elementwise ratios explode near zero).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from bitfold.frontend.inputs import sample_feeds
from bitfold.passes.registry import BitfoldPass, as_calibration
from bitfold.pipeline.exclude import keep_within
from bitfold.pipeline.instrument import build_passes, check_valid, output_errors, run_outputs, run_pass
from bitfold.pipeline.recipe import Recipe, Step
from bitfold.pipeline.report import PassRecord, PipelineReport
from bitfold.summary import summarize

#: Called before each pass with (index, total, pass) and after it with the finished record.
PassStarted = Callable[[int, int, BitfoldPass], None]
PassFinished = Callable[[PassRecord], None]


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
        passes = build_passes(self.recipe, calibration)
        report = PipelineReport(input=summarize(model), verified=self.verify)
        reference = None
        if self.verify:
            feeds = dict(feeds) if feeds is not None else sample_feeds(model, shapes)
            reference = run_outputs(model, feeds, "the input model")
            check_valid(model, "the input model")
        for index, (step, p) in enumerate(zip(self.recipe.steps, passes, strict=True)):
            if self.on_pass_start:
                self.on_pass_start(index, len(passes), p)
            if step.max_error is not None:
                record = _run_within(model, step, calibration, feeds, shapes)
                if self.verify:
                    check_valid(model, f"the output of pass '{p.name}'")
                    record.errors = output_errors(reference, run_outputs(model, feeds, f"the output of pass '{p.name}'"))
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


def _run_within(model: ir.Model, step: Step, calibration: Any, feeds, shapes) -> PassRecord:
    """A step with ``max_error``: the exclusion loop on the verification feeds, else the first four calibration
    samples, else seeded sample inputs; the model's graph is replaced by the loop's result."""
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
