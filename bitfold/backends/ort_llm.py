"""Lower a KV-cache decoder graph to ONNX Runtime's fused LLM kernels for generation.

bitfold's decoder graphs (:mod:`bitfold.llm.graph`) use standard ONNX ops so that every pass can read them. Decoding
one token through them on ONNX Runtime costs about 40 small kernels per layer, and the ``Concat`` of past and new
keys copies the whole cache at every step. This lowering rewrites a copy of the graph into what ORT runs fastest:

* each layer's attention (RoPE on q and k, the cache ``Concat``, grouped scores, soft-capping, the mask bias,
  softmax and the weighted sum) becomes one ``com.microsoft.GroupQueryAttention`` with rotary tables computed from the
  graph's own inverse frequencies; past and present then share one ``max_length`` buffer, which the caller binds
  to both (no copy of the cache per token);
* a residual ``Add`` followed by the decomposed RMSNorm becomes ``SkipSimplifiedLayerNormalization``;
* optionally the head runs on the last position only (``logits [B, 1, V]``), which generation needs and prefill
  otherwise pays a whole ``S × vocab`` product for.

The lowered graph assumes what generation feeds it: one sequence whose ``attention_mask`` is all ones (positions
``0 … total-1``); attention masks with holes need the standard graph. Everything else (weights, quantized
linears,
bitfold's own ops) is left as the passes wrote it. Layers whose attention does not have the shape the exporter
writes (e.g. after a pass that inserts ops inside attention) make the whole lowering decline with the reason,
and the caller keeps the standard graph.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bitfold.frontend.onnx_io import clone

MS = "com.microsoft"


@dataclasses.dataclass
class Lowered:
    model: ir.Model
    attention: bool  # every layer's attention is one GroupQueryAttention (past and present share a buffer)
    skip_norms: int  # residual Add + RMSNorm pairs fused
    last_logits: bool
    reason: str = ""  # why attention was not fused


class _Decline(Exception):
    pass


def lower_decoder(model: ir.Model, max_length: int, last_logits: bool = False) -> Lowered:
    """A lowered copy of ``model`` (which is left unchanged). ``max_length`` sizes the rotary tables."""
    model = clone(model)
    graph = model.graph
    reason = ""
    try:
        layers = [_match_layer(graph, i) for i in range(_num_layers(graph))]
        if not layers:
            raise _Decline("the graph has no past_key_values inputs")
    except _Decline as error:
        layers, reason = [], str(error)
    if layers:
        _fuse_attention(model, layers, max_length)
    fused = _fuse_skip_norms(graph)
    sliced = _slice_head(graph) if last_logits else False
    ir.passes.common.RemoveUnusedNodesPass()(model)
    if layers or fused:
        model.opset_imports.setdefault(MS, 1)
    return Lowered(model, bool(layers), fused, sliced, reason)


# ----------------------------------------------------------------------------------------------- graph helpers
def _num_layers(graph: ir.Graph) -> int:
    return sum(1 for v in graph.inputs if v.name.startswith("past_key_values.") and v.name.endswith(".key"))


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _producer(value: ir.Value | None, *ops: str) -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or node.domain not in ("", "ai.onnx") or (ops and node.op_type not in ops):
        found = "a graph input" if node is None else node.op_type
        raise _Decline(f"expected {' or '.join(ops)} producing '{getattr(value, 'name', None)}', found {found}")
    return node


def _only_user(value: ir.Value, *ops: str) -> ir.Node:
    users = [node for node, _ in value.uses()]
    if len(users) != 1 or users[0].op_type not in ops:
        raise _Decline(f"'{value.name}' should feed one {' or '.join(ops)}, it feeds {[n.op_type for n in users]}")
    return users[0]


def _perm(node: ir.Node) -> list[int]:
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else []


def _scalar(value: ir.Value) -> float:
    array = _const(value)
    if array is None or array.size != 1:
        raise _Decline(f"'{value.name}' should be a constant scalar")
    return float(array.reshape(()))


def _other(node: ir.Node, value: ir.Value) -> ir.Value:
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a


# ----------------------------------------------------------------------------------------------- attention
@dataclasses.dataclass
class _Layer:
    index: int
    query: ir.Value  # [B, S, heads, hd] before the head transpose (post q-norm where there is one)
    key: ir.Value
    value: ir.Value
    context: ir.Value  # [B, S, heads * hd]: what the output projection reads
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    softcap: float
    window: int  # 0: global
    inv_freq: np.ndarray


def _match_layer(graph: ir.Graph, i: int) -> _Layer:
    outputs = {v.name: v for v in graph.outputs}
    present_k, present_v = outputs.get(f"present.{i}.key"), outputs.get(f"present.{i}.value")
    if present_k is None or present_v is None:
        raise _Decline(f"layer {i} has no present.{i}.key/value outputs")
    cat_k, cat_v = _producer(present_k, "Concat"), _producer(present_v, "Concat")
    past_k, new_k = cat_k.inputs
    past_v, new_v = cat_v.inputs
    if past_k.name != f"past_key_values.{i}.key" or past_v.name != f"past_key_values.{i}.value":
        raise _Decline(f"layer {i}: the cache Concat does not read past_key_values.{i}")
    kv_heads, head_dim = int(past_k.shape[1]), int(past_k.shape[3])

    # keys: RoPE(Transpose(k)); values: Transpose(v)
    key, inv_freq = _rope_input(new_k, head_dim)
    key = _head_transpose(key)
    value = _head_transpose(new_v)

    # scores = MatMul(q·scale [grouped], Transpose(keys) [unsqueezed])
    key_t = _only_user(present_k, "Transpose")
    if _perm(key_t) != [0, 1, 3, 2]:
        raise _Decline(f"layer {i}: unexpected key transpose {_perm(key_t)}")
    tail = key_t.outputs[0]
    user = _only_user(tail, "Unsqueeze", "MatMul")
    if user.op_type == "Unsqueeze":
        tail, user = user.outputs[0], _only_user(user.outputs[0], "MatMul")
    scores_mm = user
    if scores_mm.inputs[1] is not tail:
        raise _Decline(f"layer {i}: keys are not the right operand of the score MatMul")
    q = scores_mm.inputs[0]
    node = _producer(q, "Reshape", "Mul")
    if node.op_type == "Reshape":
        node = _producer(node.inputs[0], "Mul")
    q_rot = node.inputs[0] if _const(node.inputs[1]) is not None else node.inputs[1]
    scale = _scalar(_other(node, q_rot))
    query, q_freq = _rope_input(q_rot, head_dim)
    if not np.array_equal(q_freq, inv_freq):
        raise _Decline(f"layer {i}: q and k use different rotary tables")
    query = _head_transpose(query)
    heads = int(query.shape[2]) if query.shape is not None and isinstance(query.shape[2], int) else 0
    if not heads:
        raise _Decline(f"layer {i}: unknown number of query heads")

    # soft-capping, mask bias, softmax, weighted sum, back to [B, S, heads*hd]
    scores = scores_mm.outputs[0]
    node = _only_user(scores, "Div", "Add")
    softcap = 0.0
    if node.op_type == "Div":
        softcap = _scalar(node.inputs[1])
        tanh = _only_user(node.outputs[0], "Tanh")
        mul = _only_user(tanh.outputs[0], "Mul")
        if abs(_scalar(_other(mul, tanh.outputs[0])) - softcap) > 1e-6 * softcap:
            raise _Decline(f"layer {i}: soft-cap Div and Mul differ")
        scores = mul.outputs[0]
        node = _only_user(scores, "Add")
    bias_add = node
    window = _window(_other(bias_add, scores))
    softmax = _only_user(bias_add.outputs[0], "Softmax")
    ctx_mm = _only_user(softmax.outputs[0], "MatMul")
    v_in = ctx_mm.inputs[1]
    if v_in is not present_v:
        if _producer(v_in, "Unsqueeze").inputs[0] is not present_v:
            raise _Decline(f"layer {i}: the weighted sum does not read the value cache")
    node = _only_user(ctx_mm.outputs[0], "Reshape", "Transpose")
    if node.op_type == "Reshape":
        node = _only_user(node.outputs[0], "Transpose")
    if _perm(node) != [0, 2, 1, 3]:
        raise _Decline(f"layer {i}: unexpected context transpose {_perm(node)}")
    context = _only_user(node.outputs[0], "Reshape").outputs[0]
    return _Layer(i, query, key, value, context, heads, kv_heads, head_dim, scale, softcap, window, inv_freq)


def _head_transpose(value: ir.Value) -> ir.Value:
    node = _producer(value, "Transpose")
    if _perm(node) != [0, 2, 1, 3]:
        raise _Decline(f"unexpected head transpose {_perm(node)}")
    return node.inputs[0]


def _rope_input(value: ir.Value, head_dim: int) -> tuple[ir.Value, np.ndarray]:
    """The tensor ``value`` is the rotary embedding of, and the inverse frequencies used (a partial rotary embedding,
    ``Concat(rope(x[..., :d]), x[..., d:])``, rotates the first ``d = 2 * inv_freq.size`` dims)."""
    node = _producer(value, "Add", "Concat")
    outer = None
    if node.op_type == "Concat":
        outer = _producer(node.inputs[1], "Split")
        if node.inputs[1] is not outer.outputs[1] or len(node.inputs) != 2:
            raise _Decline("partial rotary embedding not recognised")
        node = _producer(node.inputs[0], "Add")
    by_table = {}  # the Mul by the cos table holds the input; the other multiplies rotate_half(x) by the sin table
    for mul in (_producer(v, "Mul") for v in node.inputs):
        for pos, operand in enumerate(mul.inputs):
            kind = _trig(operand)
            if kind:
                by_table[kind] = (mul, mul.inputs[1 - pos])
    if set(by_table) != {"Cos", "Sin"}:
        raise _Decline("rotary embedding not recognised (no cos/sin tables)")
    x = by_table["Cos"][1]
    inv_freq = _inv_freq(by_table["Cos"][0])
    half = _producer(by_table["Sin"][1], "Concat")
    neg, x1 = half.inputs
    split = _producer(x1, "Split")
    if _producer(neg, "Neg").inputs[0] is not split.outputs[1] or split.inputs[0] is not x:
        raise _Decline("rotary embedding not recognised (rotate-half)")
    if outer is not None:
        if x is not outer.outputs[0]:
            raise _Decline("partial rotary embedding not recognised")
        x = outer.inputs[0]
        if inv_freq.size % 8:  # what ORT's kernel accepts
            raise _Decline(f"ORT's GroupQueryAttention rotates a multiple of 16 dims, the model rotates {2 * inv_freq.size}")
    elif 2 * inv_freq.size != head_dim:
        raise _Decline(f"rotary tables of {2 * inv_freq.size} dims for heads of {head_dim}")
    return x, inv_freq


def _trig(value: ir.Value) -> str:
    node = value.producer()
    while node is not None and node.op_type in ("Unsqueeze", "Cast"):
        node = node.inputs[0].producer()
    return node.op_type if node is not None and node.op_type in ("Cos", "Sin") else ""


def _inv_freq(mul: ir.Node) -> np.ndarray:
    for operand in mul.inputs:
        if _trig(operand) == "Cos":
            node = operand.producer()
            while node.op_type != "Cos":
                node = node.inputs[0].producer()
            emb = _producer(node.inputs[0], "Concat")
            freqs = _producer(emb.inputs[0], "Mul")
            for v in freqs.inputs:
                array = _const(v)
                if array is not None:
                    return array.reshape(-1).astype(np.float64)
    raise _Decline("rotary inverse frequencies are not a constant")


def _window(bias: ir.Value) -> int:
    """The sliding window of an attention-mask bias (0 = global), read from its ``k > q - window`` comparison."""
    seen, stack = set(), [bias]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Greater":
            sub = _producer(node.inputs[1], "Sub")
            return int(_scalar(sub.inputs[1]))
        stack.extend(v for v in node.inputs if v is not None)
    return 0


def _flat(heads: ir.Value) -> ir.Value | None:
    """The ``[B, S, n * hd]`` tensor that ``heads`` (``[B, S, n, hd]``) is a reshape of, if there is one."""
    node = heads.producer()
    if node is None or node.op_type != "Reshape" or node.inputs[0].shape is None or len(node.inputs[0].shape) != 3:
        return None
    return node.inputs[0]


def _const_linear(node: ir.Node) -> bool:
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        return _const(node.inputs[1]) is not None
    return (node.op_type == "MatMulNBits" and node.domain == MS and len(node.inputs) <= 4
            and all(_const(v) is not None for v in node.inputs[1:] if v is not None))  # fmt: skip


def _linear(value: ir.Value) -> tuple[ir.Node, ir.Value | None] | None:
    """The ``MatMul`` / ``MatMulNBits`` by constant weights that computes ``value`` (and the constant bias added)."""
    node, bias = value.producer(), None
    if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        consts = [v for v in node.inputs if _const(v) is not None]
        if len(consts) != 1 or len(list(node.outputs[0].uses())) != 1:
            return None
        bias, node = consts[0], _other(node, consts[0]).producer()
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
        inputs = [np.concatenate([_const(n.inputs[j]) for n in nodes], axis=0) for j in range(1, len(first.inputs))]
        attrs["N"] = sum(n.attributes["N"].as_int() for n in nodes)
    else:
        inputs = [np.concatenate([_const(n.inputs[1]) for n in nodes], axis=1)]
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
        array = np.concatenate([_const(b).reshape(-1) for b in biases])
        bias = ir.Value(name=f"{scope}/packed_bias", const_value=ir.tensor(array))
        bias.shape, bias.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
        graph.register_initializer(bias)
        add = ir.Node("", "Add", [out, bias], name=f"{scope}/Add")
        graph.insert_after(node, add)
        out = add.outputs[0]
        out.type = first.outputs[0].type
    return out


def _fuse_attention(model: ir.Model, layers: list[_Layer], max_length: int) -> None:
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    mask, positions = inputs["attention_mask"], inputs.get("position_ids")
    dtype = layers[0].query.dtype or ir.DataType.FLOAT
    nodes: list[ir.Node] = []

    def add(op, *args, domain="", **attrs):
        node = ir.Node(domain, op, list(args), ir.convenience.convert_attributes(attrs), name=f"/model/ort_fusion/{op}_{len(nodes)}")
        nodes.append(node)
        return node

    def const(name, array):
        value = ir.Value(name=name, const_value=ir.tensor(array))
        value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
        graph.register_initializer(value)
        return value

    one = const("/model/ort_fusion/one", np.array([1], np.int64))
    seqlens = add("Cast", add("Sub", add("ReduceSum", mask, one, keepdims=0).outputs[0], one).outputs[0], to=ir.DataType.INT32).outputs[0]
    total = add("Cast", add("Squeeze", add("Shape", mask, start=1, end=2).outputs[0]).outputs[0], to=ir.DataType.INT32).outputs[0]
    tables: dict[bytes, tuple[ir.Value, ir.Value]] = {}
    np_dtype = dtype.numpy()
    for layer in layers:
        key = layer.inv_freq.tobytes()
        if key not in tables:
            angles = np.arange(max_length, dtype=np.float64)[:, None] * layer.inv_freq[None, :]
            n = len(tables)
            tables[key] = (const(f"/model/ort_fusion/cos_cache_{n}", np.cos(angles).astype(np_dtype)),
                           const(f"/model/ort_fusion/sin_cache_{n}", np.sin(angles).astype(np_dtype)))  # fmt: skip
    for layer in layers:
        i = layer.index
        flat = [_flat(v) for v in (layer.query, layer.key, layer.value)]
        packed = _pack_qkv(graph, flat, f"/model/layers.{i}/self_attn/qkv_proj")
        if packed is not None:
            flat = [packed, None, None]
        else:
            flat = [v if v is not None else add("Reshape", t, const(f"/model/layers.{i}/ort_fusion/{name}_shape", np.array([0, 0, -1], np.int64))).outputs[0]
                    for v, t, name in zip(flat, (layer.query, layer.key, layer.value), "qkv", strict=True)]  # fmt: skip
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
        out.shape, out.type = layer.context.shape, layer.context.type
        ir.convenience.replace_all_uses_with(layer.context, out)
        for idx, name in enumerate(graph.outputs):
            if name.name in (f"present.{i}.key", f"present.{i}.value"):
                old = graph.outputs[idx]
                new = present_k if old.name.endswith(".key") else present_v
                new.shape, new.type = ir.Shape([old.shape[0], old.shape[1], "max_length", old.shape[3]]), old.type
                old.name = f"{old.name}_unfused"
                new.name = old.name.removesuffix("_unfused")
                graph.outputs[idx] = new
        past_k.shape = ir.Shape([past_k.shape[0], past_k.shape[1], "max_length", past_k.shape[3]])
        past_v.shape = ir.Shape([past_v.shape[0], past_v.shape[1], "max_length", past_v.shape[3]])
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
            add = _producer(s, "Add")
            if any(_const(v) is not None for v in add.inputs) or _scalar(pow_node.inputs[1]) != 2.0:
                continue
            mean = _only_user(pow_node.outputs[0], "ReduceMean")
            axes = _const(mean.inputs[1]) if len(mean.inputs) > 1 else None
            keep = mean.attributes.get("keepdims")
            if axes is None or list(axes.reshape(-1)) != [-1] or (keep is not None and keep.as_int() != 1):
                continue
            eps_add = _only_user(mean.outputs[0], "Add")
            eps = _scalar(_other(eps_add, mean.outputs[0]))
            sqrt = _only_user(eps_add.outputs[0], "Sqrt")
            div = _only_user(sqrt.outputs[0], "Div")
            if div.inputs[0] is not s:
                continue
            users = [n for n, _ in div.outputs[0].uses()]
            gamma_mul = users[0] if len(users) == 1 and users[0].op_type == "Mul" else None
            gamma = _other(gamma_mul, div.outputs[0]) if gamma_mul is not None else None
            if gamma is None or _const(gamma) is None or _const(gamma).ndim != 1:
                continue
        except _Decline:
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


def _slice_head(graph: ir.Graph) -> bool:
    """Compute the head on the last position only: the input of the head's linear is sliced to ``[B, 1, H]``."""
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None or logits.producer() is None:
        return False
    node = logits.producer()
    while node.op_type in ("Mul", "Div", "Tanh", "Cast", "Add") and node.domain in ("", "ai.onnx"):
        dynamic = [v for v in node.inputs if v is not None and _const(v) is None]
        if len(dynamic) != 1 or dynamic[0].producer() is None:
            return False
        node = dynamic[0].producer()
    x = node.inputs[0]
    starts = ir.Value(name="/lm_head/last/starts", const_value=ir.tensor(np.array([-1], np.int64)))
    ends = ir.Value(name="/lm_head/last/ends", const_value=ir.tensor(np.array([np.iinfo(np.int64).max], np.int64)))
    axes = ir.Value(name="/lm_head/last/axes", const_value=ir.tensor(np.array([1], np.int64)))
    for v in (starts, ends, axes):
        v.shape, v.type = ir.Shape([1]), ir.TensorType(ir.DataType.INT64)
        graph.register_initializer(v)
    sl = ir.Node("", "Slice", [x, starts, ends, axes], name="/lm_head/last/Slice")
    last = sl.outputs[0]
    last.type = x.type
    if x.shape is not None:
        last.shape = ir.Shape([x.shape[0], 1, *list(x.shape)[2:]])
    graph.insert_before(node, sl)
    node.replace_input_with(0, last)
    logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[2]]) if logits.shape is not None else None
    return True
