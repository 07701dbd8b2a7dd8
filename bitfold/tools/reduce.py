"""Shrink a model to the smallest subgraph on which one pass still shows its error: a bug report anyone can rerun.

``reduce(model, step, tensor, feeds)`` takes the pass's input model and the tensor the debugger found going wrong
first. Candidate subgraphs are backward cones ending at that tensor, grown one producer layer at a time (depth 1
is the tensor's producer alone): every value a cone reads from outside it becomes a graph input, fed with the
value the full model computes on ``feeds`` (and, for passes that calibrate, on every calibration sample). The
first cone on which the pass's own output error exceeds the tolerance is the repro: the fewest layers of
producers above the tensor that still show the bug. Every candidate is a valid model (inputs typed from the
captured arrays, unused initializers dropped).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import networkx as nx
import numpy as np
import onnx_ir as ir

from bitfold.frontend.onnx_io import clone
from bitfold.errors import BitfoldError
from bitfold.passes.analysis import to_networkx
from bitfold.passes.registry import BitfoldPass
from bitfold.pipeline import Recipe, run_pass
from bitfold.quant.calibration import CalibrationData
from bitfold.tools.compare import TensorError, run_exposing


@dataclasses.dataclass
class Repro:
    model: ir.Model  # the subgraph, before the pass
    feeds: dict[str, np.ndarray]
    calibration: CalibrationData | None
    nodes: int
    depth: int
    error: float  # the pass's relative L2 error on the subgraph's output


def _cone(model: ir.Model, tensor: str, depth: int) -> tuple[list[ir.Node], bool]:
    """Nodes within ``depth`` producer layers above ``tensor`` (graph order), and whether that is all its ancestors."""
    view = to_networkx(model.graph)
    producer = next((n for n in model.graph for v in n.outputs if v.name == tensor), None)
    if producer is None:
        raise BitfoldError(f"tensor '{tensor}' is not computed by any node of the model.")
    reach = nx.single_source_shortest_path_length(view.reverse(copy=False), producer, cutoff=depth - 1)
    whole = nx.ancestors(view, producer) | {producer}
    return [n for n in model.graph if n in reach], len(reach) == len(whole)


def _subgraph(model: ir.Model, nodes: list[ir.Node], tensor: str, captured: Mapping[str, np.ndarray]) -> ir.Model:
    copy = clone(model)
    position = {id(n): i for i, n in enumerate(model.graph)}
    everything = list(copy.graph)
    keep = [everything[position[id(n)]] for n in nodes]
    kept = set(keep)
    inputs: dict[str, ir.Value] = {}
    for node in keep:
        for index, value in enumerate(node.inputs):
            if value is None or value.is_initializer() or value.const_value is not None:
                continue
            if value.producer() is not None and value.producer() in kept:
                continue
            if value.name not in inputs:
                array = captured[value.name]
                inputs[value.name] = ir.Value(name=value.name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
            node.replace_input_with(index, inputs[value.name])
    output = next(v for n in keep for v in n.outputs if v.name == tensor)
    copy.graph.outputs.clear()
    copy.graph.inputs.clear()
    copy.graph.remove([n for n in everything if n not in kept], safe=True)
    copy.graph.inputs.extend(inputs.values())
    copy.graph.outputs.append(output)
    for name in [name for name, v in copy.graph.initializers.items() if not v.uses()]:
        del copy.graph.initializers[name]
    return copy


def reduce(
    model: ir.Model,
    step: str | Mapping | BitfoldPass,
    tensor: str,
    feeds: Mapping[str, np.ndarray],
    calibration: CalibrationData | None = None,
    tolerance: float = 1e-3,
) -> Repro:
    """The smallest backward cone above ``tensor`` on which ``step`` still exceeds ``tolerance``."""
    samples = list(calibration) if calibration is not None else []
    depth = 1
    while True:
        nodes, complete = _cone(model, tensor, depth)
        cone = set(nodes)
        outside = list(dict.fromkeys(
            v.name for n in nodes for v in n.inputs
            if v is not None and not v.is_initializer() and v.const_value is None and v.producer() not in cone
        ))  # fmt: skip

        def values(sample: Mapping[str, np.ndarray], outside: list[str] = outside) -> dict[str, np.ndarray]:
            inner = run_exposing(model, sample, [x for x in outside if x not in sample])
            return {x: sample[x] if x in sample else inner[x] for x in outside}

        captured = values(feeds)
        sub = _subgraph(model, nodes, tensor, captured)
        sub_feeds = {v.name: captured[v.name] for v in sub.graph.inputs}
        sub_calibration = None
        if samples:
            sub_calibration = CalibrationData([values(sample) for sample in samples])
        p = step if isinstance(step, BitfoldPass) else Recipe.from_list([step]).build(sub_calibration)[0]
        if p.needs_calibration:
            if sub_calibration is None:
                raise BitfoldError(f"pass '{p.name}' needs calibration data to be reduced; pass --calibration.")
            p.calibration = sub_calibration  # a caller's instance: calibrated on the subgraph's own inputs
        after = clone(sub)
        run_pass(after, p)
        (ref,) = run_exposing(sub, sub_feeds, []).values()
        (got,) = run_exposing(after, sub_feeds, []).values()
        error = TensorError.of(tensor, got, ref)
        if error.rel > tolerance:
            return Repro(sub, sub_feeds, sub_calibration, len(nodes), depth, error.rel)
        if complete:
            raise BitfoldError(f"no subgraph ending at '{tensor}' shows the pass's error alone; it needs the rest of the model.")
        depth += 1
