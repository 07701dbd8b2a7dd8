"""quantize-tokens: dynamic per-token symmetric activation quantization (simulated) on MatMul inputs.

Each targeted MatMul's activation x ([..., K]) is replaced, at run time, by

    s = clip_ratio · max_k |x[..., k]| / qmax        (one scale per token: per row of the last axis)
    x ← clip(round(x / s), -qmax - 1, qmax) · s       qmax = 2^(bits-1) - 1

the per-token A4/A8 scheme of QuaRot and SmoothQuant-O1-style evaluations. The graph computes it with standard
ONNX ops (Abs, ReduceMax, Div, Round, Clip, Mul): an accuracy simulation that any runtime executes, not an integer
kernel. A tensor read by several MatMuls is quantized once. Needs: nothing (the scales are dynamic). Leaves alone:
MatMuls whose weight is not a constant (attention's QKᵀ and PV), nodes marked ``bitfold.precision = float32``
(a low-rank branch), excluded ones (globs on node name or torch
module scope), inputs already quantized by this pass (a rerun is a no-op).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bitfold.passes.initializers import add_initializer, copy_type
from bitfold.passes.quant.cast_precision import ISLAND_KEY
from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.structure import matches

TOKEN_QUANT_KEY = "bitfold.token_quant"


@dataclasses.dataclass(frozen=True)
class QuantizeTokensConfig:
    bits: int = dataclasses.field(default=8, metadata={"doc": "activation bits: 4 or 8"})
    clip_ratio: float = dataclasses.field(default=1.0, metadata={"doc": "fraction of each token's max |x| kept"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on node name or torch module scope"})

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError("clip_ratio must be in (0, 1]")


@register
class QuantizeTokens(BitfoldPass):
    """Per-token dynamic activation fake-quantization before MatMuls with constant weights."""

    name = "quantize-tokens"
    family = "quant"
    Config = QuantizeTokensConfig

    def rewrite(self, model: ir.Model) -> int:
        graph = model.graph
        done: dict[int, ir.Value] = {}
        count = 0
        for node in self.collect(graph):
            x = node.inputs[0]
            if id(x) not in done:
                done[id(x)] = self._fake_quant(graph, x, node)
            node.replace_input_with(0, done[id(x)])
            count += 1
        return count

    def collect(self, graph: ir.Graph) -> list[ir.Node]:
        found = []
        for node in graph:
            if node.op_type != "MatMul" or node.domain or node.inputs[1].const_value is None:
                continue
            if node.metadata_props.get(ISLAND_KEY) == "float32":  # kept float on purpose (a low-rank branch)
                continue
            x = node.inputs[0]
            if x.producer() is not None and TOKEN_QUANT_KEY in x.producer().metadata_props:
                continue
            if matches(node, self.config.exclude):
                continue
            found.append(node)
        return found

    def _fake_quant(self, graph: ir.Graph, x: ir.Value, anchor: ir.Node) -> ir.Value:
        qmax = float(2 ** (self.config.bits - 1) - 1)
        base = x.name
        const = lambda name, v: add_initializer(graph, f"{base}_{name}", np.array(v, np.float32))  # noqa: E731
        axes = add_initializer(graph, f"{base}_token_axis", np.array([-1], np.int64))
        amax = ir.node("ReduceMax", [ir.node("Abs", [x]).outputs[0], axes], attributes={"keepdims": 1})
        nodes = [amax.inputs[0].producer(), amax]
        scale = ir.node("Max", [ir.node("Mul", [amax.outputs[0], const("token_step", self.config.clip_ratio / qmax)]).outputs[0],
                                const("token_eps", 1e-12)])  # fmt: skip
        nodes += [scale.inputs[0].producer(), scale]
        codes = ir.node("Clip", [ir.node("Round", [ir.node("Div", [x, scale.outputs[0]]).outputs[0]]).outputs[0],
                                 const("token_qmin", -qmax - 1), const("token_qmax", qmax)])  # fmt: skip
        nodes += [codes.inputs[0].producer().inputs[0].producer(), codes.inputs[0].producer(), codes]
        out = ir.node("Mul", [codes.outputs[0], scale.outputs[0]], name=f"{base}_token_quant")
        nodes.append(out)
        for i, node in enumerate(nodes):
            node.name = node.name or f"{base}_token_quant_{i}"
            self.stamp(node, [anchor])
        out.metadata_props[TOKEN_QUANT_KEY] = f"int{self.config.bits}"
        y = out.outputs[0]
        y.name = f"{base}_tq"
        copy_type(y, x)
        graph.insert_before(anchor, nodes)
        return y
