"""Lower a KV-cache decoder graph to ONNX Runtime's fused LLM kernels for generation.

bitfold's decoder graphs (:mod:`bitfold.llm.graph`) use standard ONNX ops so that every pass can read them. Decoding
one token through them on ONNX Runtime costs about 40 small kernels per layer, and the ``Concat`` of past and new
keys copies the whole cache at every step. This lowering rewrites a copy of the graph into what ORT runs fastest:

* each layer's attention (RoPE on q and k, the cache ``Concat``, grouped scores, soft-capping, the mask bias,
  softmax and the weighted sum) becomes one ``com.microsoft.GroupQueryAttention`` with rotary tables computed from the
  graph's own inverse frequencies; past and present then share one ``max_length`` buffer, which the caller binds
  to both (no copy of the cache per token); q, k and v linears of one input (``MatMul`` or ``MatMulNBits``, with
  their biases) become one packed linear feeding its packed-QKV input;
* a residual ``Add`` followed by the decomposed RMSNorm becomes ``SkipSimplifiedLayerNormalization``;
* optionally the head runs on the last position only (``logits [B, 1, V]``), which generation needs and prefill
  otherwise pays a whole ``S × vocab`` product for;
* optionally the cache is float16 (``kv_cache="float16"``, llama.cpp's default): q, k and v are cast to float16
  before attention and its output back, so decode reads half the cache bytes per step. Attention then computes in
  float16 too; the logits move by float16 rounding of q, k, v and the context, not by the weights.

The lowered graph assumes what generation feeds it: one sequence whose ``attention_mask`` is all ones (positions
``0 … total-1``); attention masks with holes need the standard graph. Everything else (weights, quantized
linears, bitfold's own ops) is left as the passes wrote it. Layers whose attention does not have the shape the exporter
writes (e.g. after a pass that inserts ops inside attention) make the whole lowering decline with the reason,
and the caller keeps the standard graph.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bitfold.backends.llm_match import (
    Attention, Decline, const, match_attention, num_layers, only_user, other, producer, scalar, slice_head,
)  # fmt: skip
from bitfold.errors import BitfoldError
from bitfold.frontend.onnx_io import clone

MS = "com.microsoft"


@dataclasses.dataclass
class Lowered:
    model: ir.Model
    attention: bool  # every layer's attention is one GroupQueryAttention (past and present share a buffer)
    skip_norms: int  # residual Add + RMSNorm pairs fused
    last_logits: bool
    reason: str = ""  # why attention was not fused


KV_CACHE_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}


def lower_decoder(model: ir.Model, max_length: int, last_logits: bool = False, kv_cache: str | None = None) -> Lowered:
    """A lowered copy of ``model`` (which is left unchanged). ``max_length`` sizes the rotary tables; ``kv_cache``
    (``"float32"`` or ``"float16"``) is the cache's element type when attention is fused (default: the graph's)."""
    if kv_cache is not None and kv_cache not in KV_CACHE_DTYPES:
        raise BitfoldError(f"kv_cache must be one of {', '.join(KV_CACHE_DTYPES)}, not '{kv_cache}'.")
    model = clone(model)
    graph = model.graph
    reason = ""
    try:
        layers = [match_attention(graph, i) for i in range(num_layers(graph))]
        if not layers:
            raise Decline("the graph has no past_key_values inputs")
    except Decline as error:
        layers, reason = [], str(error)
    if layers:
        _fuse_attention(model, layers, max_length, KV_CACHE_DTYPES[kv_cache] if kv_cache else None)
    fused = _fuse_skip_norms(graph)
    sliced = slice_head(graph) if last_logits else False
    ir.passes.common.RemoveUnusedNodesPass()(model)
    if layers or fused:
        model.opset_imports.setdefault(MS, 1)
    return Lowered(model, bool(layers), fused, sliced, reason)


def _flat(heads: ir.Value) -> ir.Value | None:
    """The ``[B, S, n * hd]`` tensor that ``heads`` (``[B, S, n, hd]``) is a reshape of, if there is one."""
    node = heads.producer()
    if node is None or node.op_type != "Reshape" or node.inputs[0].shape is None or len(node.inputs[0].shape) != 3:
        return None
    return node.inputs[0]


def _const_linear(node: ir.Node) -> bool:
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        return const(node.inputs[1]) is not None
    return (node.op_type == "MatMulNBits" and node.domain == MS and len(node.inputs) <= 4
            and all(const(v) is not None for v in node.inputs[1:] if v is not None))  # fmt: skip


def _linear(value: ir.Value) -> tuple[ir.Node, ir.Value | None] | None:
    """The ``MatMul`` / ``MatMulNBits`` by constant weights that computes ``value`` (and the constant bias added)."""
    node, bias = value.producer(), None
    if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        consts = [v for v in node.inputs if const(v) is not None]
        if len(consts) != 1 or len(list(node.outputs[0].uses())) != 1:
            return None
        bias, node = consts[0], other(node, consts[0]).producer()
    if node is None or len(list(node.outputs[0].uses())) != 1:
        return None
    return (node, bias) if _const_linear(node) else None


def _pack_qkv(graph: ir.Graph, flat: list[ir.Value | None], scope: str) -> ir.Value | None:
    """One linear for q, k and v when they are linears of one input of one kind (the packed-QKV form of
    GroupQueryAttention)."""
    if any(v is None for v in flat):
        return None
    found = [_linear(v) for v in flat]
    if any(f is None for f in found):
        return None
    return _pack(graph, [f[0] for f in found], [f[1] for f in found], scope)


def _pack(graph: ir.Graph, nodes: list[ir.Node], biases: list[ir.Value | None], scope: str) -> ir.Value | None:
    """One linear computing the outputs of ``nodes`` side by side (weights, scales, zero points and biases
    concatenated along the output axis), or None when they are not linears of one input of one kind."""
    first = nodes[0]
    if any(n.op_type != first.op_type or n.inputs[0] is not first.inputs[0] for n in nodes) or len({b is None for b in biases}) != 1:
        return None
    attrs = {k: a.value for k, a in first.attributes.items()}
    if first.op_type == "MatMulNBits":
        if any({k: a.value for k, a in n.attributes.items() if k != "N"} != {k: v for k, v in attrs.items() if k != "N"} or
               len(n.inputs) != len(first.inputs) for n in nodes):  # fmt: skip
            return None
        inputs = [np.concatenate([const(n.inputs[j]) for n in nodes], axis=0) for j in range(1, len(first.inputs))]
        attrs["N"] = sum(n.attributes["N"].as_int() for n in nodes)
    else:
        inputs = [np.concatenate([const(n.inputs[1]) for n in nodes], axis=1)]
    values = []
    for j, array in enumerate(inputs):
        value = ir.Value(name=f"{scope}/packed_{j}", const_value=ir.tensor(array))
        value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
        graph.register_initializer(value)
        values.append(value)
    node = ir.Node(first.domain, first.op_type, [first.inputs[0], *values], ir.convenience.convert_attributes(attrs),
                   name=f"{scope}/{first.op_type}")  # fmt: skip
    graph.insert_after(nodes[-1], node)
    out = node.outputs[0]
    out.type = first.outputs[0].type
    if biases[0] is not None:
        array = np.concatenate([const(b).reshape(-1) for b in biases])
        bias = ir.Value(name=f"{scope}/packed_bias", const_value=ir.tensor(array))
        bias.shape, bias.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
        graph.register_initializer(bias)
        add = ir.Node("", "Add", [out, bias], name=f"{scope}/Add")
        graph.insert_after(node, add)
        out = add.outputs[0]
        out.type = first.outputs[0].type
    return out


def _fuse_attention(model: ir.Model, layers: list[Attention], max_length: int, cache: ir.DataType | None) -> None:
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    mask, positions = inputs["attention_mask"], inputs.get("position_ids")
    compute = layers[0].query.dtype or ir.DataType.FLOAT  # the graph's activations
    dtype = cache or compute  # attention's and the cache's
    nodes: list[ir.Node] = []

    def add(op, *args, domain="", **attrs):
        node = ir.Node(domain, op, list(args), ir.convenience.convert_attributes(attrs), name=f"/model/ort_fusion/{op}_{len(nodes)}")
        nodes.append(node)
        return node

    def initializer(name, array):
        value = ir.Value(name=name, const_value=ir.tensor(array))
        value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
        graph.register_initializer(value)
        return value

    one = initializer("/model/ort_fusion/one", np.array([1], np.int64))
    seqlens = add("Cast", add("Sub", add("ReduceSum", mask, one, keepdims=0).outputs[0], one).outputs[0], to=ir.DataType.INT32).outputs[0]
    total = add("Cast", add("Squeeze", add("Shape", mask, start=1, end=2).outputs[0]).outputs[0], to=ir.DataType.INT32).outputs[0]
    tables: dict[bytes, tuple[ir.Value, ir.Value]] = {}
    np_dtype = dtype.numpy()
    for layer in layers:
        key = layer.inv_freq.tobytes()
        if key not in tables:
            angles = np.arange(max_length, dtype=np.float64)[:, None] * layer.inv_freq[None, :]
            n = len(tables)
            tables[key] = (initializer(f"/model/ort_fusion/cos_cache_{n}", np.cos(angles).astype(np_dtype)),
                           initializer(f"/model/ort_fusion/sin_cache_{n}", np.sin(angles).astype(np_dtype)))  # fmt: skip
    for layer in layers:
        i = layer.index
        flat = [_flat(v) for v in (layer.query, layer.key, layer.value)]
        packed = _pack_qkv(graph, flat, f"/model/layers.{i}/self_attn/qkv_proj")
        if packed is not None:
            flat = [packed, None, None]
        else:
            flat = [v if v is not None else add("Reshape", t, initializer(f"/model/layers.{i}/ort_fusion/{name}_shape", np.array([0, 0, -1], np.int64))).outputs[0]
                    for v, t, name in zip(flat, (layer.query, layer.key, layer.value), "qkv", strict=True)]  # fmt: skip
        if dtype != compute:
            flat = [add("Cast", v, to=dtype).outputs[0] if v is not None else None for v in flat]
        cos, sin = tables[layer.inv_freq.tobytes()]
        past_k = next(v for v in graph.inputs if v.name == f"past_key_values.{i}.key")
        past_v = next(v for v in graph.inputs if v.name == f"past_key_values.{i}.value")
        gqa = ir.Node(MS, "GroupQueryAttention", [*flat, past_k, past_v, seqlens, total, cos, sin, positions],
                      ir.convenience.convert_attributes({
                          "num_heads": layer.heads, "kv_num_heads": layer.kv_heads, "scale": layer.scale,
                          "softcap": layer.softcap, "local_window_size": layer.window or -1,
                          "do_rotary": 1, "rotary_interleaved": 0}),
                      num_outputs=3, name=f"/model/layers.{i}/self_attn/GroupQueryAttention")  # fmt: skip
        nodes.append(gqa)
        out, present_k, present_v = gqa.outputs
        out.shape, out.type = layer.context.shape, ir.TensorType(dtype)
        if dtype != compute:
            out = add("Cast", out, to=compute).outputs[0]
            out.shape = layer.context.shape
        out.type = layer.context.type
        ir.convenience.replace_all_uses_with(layer.context, out)
        for idx, old in enumerate(list(graph.outputs)):
            if old.name in (f"present.{i}.key", f"present.{i}.value"):
                new = present_k if old.name.endswith(".key") else present_v
                new.shape, new.type = ir.Shape([old.shape[0], old.shape[1], "max_length", old.shape[3]]), ir.TensorType(dtype)
                old.name = f"{old.name}_unfused"
                new.name = old.name.removesuffix("_unfused")
                graph.outputs[idx] = new
        for past in (past_k, past_v):
            past.shape = ir.Shape([past.shape[0], past.shape[1], "max_length", past.shape[3]])
            past.type = ir.TensorType(dtype)
    for node in nodes:
        graph.append(node)
    graph.sort()  # topological order again (the new nodes were appended at the end)


# ----------------------------------------------------------------------------------------------- norms, head
def _fuse_skip_norms(graph: ir.Graph) -> int:
    """``Add(a, b)`` → decomposed RMSNorm (``Pow 2 → ReduceMean → Add ε → Sqrt → Div → Mul γ``) becomes
    ``SkipSimplifiedLayerNormalization(a, b, γ)``; its fourth output (the sum) replaces the Add's other uses."""
    fused = 0
    for pow_node in [n for n in graph if n.op_type == "Pow" and n.domain in ("", "ai.onnx")]:
        try:
            s = pow_node.inputs[0]
            add = producer(s, "Add")
            if any(const(v) is not None for v in add.inputs) or scalar(pow_node.inputs[1]) != 2.0:
                continue
            mean = only_user(pow_node.outputs[0], "ReduceMean")
            axes = const(mean.inputs[1]) if len(mean.inputs) > 1 else None
            keep = mean.attributes.get("keepdims")
            if axes is None or list(axes.reshape(-1)) != [-1] or (keep is not None and keep.as_int() != 1):
                continue
            eps_add = only_user(mean.outputs[0], "Add")
            eps = scalar(other(eps_add, mean.outputs[0]))
            sqrt = only_user(eps_add.outputs[0], "Sqrt")
            div = only_user(sqrt.outputs[0], "Div")
            if div.inputs[0] is not s:
                continue
            users = [n for n, _ in div.outputs[0].uses()]
            gamma_mul = users[0] if len(users) == 1 and users[0].op_type == "Mul" else None
            gamma = other(gamma_mul, div.outputs[0]) if gamma_mul is not None else None
            if gamma is None or const(gamma) is None or const(gamma).ndim != 1:
                continue
        except Decline:
            continue
        node = ir.Node(MS, "SkipSimplifiedLayerNormalization", [add.inputs[0], add.inputs[1], gamma],
                       ir.convenience.convert_attributes({"epsilon": float(eps)}), num_outputs=4,
                       name=f"{add.name}/SkipSimplifiedLayerNormalization")  # fmt: skip
        y, _, _, total = node.outputs
        for new, old in ((y, gamma_mul.outputs[0]), (total, s)):
            new.shape, new.type = old.shape, old.type
        graph.insert_before(add, node)
        ir.convenience.replace_all_uses_with(gamma_mul.outputs[0], y)
        ir.convenience.replace_all_uses_with(s, total)
        for idx, out in enumerate(graph.outputs):  # a residual that is also a graph output
            if out is s:
                graph.outputs[idx] = total
        fused += 1
    return fused
