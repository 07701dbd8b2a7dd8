"""Folding a per-input-channel scale into the producer of a MatMul input (AWQ's equivalence step).

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
    MatMul with a constant weight read nowhere else (SwiGLU's up projection), ``LayerNormalization`` γ and β.
    x must be read only by ``consumers``.
    """
    if x.is_graph_output() or {user for user, _ in x.uses()} != consumers:
        return None
    producer = x.producer()
    channels = x.shape[-1] if x.shape is not None and isinstance(x.shape[-1], int) else None
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
        source = operand.producer()
        if source is None or source.op_type != "MatMul" or source.domain or len(operand.uses()) != 1:
            continue
        w = _const(source.inputs[1])
        if w is not None and w.ndim == 2 and w.shape[1] == channels and len(source.inputs[1].uses()) == 1:
            return lambda s, node=source: replace(node, 1, _const(node.inputs[1]) / s[None, :], "awq")
    return None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or not value.is_initializer() or value.const_value is None:
        return None
    return value.const_value.numpy()
