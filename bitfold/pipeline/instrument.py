"""Per-pass instrumentation: what the pass manager measures and checks around every pass it runs.

:func:`run_pass` measures wall time, the op histogram delta and parameter bytes before/after, and stamps
provenance (``bitfold.pass``) on any node a pass created without it. With ``verify=True`` it also runs
``onnx.checker`` (naming the pass that broke validity), runs the model under ONNX Runtime on sample inputs and
records max abs / max rel error of every graph output against the reference outputs, and checks the pass's
``modified`` claim against :func:`bitfold.quant.calibration.model_key` (a digest of the graph and its tensors),
taken with every graph's initializers in name order: initializers are a name-keyed mapping, so a pass that only
re-registers them in another order (onnx-ir's shape inference does) has not changed the model.

Relative error is ``max|y - y_ref| / max|y_ref|`` per output (elementwise ratios explode near zero).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from bitfold.backends.ort import OrtRunnable
from bitfold.errors import BitfoldError, VerificationError
from bitfold.frontend.onnx_io import serialized
from bitfold.passes.registry import FROM_KEY, PASS_KEY, BitfoldPass
from bitfold.pipeline.recipe import Recipe
from bitfold.pipeline.report import OutputError, PassRecord
from bitfold.quant.calibration import CalibrationData, model_key
from bitfold.summary import op_histogram, parameter_stats


class PassContractError(RuntimeError):
    """A pass misreported ``modified`` (an internal bug in that pass, not a user error)."""


def build_passes(recipe: Recipe, calibration: CalibrationData | None) -> list[BitfoldPass]:
    """The recipe's passes constructed with ``calibration``; refused, before any runs, when one needs calibration
    and there is none."""
    passes = recipe.build(calibration)
    for p in passes:
        if p.needs_calibration and p.calibration is None:
            raise BitfoldError(f"pass '{p.name}' needs calibration data; pass --calibration FILE.npz or a source name.")
    return passes


def run_pass(model: ir.Model, p: BitfoldPass, verify: bool = False, feeds=None, reference=None) -> PassRecord:
    """Run one pass in place with the manager's instrumentation (timing, op delta, bytes, provenance stamps; with
    ``verify``, the checker and the output errors against ``reference`` on ``feeds``)."""
    hist_before = op_histogram(model)
    nodes_before = set(ir.traversal.RecursiveGraphIterator(model.graph))
    bytes_before = parameter_stats(model)[1]
    fingerprint = change_key(model) if verify else None
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
        changed = change_key(model) != fingerprint
        if changed != result.modified:
            said = "modified" if result.modified else "not modified"
            raise PassContractError(f"pass '{p.name}' reported {said} but the model {'did' if changed else 'did not'} change")
        check_valid(model, f"the output of pass '{p.name}'")
        outputs = run_outputs(model, feeds, f"the output of pass '{p.name}'")
        record.errors = output_errors(reference, outputs)
    return record


def change_key(model: ir.Model) -> str:
    """:func:`~bitfold.quant.calibration.model_key` of ``model`` with every graph's initializers taken in name
    order, so two models that differ only in the order their initializers were registered get the same key. The
    model is left as it was."""
    with _initializers_in_name_order(model):
        return model_key(model)


@contextlib.contextmanager
def _initializers_in_name_order(model: ir.Model) -> Iterator[None]:
    """Present each graph's initializers sorted by name for the duration of the block, then restore their order.

    Only the order of the mapping's backing dict changes (``UserDict.data``); no value is added or removed, so
    ownership and uses are untouched.
    """
    saved = []
    for graph in model.graphs():
        initializers = graph.initializers
        saved.append((initializers, initializers.data))
        initializers.data = dict(sorted(initializers.data.items()))
    try:
        yield
    finally:
        for initializers, data in saved:
            initializers.data = data


def _params(p: BitfoldPass) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(p.config).items()}


def check_valid(model: ir.Model, who: str) -> None:
    """Run ``onnx.checker``; ``who`` names the model in the error."""
    try:
        with serialized(model) as source:
            onnx.checker.check_model(onnx.load_from_string(source) if isinstance(source, bytes) else source)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise VerificationError(f"{who} fails onnx.checker: {first}") from e


def run_outputs(model: ir.Model, feeds, who: str) -> list[np.ndarray]:
    """The graph outputs under ONNX Runtime on ``feeds``; ``who`` names the model in the error."""
    try:
        runnable = OrtRunnable(model, device="cpu")
        outputs = runnable.session.run(None, dict(feeds))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VerificationError(f"{who} does not run under ONNX Runtime: {first}") from e
    return outputs


def output_errors(reference: list[np.ndarray], outputs: list[np.ndarray]) -> list[OutputError]:
    """Max abs and max rel error of each output against its reference."""
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
