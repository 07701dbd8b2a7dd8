"""Folding a per-input-channel scale into the producer of a MatMul input: AWQ's equivalence step (quantize-weights),
and where smooth and affine put 1/s first.

x ← x / s is absorbed by: ``Mul`` by a constant per-channel vector (an RMSNorm γ), ``Mul`` whose other operand
comes from a MatMul with a constant weight read nowhere else (SwiGLU's up projection: its columns are divided),
and ``LayerNormalization`` (γ and β). The consumers then take diag(s) W, so the graph is unchanged before rounding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitfold.passes.initializers import add_initializer, drop_if_unused


def scale_fold(graph: ir.Graph, x: ir.Value, consumers: set[ir.Node]):
    """A function folding x ← x / s into x's producer, or None when the producer cannot absorb it.

    Absorbers: ``Mul`` by a constant per-channel vector (an RMSNorm γ), ``Mul`` whose other operand comes from a
    MatMul with a constant weight read nowhere else, with or without a constant bias ``Add`` (SwiGLU's up
    projection; its output read by nothing else and no graph output), ``LayerNormalization`` γ and β.
    x must be read only by ``consumers``.
    """
    if x.is_graph_output() or {user for user, _ in x.uses()} != consumers:
        return None
    producer = x.producer()
    channels = _channels(x, consumers)
    if producer is None or channels is None or producer.domain:
        return None

    def replace(node: ir.Node, index: int, array: np.ndarray, suffix: str) -> None:
        old = node.inputs[index]
        node.replace_input_with(index, add_initializer(graph, f"{old.name}_{suffix}", array.astype(old.const_value.dtype.numpy())))
        drop_if_unused(graph, old)

    if producer.op_type == "LayerNormalization" and all(_const(v) is not None for v in producer.inputs[1:]):
        def fold_layernorm(s):
            for index in range(1, len(producer.inputs)):
                replace(producer, index, _const(producer.inputs[index]) / s, "awq")
        return fold_layernorm
    if producer.op_type != "Mul":
        return None
    for index, operand in enumerate(producer.inputs):
        c = _const(operand)
        if c is not None and c.size == channels and c.shape[-1:] == (channels,):
            return lambda s, i=index: replace(producer, i, _const(producer.inputs[i]) / s.reshape(c.shape), "awq")
    for operand in producer.inputs:
        source = _matmul_source(operand)
        if source is None or len(operand.uses()) != 1 or operand.is_graph_output() or source.outputs[0].is_graph_output():
            continue
        w = _const(source.inputs[1])
        if w is not None and w.ndim == 2 and w.shape[1] == channels and len(source.inputs[1].uses()) == 1:
            def fold_projection(s, node=source):
                replace(node, 1, _const(node.inputs[1]) / s[None, :], "awq")
                bias = _bias(node)  # looked up when folding: a pass may have given the projection a bias since
                if bias is not None:
                    add, index = bias
                    replace(add, index, _const(add.inputs[index]) / s.reshape(_const(add.inputs[index]).shape), "awq")
            return fold_projection
    return None


def _channels(x: ir.Value, consumers: set[ir.Node]) -> int | None:
    """x's last-axis width: from its shape, else from the consumers' constant [K, N] MatMul weights (graphs from other
    exporters often annotate no intermediate shapes)."""
    if x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int):
        return x.shape[-1]
    widths = set()
    for node in consumers:
        w = _const(node.inputs[1]) if node.op_type == "MatMul" and len(node.inputs) > 1 and node.inputs[0] is x else None
        if w is None or w.ndim != 2:
            return None
        widths.add(w.shape[0])
    return widths.pop() if len(widths) == 1 else None


def _matmul_source(value: ir.Value) -> ir.Node | None:
    """The MatMul computing ``value``, directly or through its constant bias ``Add``."""
    producer = value.producer()
    if producer is not None and not producer.domain and producer.op_type == "Add" and _bias_operand(producer) is not None:
        value = producer.inputs[1 - _bias_operand(producer)]
        producer = value.producer() if len(value.uses()) == 1 else None
    if producer is None or producer.op_type != "MatMul" or producer.domain:
        return None
    return producer


def _bias_operand(add: ir.Node) -> int | None:
    index = next((i for i, v in enumerate(add.inputs) if _const(v) is not None), None)
    return index if index is not None and len(add.inputs) == 2 else None


def _bias(matmul: ir.Node) -> tuple[ir.Node, int] | None:
    users = list(matmul.outputs[0].uses())
    if len(users) != 1 or users[0][0].op_type != "Add" or users[0][0].domain:
        return None
    index = _bias_operand(users[0][0])
    return None if index is None else (users[0][0], index)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()
