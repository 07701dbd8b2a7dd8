"""Build a decoder LM's ONNX graph with a KV cache directly from its config and weight files.

The graph interface is the one optimum and onnxruntime-genai use, so one graph serves prefill (P = 0) and decode:

    inputs   input_ids [B, S] int64, attention_mask [B, P+S] int64, position_ids [B, S] int64,
             past_key_values.{i}.key / .value [B, kv_heads, P, head_dim]
    outputs  logits [B, S, vocab], present.{i}.key / .value [B, kv_heads, P+S, head_dim]

Only standard ONNX ops (opset 18) are emitted, in the shapes bitfold's structure discovery reads: every linear is a
``MatMul`` by a constant ``[in, out]`` weight (plus an ``Add`` of its bias), RMSNorm is decomposed
(``Pow → ReduceMean → Add ε → Sqrt → Div → Mul γ``, which ONNX Runtime fuses into one
normalization kernel), the residual stream runs from the embedding
``Gather`` through ``Add`` nodes, and a tied head reads ``Transpose(embedding)``. So every LLM pass sees the cached
graph as it sees a traced one. Grouped-query attention broadcasts the shared keys and values over a head-group axis
instead of copying them. Node names follow the Hugging Face module paths (``/model/layers.3/self_attn/q_proj/MatMul``),
so recipe ``exclude`` globs such as ``*lm_head*`` work unchanged.

Weights are lazy tensors read from the weight files when the model is written or a pass reads them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bitfold.llm.config import LLMConfig, Rope

OPSET = 18


class _Builder:
    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.graph = ir.Graph([], [], nodes=[], opset_imports={"": OPSET}, name="decoder")
        self.scope = ""
        self._count: dict[str, int] = {}
        self._consts: dict[tuple, ir.Value] = {}

    def op(self, op_type: str, *inputs: ir.Value | None, outputs: int = 1, **attrs) -> ir.Value | list[ir.Value]:
        base = f"{self.scope}/{op_type}"
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        name = base if n == 0 else f"{base}_{n}"
        outs = [ir.Value(name=f"{name}_output_{k}") for k in range(outputs)]
        attributes = {k: v for k, v in attrs.items() if v is not None}
        node = ir.Node("", op_type, list(inputs), ir.convenience.convert_attributes(attributes), outputs=outs, name=name)
        if self.scope:
            node.metadata_props["namespace"] = self.scope
        self.graph.append(node)
        return outs if outputs > 1 else outs[0]

    def const(self, array, dtype=None) -> ir.Value:
        array = np.asarray(array, dtype=dtype if dtype is not None else None)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            value = ir.Value(name=f"const_{len(self._consts)}", const_value=ir.tensor(array))
            value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
            self.graph.register_initializer(value)
            self._consts[key] = value
        return self._consts[key]

    def f(self, x: float) -> ir.Value:
        """A scalar in the activation dtype."""
        return self.const(np.array(x, dtype=self.dtype))

    def i64(self, values) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64))

    def weight(self, name: str, shape: tuple[int, ...], load: Callable[[], np.ndarray]) -> ir.Value:
        dtype = self.dtype

        def read() -> ir.TensorProtocol:
            array = np.ascontiguousarray(load(), dtype=dtype)
            if array.shape != shape:
                raise ValueError(f"weight '{name}' has shape {array.shape}, expected {shape}")
            return ir.tensor(array, name=name)

        tensor = ir.LazyTensor(read, ir.DataType.from_numpy(dtype), ir.Shape(shape), name=name)
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def input(self, name: str, dtype: ir.DataType, shape: list) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
        self.graph.inputs.append(value)
        return value

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: list) -> None:
        value.name, value.shape, value.type = name, ir.Shape(shape), ir.TensorType(dtype)
        self.graph.outputs.append(value)


class Weights:
    """Hugging Face tensor names → arrays, reshaped for the graph (linears as ``[in, out]``, norms with γ offset)."""

    def __init__(self, source, cfg: LLMConfig) -> None:
        self.source, self.cfg = source, cfg

    def name(self, hf: str) -> str:
        if hf in self.source:
            return hf
        for alt in (hf.removeprefix("model."), "model.language_model." + hf.removeprefix("model."), "language_model." + hf):
            if alt in self.source:
                return alt
        if self.cfg.tie_word_embeddings and hf == "model.embed_tokens.weight" and "lm_head.weight" in self.source:
            return "lm_head.weight"  # a tied pair saved once under the head's name (safetensors keeps one of shared tensors)
        raise KeyError(hf)

    def has(self, hf: str) -> bool:
        try:
            self.name(hf)
            return True
        except KeyError:
            return False


def build(cfg: LLMConfig, source, dtype=np.float32) -> ir.Model:
    """The KV-cache decoder graph of ``cfg`` with weights from ``source`` (``shape(name)``, ``get(name)``)."""
    b = _Builder(dtype)
    w = Weights(source, cfg)
    dt = ir.DataType.from_numpy(np.dtype(dtype))
    L, kvh, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim

    ids = b.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    mask = b.input("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
    positions = b.input("position_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
    pasts = []
    for i in range(L):
        k = b.input(f"past_key_values.{i}.key", dt, ["batch_size", kvh, "past_sequence_length", hd])
        v = b.input(f"past_key_values.{i}.value", dt, ["batch_size", kvh, "past_sequence_length", hd])
        pasts.append((k, v))

    def linear_weight(hf: str, rows: int, cols: int) -> ir.Value:
        """nn.Linear weight [out, in] stored transposed as [in, out]."""
        name = w.name(hf)
        return b.weight(name, (cols, rows), lambda: source.get(name).T)

    def vector(hf: str, size: int, offset: float = 0.0) -> ir.Value:
        name = w.name(hf)
        return b.weight(name, (size,), lambda: source.get(name).reshape(-1) + np.float32(offset))

    def linear(x: ir.Value, prefix: str, rows: int, cols: int, bias: bool) -> ir.Value:
        scope = b.scope
        b.scope = "/" + prefix.replace(".layers.", "/layers.").replace(".", "/").replace("/layers/", "/layers.")
        y = b.op("MatMul", x, linear_weight(prefix + ".weight", rows, cols))
        if bias:
            y = b.op("Add", y, vector(prefix + ".bias", rows))
        b.scope = scope
        return y

    def rms_norm(x: ir.Value, hf: str, size: int, scope: str) -> ir.Value:
        saved, b.scope = b.scope, scope
        square = b.op("Pow", x, b.f(2.0))
        mean = b.op("ReduceMean", square, b.i64([-1]), keepdims=1)
        std = b.op("Sqrt", b.op("Add", mean, b.f(cfg.rms_norm_eps)))
        y = b.op("Mul", b.op("Div", x, std), vector(hf, size, cfg.family.gamma_offset))  # the form ORT fuses
        b.scope = saved
        return y

    # --- embedding, masks and rotary tables, shared by the layers
    b.scope = "/model/embed_tokens"
    table_name = w.name("model.embed_tokens.weight")
    table = b.weight(table_name, (cfg.vocab_size, cfg.hidden_size), lambda: source.get(table_name))
    h = b.op("Gather", table, ids)
    if cfg.family.embed_scale:
        h = b.op("Mul", h, b.f(np.array(math.sqrt(cfg.hidden_size), dtype=dtype)))

    b.scope = "/model/attention_mask"
    total = b.op("Shape", mask, start=1, end=2)
    seq = b.op("Shape", ids, start=1, end=2)
    past_len = b.op("Sub", total, seq)
    scalar = b.i64([])
    q_pos = b.op("Unsqueeze", b.op("Range", b.op("Reshape", past_len, scalar), b.op("Reshape", total, scalar), b.i64(1)), b.i64([1]))
    k_pos = b.op("Unsqueeze", b.op("Range", b.i64(0), b.op("Reshape", total, scalar), b.i64(1)), b.i64([0]))
    # additive bias, 0 where a key is visible and the dtype's minimum elsewhere (bool tensors are avoided: TVM's
    # llvm codegen rejects vectorized stores of them)
    causal = b.op("Cast", b.op("LessOrEqual", k_pos, q_pos), to=dt)  # [S, T]
    padding = b.op("Unsqueeze", b.op("Cast", mask, to=dt), b.i64([1, 2]))  # [B, 1, 1, T]
    biases: dict[int, ir.Value] = {}
    grouped = cfg.num_heads != kvh
    for window in sorted(set(cfg.windows)):
        allowed = causal
        if window:
            near = b.op("Cast", b.op("Greater", k_pos, b.op("Sub", q_pos, b.i64(window))), to=dt)
            allowed = b.op("Mul", allowed, near)
        visible = b.op("Mul", allowed, padding)  # [B, 1, S, T], 1 = visible
        bias = b.op("Mul", b.op("Sub", b.f(1.0), visible), b.f(float(np.finfo(dtype).min)))
        biases[window] = b.op("Unsqueeze", bias, b.i64([1])) if grouped else bias

    b.scope = "/model/rotary_emb"
    pos_f = b.op("Unsqueeze", b.op("Cast", positions, to=ir.DataType.FLOAT), b.i64([-1]))  # [B, S, 1]
    rotary: dict[Rope, tuple[ir.Value, ir.Value]] = {}
    for rope in dict.fromkeys(cfg.ropes):
        freqs = b.op("Mul", pos_f, b.const(rope.inv_freq()))
        emb = b.op("Concat", freqs, freqs, axis=-1)
        cos, sin = b.op("Cos", emb), b.op("Sin", emb)
        if dt != ir.DataType.FLOAT:
            cos, sin = b.op("Cast", cos, to=dt), b.op("Cast", sin, to=dt)
        rotary[rope] = (b.op("Unsqueeze", cos, b.i64([1])), b.op("Unsqueeze", sin, b.i64([1])))  # [B, 1, S, rot]

    def apply_rope(x: ir.Value, rope: Rope) -> ir.Value:
        cos, sin = rotary[rope]
        rot, rest = x, None
        if rope.dim < hd:
            rot, rest = b.op("Split", x, b.i64([rope.dim, hd - rope.dim]), axis=-1, outputs=2)
        x1, x2 = b.op("Split", rot, axis=-1, num_outputs=2, outputs=2)
        half = b.op("Concat", b.op("Neg", x2), x1, axis=-1)
        y = b.op("Add", b.op("Mul", rot, cos), b.op("Mul", half, sin))
        return y if rest is None else b.op("Concat", y, rest, axis=-1)

    def heads(x: ir.Value, n: int) -> ir.Value:  # [B, S, n*hd] -> [B, S, n, hd]
        return b.op("Reshape", x, b.i64([0, 0, n, hd]))

    q_size, kv_size = cfg.num_heads * hd, kvh * hd
    presents = []
    for i in range(L):
        pre = f"model.layers.{i}"
        scope = f"/model/layers.{i}"
        attn_in = rms_norm(h, f"{pre}.input_layernorm.weight", cfg.hidden_size, f"{scope}/input_layernorm")
        if cfg.family.fused_qkv:
            qkv = linear(attn_in, f"{pre}.self_attn.qkv_proj", q_size + 2 * kv_size, cfg.hidden_size, cfg.attention_bias)
            b.scope = f"{scope}/self_attn"
            q, k, v = b.op("Split", qkv, b.i64([q_size, kv_size, kv_size]), axis=-1, outputs=3)
        else:
            q = linear(attn_in, f"{pre}.self_attn.q_proj", q_size, cfg.hidden_size, cfg.attention_bias)
            k = linear(attn_in, f"{pre}.self_attn.k_proj", kv_size, cfg.hidden_size, cfg.attention_bias)
            v = linear(attn_in, f"{pre}.self_attn.v_proj", kv_size, cfg.hidden_size, cfg.attention_bias)
        b.scope = f"{scope}/self_attn"
        q, k, v = heads(q, cfg.num_heads), heads(k, kvh), heads(v, kvh)
        if cfg.family.qk_norm:
            q = rms_norm(q, f"{pre}.self_attn.q_norm.weight", hd, f"{scope}/self_attn/q_norm")
            k = rms_norm(k, f"{pre}.self_attn.k_norm.weight", hd, f"{scope}/self_attn/k_norm")
        b.scope = f"{scope}/self_attn"
        perm = [0, 2, 1, 3]
        q, k, v = (b.op("Transpose", t, perm=perm) for t in (q, k, v))  # [B, heads, S, hd]
        q, k = apply_rope(q, cfg.ropes[i]), apply_rope(k, cfg.ropes[i])
        key = b.op("Concat", pasts[i][0], k, axis=2)
        value = b.op("Concat", pasts[i][1], v, axis=2)
        presents.append((key, value))
        q = b.op("Mul", q, b.f(cfg.scaling))
        if grouped:  # [B, kvh, group, S, hd] against [B, kvh, 1, T, hd]: shared keys are broadcast, not copied
            q = b.op("Reshape", q, b.i64([0, kvh, cfg.num_heads // kvh, -1, hd]))
            key_t = b.op("Unsqueeze", b.op("Transpose", key, perm=[0, 1, 3, 2]), b.i64([2]))
            value_g = b.op("Unsqueeze", value, b.i64([2]))
        else:
            key_t, value_g = b.op("Transpose", key, perm=[0, 1, 3, 2]), value
        scores = b.op("MatMul", q, key_t)
        if cfg.attn_softcap:
            cap = b.f(cfg.attn_softcap)
            scores = b.op("Mul", b.op("Tanh", b.op("Div", scores, cap)), cap)
        scores = b.op("Add", scores, biases[cfg.windows[i]])
        probs = b.op("Softmax", scores, axis=-1)
        ctx = b.op("MatMul", probs, value_g)
        if grouped:
            ctx = b.op("Reshape", ctx, b.i64([0, cfg.num_heads, -1, hd]))
        ctx = b.op("Reshape", b.op("Transpose", ctx, perm=perm), b.i64([0, 0, q_size]))
        attn = linear(ctx, f"{pre}.self_attn.o_proj", cfg.hidden_size, q_size, False)
        if cfg.family.sandwich_norms:
            attn = rms_norm(attn, f"{pre}.post_attention_layernorm.weight", cfg.hidden_size, f"{scope}/post_attention_layernorm")
            mlp_norm = f"{pre}.pre_feedforward_layernorm.weight"
        else:
            mlp_norm = f"{pre}.post_attention_layernorm.weight"
        b.scope = scope
        h = b.op("Add", h, attn)
        mlp_in = rms_norm(h, mlp_norm, cfg.hidden_size, f"{scope}/{mlp_norm.split('.')[-2]}")
        inter = cfg.intermediate_size
        if cfg.family.fused_gate_up:
            gate_up = linear(mlp_in, f"{pre}.mlp.gate_up_proj", 2 * inter, cfg.hidden_size, cfg.mlp_bias)
            b.scope = f"{scope}/mlp"
            gate, up = b.op("Split", gate_up, b.i64([inter, inter]), axis=-1, outputs=2)
        else:
            gate = linear(mlp_in, f"{pre}.mlp.gate_proj", inter, cfg.hidden_size, cfg.mlp_bias)
            up = linear(mlp_in, f"{pre}.mlp.up_proj", inter, cfg.hidden_size, cfg.mlp_bias)
        b.scope = f"{scope}/mlp/act_fn"
        mlp = linear(b.op("Mul", _activation(b, gate, cfg.activation), up), f"{pre}.mlp.down_proj", cfg.hidden_size, inter, cfg.mlp_bias)
        if cfg.family.sandwich_norms:
            mlp = rms_norm(mlp, f"{pre}.post_feedforward_layernorm.weight", cfg.hidden_size, f"{scope}/post_feedforward_layernorm")
        b.scope = scope
        h = b.op("Add", h, mlp)

    h = rms_norm(h, "model.norm.weight", cfg.hidden_size, "/model/norm")
    b.scope = "/lm_head"
    if cfg.tie_word_embeddings or not w.has("lm_head.weight"):
        logits = b.op("MatMul", h, b.op("Transpose", table, perm=[1, 0]))
    else:
        logits = b.op("MatMul", h, linear_weight("lm_head.weight", cfg.vocab_size, cfg.hidden_size))
    if cfg.final_softcap:
        cap = b.f(cfg.final_softcap)
        logits = b.op("Mul", b.op("Tanh", b.op("Div", logits, cap)), cap)

    b.output(logits, "logits", dt, ["batch_size", "sequence_length", cfg.vocab_size])
    for i, (key, value) in enumerate(presents):
        b.output(key, f"present.{i}.key", dt, ["batch_size", kvh, "total_sequence_length", hd])
        b.output(value, f"present.{i}.value", dt, ["batch_size", kvh, "total_sequence_length", hd])
    model = ir.Model(b.graph, ir_version=10, producer_name="bitfold")
    # Shapes on every value (symbolic where they vary), so passes read widths from the graph. onnx-ir's pass sets
    # large initializers aside during inference: only tensors under 1 KiB-ish (norm γ, constants) are read.
    ir.passes.common.ShapeInferencePass()(model)
    return model


def _activation(b: _Builder, x: ir.Value, kind: str) -> ir.Value:
    if kind == "silu":
        return b.op("Mul", x, b.op("Sigmoid", x))
    if kind == "gelu":  # exact: x/2 (1 + erf(x/sqrt 2))
        return b.op("Mul", b.op("Mul", x, b.f(0.5)), b.op("Add", b.op("Erf", b.op("Mul", x, b.f(1 / math.sqrt(2)))), b.f(1.0)))
    # tanh approximation: x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    cube = b.op("Mul", b.op("Mul", x, x), x)
    inner = b.op("Mul", b.op("Add", x, b.op("Mul", cube, b.f(0.044715))), b.f(math.sqrt(2 / math.pi)))
    return b.op("Mul", b.op("Mul", x, b.f(0.5)), b.op("Add", b.op("Tanh", inner), b.f(1.0)))
