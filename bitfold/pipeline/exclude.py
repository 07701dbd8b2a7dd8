"""The exclusion loop: keep a lossy step within an error budget by leaving its most harmful layers in float.

``keep_within(model, step, max_error, feeds)`` runs the step; if the graph outputs' relative L2 error against
the input model (over ``feeds``) exceeds ``max_error``, it measures each rewritten layer's contribution (the
error drop when that layer alone is excluded), excludes layers greedily from the largest contribution (binary
search on how many) until the error meets the budget, and reports which layers stayed float. The step must take
``exclude`` globs (quantize-weights, the multiplication-less passes, prune, split-outliers). Runs: 1 + L + log2 L;
passing the ``contributions`` of an earlier result for the same model and step (another budget) skips the L.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from bitfold.backends.ort import OrtRunnable
from bitfold.errors import BitfoldError
from bitfold.frontend.onnx_io import clone
from bitfold.passes.registry import FROM_KEY, PASS_KEY, as_calibration, get_pass
from bitfold.pipeline.instrument import build_passes, run_pass
from bitfold.pipeline.recipe import Recipe
from bitfold.pipeline.report import PipelineReport
from bitfold.quant.calibration import CalibrationData
from bitfold.summary import summarize


@dataclasses.dataclass
class Kept:
    """The result: the model, its error, the layers left float (in exclusion order) and every layer's contribution."""

    model: ir.Model
    report: PipelineReport
    error: float
    kept: list[str]
    contributions: dict[str, float]


def _outputs(model: ir.Model, feeds: list[Mapping[str, np.ndarray]]) -> np.ndarray:
    runner = OrtRunnable(model, device="cpu", optimization="basic")
    return np.concatenate([v.ravel().astype(np.float64) for f in feeds for v in runner.run(f).values()])


def _run_step(model: ir.Model, step: Mapping, calibration: CalibrationData | None) -> tuple[ir.Model, PipelineReport]:
    """``step`` run on a copy of ``model`` with the pass manager's instrumentation, as a one-step pipeline."""
    out = clone(model)
    (p,) = build_passes(Recipe.from_list([step]), calibration)
    report = PipelineReport(input=summarize(out), verified=False)
    report.passes.append(run_pass(out, p))
    report.output = summarize(out)
    return out, report


def keep_within(
    model: ir.Model,
    step: Mapping,
    max_error: float,
    feeds: list[Mapping[str, np.ndarray]],
    calibration: CalibrationData | None = None,
    contributions: Mapping[str, float] | None = None,
) -> Kept:
    """Run ``step`` on a copy of ``model``, leaving layers float until the output error is at most ``max_error``."""
    name = step["name"]
    if not any(f.name == "exclude" for f in dataclasses.fields(get_pass(name).Config)):
        raise BitfoldError(f"pass '{name}' takes no exclude globs, so the exclusion loop cannot leave layers out of it.")
    reference = _outputs(model, feeds)
    base = list(step.get("exclude", []))
    calibration = as_calibration(calibration)  # wrapped once: every attempt shares its statistics cache

    def attempt(extra: list[str]) -> tuple[ir.Model, PipelineReport, float]:
        out, report = _run_step(model, {**step, "exclude": base + [glob.escape(x) for x in extra]}, calibration)
        return out, report, float(np.linalg.norm(_outputs(out, feeds) - reference) / np.linalg.norm(reference))

    out, report, error = attempt([])
    if error <= max_error:
        return Kept(out, report, error, [], {})
    layers = sorted({s for n in out.graph if n.metadata_props.get(PASS_KEY) == name for s in n.metadata_props.get(FROM_KEY, "").split(",") if s})
    if contributions is None or set(contributions) != set(layers):
        contributions = {layer: error - attempt([layer])[2] for layer in layers}
    order = sorted(layers, key=lambda x: contributions[x], reverse=True)
    lo, hi = 1, len(order)  # smallest count of exclusions meeting the budget
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        result = attempt(order[:mid])
        if result[2] <= max_error:
            best, hi = (mid, result), mid - 1
        else:
            lo = mid + 1
    if best is None:
        raise BitfoldError(f"'{name}' exceeds max_error {max_error:g} even with every layer left float; the error comes from elsewhere.")
    count, (out, report, error) = best
    return Kept(out, report, error, order[:count], contributions)
