"""Graph edits shared by the transform passes: a ``Linear``'s weight and bias, per-channel scales, low-rank branches."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitfold.passes.initializers import add_initializer, copy_type, drop_if_unused
from bitfold.passes.registry import ISLAND_KEY
from bitfold.passes.scale_fold import scale_fold
from bitfold.passes.transforms.structure import Linear, find_norms


def float_dtype(value: ir.Value) -> np.dtype:
    """The floating numpy dtype ``value`` carries: its own type (or its constant's), else the first floating type
    found walking up through its untyped producers (a ``Cast``'s target and a ``Constant``'s tensor count), else
    float32."""
    queue, seen = [value], set()
    while queue:
        v = queue.pop(0)
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        dtype = v.dtype if v.dtype is not None or v.const_value is None else v.const_value.dtype
        if dtype is not None:
            if dtype.is_floating_point():
                return np.dtype(dtype.numpy())
            continue
        producer = v.producer()
        if producer is None:
            continue
        if producer.op_type == "Cast" and not producer.domain:
            to = ir.DataType(producer.attributes.get_int("to", ir.DataType.FLOAT))
            return np.dtype(to.numpy()) if to.is_floating_point() else np.dtype(np.float32)
        if producer.op_type == "Constant" and not producer.domain and "value" in producer.attributes:
            constant = producer.attributes["value"].as_tensor().dtype
            if constant.is_floating_point():
                return np.dtype(constant.numpy())
            continue  # an integer constant (a shape, split sizes, indices) says nothing about the float type
        queue.extend(producer.inputs)
    return np.dtype(np.float32)


def fresh_name(graph: ir.Graph, base: str, node: bool = False) -> str:
    """``base`` (or ``base_1``, ``base_2``...) unused by any value of ``graph`` (by any node, with ``node``)."""
    if node:
        taken = {n.name for n in graph}
    else:
        taken = {v.name for v in graph.inputs} | set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def set_weight(graph: ir.Graph, lin: Linear, w: np.ndarray, suffix: str) -> None:
    """Give ``lin.matmul`` a private initializer ``w`` ([K, N]); a tied source (``Transpose`` of a table) stays."""
    old = lin.matmul.inputs[1]
    dtype = float_dtype(old)
    base = old.name if old.is_initializer() else f"{lin.matmul.name}_weight"
    lin.weight = w.astype(dtype)
    lin.matmul.replace_input_with(1, add_initializer(graph, f"{base}_{suffix}", lin.weight))
    producer = old.producer()
    if producer is not None and not old.uses() and not old.is_graph_output():
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        drop_if_unused(graph, source)
    else:
        drop_if_unused(graph, old)


def set_bias(graph: ir.Graph, lin: Linear, b: np.ndarray, suffix: str) -> None:
    """Set ``lin``'s bias to ``b`` ([N]), inserting ``Add`` after the MatMul when it has none."""
    dtype = float_dtype(lin.matmul.inputs[1])
    if lin.bias_add is not None:
        index = next(i for i, v in enumerate(lin.bias_add.inputs) if v is not lin.matmul.outputs[0])
        old = lin.bias_add.inputs[index]
        lin.bias_add.replace_input_with(index, add_initializer(graph, f"{old.name}_{suffix}", b.reshape(old.shape.numpy()).astype(dtype)))
        drop_if_unused(graph, old)
        lin.bias = b.astype(dtype)
        return
    out = lin.matmul.outputs[0]
    readers = list(out.uses())
    bias = add_initializer(graph, f"{lin.matmul.name}_bias_{suffix}", b.astype(dtype))
    add = ir.node("Add", [out, bias], name=fresh_name(graph, f"{lin.matmul.name or out.name}_bias", node=True))
    result = add.outputs[0]
    copy_type(result, out)
    graph.insert_after(lin.matmul, add)
    for user, index in readers:
        user.replace_input_with(index, result)
    if out.is_graph_output():
        position = next(i for i, v in enumerate(graph.outputs) if v is out)
        name = out.name
        out.name = fresh_name(graph, f"{name}_no_bias")
        result.name = name
        graph.outputs[position] = result
    else:
        result.name = fresh_name(graph, f"{out.name}_biased")
    lin.bias_add, lin.bias = add, b.astype(dtype)


def absorber(graph: ir.Graph, x: ir.Value, readers: list[Linear], explicit: bool = False):
    """A function folding ``x ← x / s`` into x's producer, or None.

    ``passes.scale_fold`` (norm γ, LayerNorm, gated-MLP up projection) first; after a plain RMSNorm, a new γ
    ``Mul``; with ``explicit``, a per-channel ``Mul`` anywhere.
    """
    absorb = scale_fold(graph, x, {lin.matmul for lin in readers})
    if absorb is not None:
        return absorb
    producer = x.producer()
    plain = producer is not None and any(n.core is x and n.kind == "rms" and not n.has_affine for n in find_norms(graph))
    if plain or explicit:
        return lambda s: insert_scale(graph, x, 1.0 / s, "scale")
    return None


def insert_scale(graph: ir.Graph, x: ir.Value, factor: np.ndarray, suffix: str, op_type: str = "Mul") -> ir.Node:
    """Insert ``x ← x ⊙ factor`` (a per-channel ``Mul`` on the last axis; ``op_type = "Add"``: ``x ← x + factor``)
    in front of every reader of ``x``; ``factor`` takes x's dtype."""
    readers = list(x.uses())
    value = add_initializer(graph, f"{x.name}_{suffix}_factor", factor.astype(float_dtype(x)))
    mul = ir.node(op_type, [x, value], name=f"{x.name}_{suffix}")
    out = mul.outputs[0]
    out.name = f"{x.name}_{suffix}"
    copy_type(out, x)
    if x.producer() is not None:
        graph.insert_after(x.producer(), mul)
    else:
        graph.insert_before(readers[0][0], mul)
    for user, index in readers:
        user.replace_input_with(index, out)
    return mul


#: Metadata on the nodes of a low-rank branch (and on the linear it accompanies).
LOWRANK_KEY = "bitfold.lowrank"


def add_lowrank_branch(graph: ir.Graph, producer: ir.Node, x: ir.Value, l1: np.ndarray, l2: np.ndarray) -> list[ir.Node]:
    """``y ← y + (x·L1)·L2`` after ``producer`` (whose output is y); returns the MatMul, MatMul and Add added.

    The branch MatMuls carry ``bitfold.precision = "float32"``, so quantizers and cast-precision leave them alone.
    L1 and L2 take x's dtype (the MatMuls read x as it is).
    """
    y = producer.outputs[0]
    readers = list(y.uses())
    name = producer.name or y.name
    dtype = float_dtype(x)
    down = ir.node("MatMul", [x, add_initializer(graph, f"{name}_lowrank_l1", l1.astype(dtype))], name=fresh_name(graph, f"{name}_lowrank_down", node=True))
    up = ir.node("MatMul", [down.outputs[0], add_initializer(graph, f"{name}_lowrank_l2", l2.astype(dtype))], name=fresh_name(graph, f"{name}_lowrank_up", node=True))
    add = ir.node("Add", [y, up.outputs[0]], name=fresh_name(graph, f"{name}_lowrank_add", node=True))
    down.outputs[0].name = fresh_name(graph, f"{y.name}_lowrank_down")
    up.outputs[0].name = fresh_name(graph, f"{y.name}_lowrank")
    for node in (down, up, add):
        node.metadata_props[LOWRANK_KEY] = str(l1.shape[1])
    for node in (down, up):
        node.metadata_props[ISLAND_KEY] = "float32"
    graph.insert_after(producer, [down, up, add])
    result = add.outputs[0]
    copy_type(result, y)
    for user, index in readers:
        user.replace_input_with(index, result)
    if y.is_graph_output():
        position = next(i for i, v in enumerate(graph.outputs) if v is y)
        original = y.name
        y.name, result.name = fresh_name(graph, f"{original}_main"), original
        graph.outputs[position] = result
    else:
        result.name = fresh_name(graph, f"{y.name}_with_lowrank")
    return [down, up, add]
