"""Model facts shared by ``bitfold inspect``, the pipeline report and the demo: ops, parameters, bytes, I/O."""

from __future__ import annotations

from collections import Counter
from typing import Any

import networkx as nx
import onnx_ir as ir

from bitfold.frontend.inputs import input_specs
from bitfold.passes.analysis import to_networkx


def op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def op_histogram(model: ir.Model) -> Counter[str]:
    """Op counts over the main graph and every subgraph (If/Loop bodies)."""
    return Counter(op_key(node) for node in ir.traversal.RecursiveGraphIterator(model.graph))


def parameter_stats(model: ir.Model) -> tuple[int, int]:
    """(element count, bytes) of the main graph's initializers."""
    count = size = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            count += value.const_value.size
            size += value.const_value.nbytes
    return count, size


def summarize(model: ir.Model) -> dict[str, Any]:
    """JSON-ready summary of a model."""
    histogram = op_histogram(model)
    params, nbytes = parameter_stats(model)
    view = to_networkx(model.graph)
    return {
        "nodes": sum(histogram.values()),
        "ops": dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": params,
        "parameter_bytes": nbytes,
        "initializers": len(model.graph.initializers),
        "depth": nx.dag_longest_path_length(view) + 1 if len(view) else 0,
        "opsets": dict(sorted(model.opset_imports.items())),
        "functions": len(model.functions),
        "inputs": [spec.describe() for spec in input_specs(model)],
        "outputs": [f"{v.name}: {v.dtype.name if v.dtype else '?'}{_shape(v)}" for v in model.graph.outputs],
        "producer": f"{model.producer_name or '?'} {model.producer_version or ''}".strip(),
        "ir_version": model.ir_version,
    }


def _shape(value: ir.Value) -> str:
    if value.shape is None:
        return "[any shape]"
    return "[" + "x".join(str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape) + "]"
