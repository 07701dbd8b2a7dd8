"""Initializer bookkeeping shared by weight-rewriting passes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitfold.frontend.stream import current_store


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named ``base`` (or ``base_1``, ``base_2``... if taken). While a
    :class:`~bitfold.frontend.stream.WeightStore` is active (streamed optimize), a large array goes to its file and
    the initializer reads it from there when used."""
    name, i = base, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    store = current_store()
    tensor = store.put(name, array) if store is not None else ir.tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an initializer nothing reads any more (never a graph input or output)."""
    if value.name in graph.initializers and not value.uses() and not value.is_graph_output() and not value.is_graph_input():
        graph.initializers.pop(value.name)


def copy_type(dst: ir.Value, src: ir.Value) -> None:
    """Give ``dst`` the type and shape ``src`` has, where known (exported graphs leave some values untyped)."""
    if src.type is not None:
        dst.type = src.type
    if src.shape is not None:
        dst.shape = src.shape
