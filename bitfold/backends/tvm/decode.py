"""The decode form of a KV-cache graph for TVM's fixed-capacity cache: attention reads the cache in place.

The exported graph concatenates past and new keys and values (``present = Concat(past, new)``) and scores the
queries against ``Transpose(present keys)``: at every decode step that copies the whole cache twice, the largest cost
of a TVM decode step. For one new token (S = 1) the same attention splits exactly into the past and the new part:

    scores = Concat(q · past_kᵀ, q · new_kᵀ)        (the key cache is held transposed, [B, kv, hd, C]: the scores'
                                                     long axis C is the cache's contiguous one)
    probs  = softmax(capped scores + mask bias)     (the graph's own nodes, unchanged)
    ctx    = probs[..., :C] · past_v + probs[..., C:] · new_v

and ``present.{i}.key|value`` become the new token's key and value alone (``[B, kv, 1, hd]``), which the caller
writes into its cache slot. The decode form's ``past_key_values.{i}.key`` inputs are ``[B, kv, hd, C]``. Every other
node (RoPE, norms, linears, bitfold's ops) is left as it is.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitfold.backends.llm_match import Decline, match_attention, num_layers, producer
from bitfold.frontend.onnx_io import clone


def split_attention(model: ir.Model) -> tuple[ir.Model | None, str]:
    """The decode form of ``model`` (a copy), or None and the reason a layer does not match."""
    model = clone(model)
    graph = model.graph
    try:
        layers = [match_attention(graph, i) for i in range(num_layers(graph))]
    except Decline as error:
        return None, str(error)
    if not layers:
        return None, "the graph has no past_key_values inputs"
    consts: dict[tuple, ir.Value] = {}

    def i64(values) -> ir.Value:
        array = np.asarray(values, np.int64)
        key = (array.shape, array.tobytes())
        if key not in consts:
            value = ir.Value(name=f"/model/tvm_decode/const_{len(consts)}", const_value=ir.tensor(array))
            value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.INT64)
            graph.register_initializer(value)
            consts[key] = value
        return consts[key]

    outputs = {v.name: (index, v) for index, v in enumerate(graph.outputs)}
    for layer in layers:
        i, scope = layer.index, f"/model/layers.{layer.index}/self_attn/decode"
        nodes: list[ir.Node] = []

        def op(op_type, *inputs, **attrs):
            node = ir.Node("", op_type, list(inputs), ir.convenience.convert_attributes(attrs), name=f"{scope}/{op_type}_{len(nodes)}")
            nodes.append(node)
            return node.outputs[0]

        k_index, present_k = outputs[f"present.{i}.key"]
        v_index, present_v = outputs[f"present.{i}.value"]
        past_k, new_k = producer(present_k, "Concat").inputs
        past_v, new_v = producer(present_v, "Concat").inputs
        q = layer.scores.inputs[0]  # scaled queries: [B, kv, group, 1, hd] (grouped) or [B, heads, 1, hd]
        grouped = layer.heads != layer.kv_heads
        last2 = [0, 1, 3, 2]
        if past_k.shape is not None:
            past_k.shape = ir.Shape([past_k.shape[0], past_k.shape[1], past_k.shape[3], past_k.shape[2]])
        if grouped:
            rows = op("Reshape", q, i64([0, layer.kv_heads, -1, layer.head_dim]))  # [B, kv, group, hd]
            past = op("Unsqueeze", op("MatMul", rows, past_k), i64([3]))  # [B, kv, group, 1, C]
            new = op("MatMul", q, op("Transpose", op("Unsqueeze", new_k, i64([2])), perm=[0, 1, 2, 4, 3]))
        else:
            past = op("MatMul", q, past_k)  # [B, heads, 1, C]
            new = op("MatMul", q, op("Transpose", new_k, perm=last2))
        scores = op("Concat", past, new, axis=-1)  # [..., 1, C + 1]
        probs = layer.weighted.inputs[0]
        p_past = op("Slice", probs, i64([0]), i64([-1]), i64([-1]))
        p_new = op("Slice", probs, i64([-1]), i64([np.iinfo(np.int64).max]), i64([-1]))
        if grouped:
            ctx_past = op("Unsqueeze", op("MatMul", op("Squeeze", p_past, i64([3])), past_v), i64([3]))
            ctx_new = op("Mul", p_new, op("Unsqueeze", new_v, i64([2])))
        else:
            ctx_past = op("MatMul", p_past, past_v)
            ctx_new = op("Mul", p_new, new_v)
        context = op("Add", ctx_past, ctx_new)

        for node in nodes[: nodes.index(scores.producer()) + 1]:
            graph.insert_before(layer.scores, node)
        for node in nodes[nodes.index(scores.producer()) + 1 :]:
            graph.insert_before(layer.weighted, node)
        context.shape, context.type = layer.weighted.outputs[0].shape, layer.weighted.outputs[0].type
        ir.convenience.replace_all_uses_with(layer.scores.outputs[0], scores)
        ir.convenience.replace_all_uses_with(layer.weighted.outputs[0], context)
        for index, old, new_value in ((k_index, present_k, new_k), (v_index, present_v, new_v)):
            name = old.name
            old.name = f"{name}_full"
            graph.outputs[index] = _renamed(graph, new_value, name, old)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return model, ""


def _renamed(graph: ir.Graph, value: ir.Value, name: str, like: ir.Value) -> ir.Value:
    """``value`` as a graph output called ``name`` (through an Identity when it feeds other nodes too)."""
    node = ir.Node("", "Identity", [value], name=f"{name}/Identity")
    graph.insert_after(value.producer(), node)
    out = node.outputs[0]
    out.name, out.type = name, like.type
    out.shape = ir.Shape([like.shape[0], like.shape[1], 1, like.shape[3]]) if like.shape is not None else None
    return out
