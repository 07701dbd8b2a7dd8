"""Structure of the attention layers bitfold's decoder graphs hold (:mod:`bitfold.llm.graph`), for the backends'
lowerings: :func:`match_attention` walks one layer from its ``present.{i}.key/value`` outputs and returns the values
and nodes a fused kernel replaces, or raises :class:`Decline` with the reason the layer has another shape."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir


class Decline(Exception):
    pass



# ----------------------------------------------------------------------------------------------- graph helpers
def num_layers(graph: ir.Graph) -> int:
    return sum(1 for v in graph.inputs if v.name.startswith("past_key_values.") and v.name.endswith(".key"))


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def producer(value: ir.Value | None, *ops: str) -> ir.Node:
    node = value.producer() if value is not None else None
    if node is None or node.domain not in ("", "ai.onnx") or (ops and node.op_type not in ops):
        found = "a graph input" if node is None else node.op_type
        raise Decline(f"expected {' or '.join(ops)} producing '{getattr(value, 'name', None)}', found {found}")
    return node


def only_user(value: ir.Value, *ops: str) -> ir.Node:
    users = [node for node, _ in value.uses()]
    if len(users) != 1 or users[0].op_type not in ops:
        raise Decline(f"'{value.name}' should feed one {' or '.join(ops)}, it feeds {[n.op_type for n in users]}")
    return users[0]


def perm(node: ir.Node) -> list[int]:
    attr = node.attributes.get("perm")
    return list(attr.as_ints()) if attr is not None else []


def scalar(value: ir.Value) -> float:
    array = const(value)
    if array is None or array.size != 1:
        raise Decline(f"'{value.name}' should be a constant scalar")
    return float(array.reshape(()))


def other(node: ir.Node, value: ir.Value) -> ir.Value:
    a, b = node.inputs[0], node.inputs[1]
    return b if a is value else a


# ----------------------------------------------------------------------------------------------- attention
@dataclasses.dataclass
class Attention:
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
    # the nodes around the cache, for lowerings that keep RoPE and replace only the attention over the cache
    scores: ir.Node  # MatMul(scaled q [B, kv, group, S, hd] or [B, heads, S, hd], Transpose(keys) [unsqueezed])
    weighted: ir.Node  # MatMul(probabilities, values [unsqueezed])


def match_attention(graph: ir.Graph, i: int) -> Attention:
    outputs = {v.name: v for v in graph.outputs}
    present_k, present_v = outputs.get(f"present.{i}.key"), outputs.get(f"present.{i}.value")
    if present_k is None or present_v is None:
        raise Decline(f"layer {i} has no present.{i}.key/value outputs")
    cat_k, cat_v = producer(present_k, "Concat"), producer(present_v, "Concat")
    past_k, new_k = cat_k.inputs
    past_v, new_v = cat_v.inputs
    if past_k.name != f"past_key_values.{i}.key" or past_v.name != f"past_key_values.{i}.value":
        raise Decline(f"layer {i}: the cache Concat does not read past_key_values.{i}")
    kv_heads, head_dim = int(past_k.shape[1]), int(past_k.shape[3])

    # keys: RoPE(Transpose(k)); values: Transpose(v)
    key, inv_freq = rope_input(new_k, head_dim)
    key = head_transpose(key)
    value = head_transpose(new_v)

    # scores = MatMul(q·scale [grouped], Transpose(keys) [unsqueezed])
    key_t = only_user(present_k, "Transpose")
    if perm(key_t) != [0, 1, 3, 2]:
        raise Decline(f"layer {i}: unexpected key transpose {perm(key_t)}")
    tail = key_t.outputs[0]
    user = only_user(tail, "Unsqueeze", "MatMul")
    if user.op_type == "Unsqueeze":
        tail, user = user.outputs[0], only_user(user.outputs[0], "MatMul")
    scores_mm = user
    if scores_mm.inputs[1] is not tail:
        raise Decline(f"layer {i}: keys are not the right operand of the score MatMul")
    q = scores_mm.inputs[0]
    node = producer(q, "Reshape", "Mul")
    if node.op_type == "Reshape":
        node = producer(node.inputs[0], "Mul")
    q_rot = node.inputs[0] if const(node.inputs[1]) is not None else node.inputs[1]
    scale = scalar(other(node, q_rot))
    query, q_freq = rope_input(q_rot, head_dim)
    if not np.array_equal(q_freq, inv_freq):
        raise Decline(f"layer {i}: q and k use different rotary tables")
    query = head_transpose(query)
    heads = int(query.shape[2]) if query.shape is not None and isinstance(query.shape[2], int) else 0
    if not heads:
        raise Decline(f"layer {i}: unknown number of query heads")

    # soft-capping, mask bias, softmax, weighted sum, back to [B, S, heads*hd]
    scores = scores_mm.outputs[0]
    node = only_user(scores, "Div", "Add")
    softcap = 0.0
    if node.op_type == "Div":
        softcap = scalar(node.inputs[1])
        tanh = only_user(node.outputs[0], "Tanh")
        mul = only_user(tanh.outputs[0], "Mul")
        if abs(scalar(other(mul, tanh.outputs[0])) - softcap) > 1e-6 * softcap:
            raise Decline(f"layer {i}: soft-cap Div and Mul differ")
        scores = mul.outputs[0]
        node = only_user(scores, "Add")
    bias_add = node
    window = sliding_window(other(bias_add, scores))
    softmax = only_user(bias_add.outputs[0], "Softmax")
    ctx_mm = only_user(softmax.outputs[0], "MatMul")
    v_in = ctx_mm.inputs[1]
    if v_in is not present_v:
        if producer(v_in, "Unsqueeze").inputs[0] is not present_v:
            raise Decline(f"layer {i}: the weighted sum does not read the value cache")
    node = only_user(ctx_mm.outputs[0], "Reshape", "Transpose")
    if node.op_type == "Reshape":
        node = only_user(node.outputs[0], "Transpose")
    if perm(node) != [0, 2, 1, 3]:
        raise Decline(f"layer {i}: unexpected context transpose {perm(node)}")
    context = only_user(node.outputs[0], "Reshape").outputs[0]
    return Attention(i, query, key, value, context, heads, kv_heads, head_dim, scale, softcap, window, inv_freq, scores_mm, ctx_mm)


def head_transpose(value: ir.Value) -> ir.Value:
    node = producer(value, "Transpose")
    if perm(node) != [0, 2, 1, 3]:
        raise Decline(f"unexpected head transpose {perm(node)}")
    return node.inputs[0]


def rope_input(value: ir.Value, head_dim: int) -> tuple[ir.Value, np.ndarray]:
    """The tensor ``value`` is the rotary embedding of, and the inverse frequencies used (a partial rotary embedding,
    ``Concat(rope(x[..., :d]), x[..., d:])``, rotates the first ``d = 2 * inv_freq.size`` dims)."""
    node = producer(value, "Add", "Concat")
    outer = None
    if node.op_type == "Concat":
        outer = producer(node.inputs[1], "Split")
        if node.inputs[1] is not outer.outputs[1] or len(node.inputs) != 2:
            raise Decline("partial rotary embedding not recognised")
        node = producer(node.inputs[0], "Add")
    by_table = {}  # the Mul by the cos table holds the input; the other multiplies rotate_half(x) by the sin table
    for mul in (producer(v, "Mul") for v in node.inputs):
        for pos, operand in enumerate(mul.inputs):
            kind = _trig(operand)
            if kind:
                by_table[kind] = (mul, mul.inputs[1 - pos])
    if set(by_table) != {"Cos", "Sin"}:
        raise Decline("rotary embedding not recognised (no cos/sin tables)")
    x = by_table["Cos"][1]
    inv_freq = _inv_freq(by_table["Cos"][0])
    half = producer(by_table["Sin"][1], "Concat")
    neg, x1 = half.inputs
    split = producer(x1, "Split")
    if producer(neg, "Neg").inputs[0] is not split.outputs[1] or split.inputs[0] is not x:
        raise Decline("rotary embedding not recognised (rotate-half)")
    if outer is not None:
        if x is not outer.outputs[0]:
            raise Decline("partial rotary embedding not recognised")
        x = outer.inputs[0]
        if inv_freq.size % 8:  # what ORT's kernel accepts
            raise Decline(f"ORT's GroupQueryAttention rotates a multiple of 16 dims, the model rotates {2 * inv_freq.size}")
    elif 2 * inv_freq.size != head_dim:
        raise Decline(f"rotary tables of {2 * inv_freq.size} dims for heads of {head_dim}")
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
            emb = producer(node.inputs[0], "Concat")
            freqs = producer(emb.inputs[0], "Mul")
            for v in freqs.inputs:
                array = const(v)
                if array is not None:
                    return array.reshape(-1).astype(np.float64)
    raise Decline("rotary inverse frequencies are not a constant")


def sliding_window(bias: ir.Value) -> int:
    """The sliding window of an attention-mask bias (0 = global), read from its ``k > q - window`` comparison."""
    seen, stack = set(), [bias]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Greater":
            sub = producer(node.inputs[1], "Sub")
            return int(scalar(sub.inputs[1]))
        stack.extend(v for v in node.inputs if v is not None)
    return 0


def slice_head(graph: ir.Graph) -> bool:
    """Compute the head on the last position only: the input of the head's linear is sliced to ``[B, 1, H]``."""
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    if logits is None or logits.producer() is None:
        return False
    node = logits.producer()
    while node.op_type in ("Mul", "Div", "Tanh", "Cast", "Add") and node.domain in ("", "ai.onnx"):
        dynamic = [v for v in node.inputs if v is not None and const(v) is None]
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
