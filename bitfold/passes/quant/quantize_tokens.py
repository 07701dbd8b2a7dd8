"""quantize-tokens: dynamic per-token activation quantization (simulated) on MatMul inputs.

Each targeted MatMul's activation x ([..., K]) is replaced, at run time, by (one scale per token: per row of the
last axis)

    symmetric     s = clip_ratio · max_k |x_k| / qmax,  x ← clip(round(x / s), -qmax - 1, qmax) · s,  qmax = 2^(bits-1) - 1
    asymmetric    s = clip_ratio · (max_k x_k - min_k x_k) / (2^bits - 1),  z = round(-clip_ratio · min_k x_k / s),
                  x ← (clip(round(x / s) + z, 0, 2^bits - 1) - z) · s

the per-token A4/A8 scheme of QuaRot and SmoothQuant-O1-style evaluations (asymmetric: all 2^bits levels span the
token's own range, which helps tokens whose values lean to one side). With ``search_clip = true`` each quantized
input gets its own clip ratio, the grid value in [0.5, 1] whose fake-quantized calibration rows (a uniform sample)
give its MatMuls the least summed squared output error ``Σ_j ‖(Q(X) - X) W_j‖²``; the chosen ratio is recorded as
node metadata ``bitfold.token_clip``. The graph computes it with standard
ONNX ops (ReduceMax/ReduceMin, Div, Round, Clip, Mul...): an accuracy simulation that any runtime executes, not an
integer kernel. A tensor read by several MatMuls is quantized once. Leaves alone:
MatMuls whose weight is not a constant (attention's QKᵀ and PV), nodes marked ``bitfold.precision = float32``
(a low-rank branch), excluded ones (globs on node name or torch module scope), inputs already quantized by this
pass (a rerun is a no-op). Needs calibration only with ``search_clip``. The constants take x's float type, so a
float16 graph stays float16 (the floor on s is then float16's smallest subnormal instead of 1e-12).
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bitfold.passes.initializers import add_initializer, copy_type
from bitfold.passes.registry import ISLAND_KEY, BitfoldPass, register
from bitfold.passes.transforms.structure import matches
from bitfold.passes.transforms.weights import float_dtype

TOKEN_QUANT_KEY = "bitfold.token_quant"
TOKEN_CLIP_KEY = "bitfold.token_clip"
CLIP_GRID = np.linspace(1.0, 0.5, 11)


@dataclasses.dataclass(frozen=True)
class QuantizeTokensConfig:
    bits: int = dataclasses.field(default=8, metadata={"doc": "activation bits: 4 or 8"})
    clip_ratio: float = dataclasses.field(default=1.0, metadata={"doc": "fraction of each token's max |x| (or range) kept"})
    symmetric: bool = dataclasses.field(default=True, metadata={"doc": "false: a zero point per token, 2^bits levels over [min, max]"})
    search_clip: bool = dataclasses.field(default=False, metadata={"doc": "choose each input's clip ratio on calibration data"})
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

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.search_clip

    def rewrite(self, model: ir.Model) -> int:
        groups: dict[ir.Value, list[ir.Node]] = {}
        for node in self.collect(model.graph):
            groups.setdefault(node.inputs[0], []).append(node)
        clips = self.solve(model, groups) if self.config.search_clip else dict.fromkeys(groups, self.config.clip_ratio)
        for x, nodes in groups.items():
            quantized = self._fake_quant(model.graph, x, nodes[0], clips[x])
            for node in nodes:
                node.replace_input_with(0, quantized)
        return sum(len(nodes) for nodes in groups.values())

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

    def solve(self, model: ir.Model, groups: dict[ir.Value, list[ir.Node]]) -> dict[ir.Value, float]:
        """Each input's clip ratio from ``CLIP_GRID``: the least output error of its MatMuls on sampled rows."""
        names = [x.name for x in groups]
        stats = self.calibration.collect(model, names, rows=names)
        clips = {}
        for x, nodes in groups.items():
            rows = stats[x.name].sample.astype(np.float64)
            weight = np.concatenate([node.inputs[1].const_value.numpy().reshape(rows.shape[1], -1) for node in nodes], axis=1)
            errors = [np.sum(((token_quant(rows, self.config.bits, c, self.config.symmetric) - rows) @ weight) ** 2) for c in CLIP_GRID]
            clips[x] = float(CLIP_GRID[int(np.argmin(errors))])
        return clips

    def _fake_quant(self, graph: ir.Graph, x: ir.Value, anchor: ir.Node, clip: float) -> ir.Value:
        base, dtype = x.name, float_dtype(x)
        const = lambda name, v: add_initializer(graph, f"{base}_{name}", np.array(v, dtype))  # noqa: E731
        axes_attribute = graph.opset_imports.get("", 1) < 18  # ReduceMax/ReduceMin take axes as an input from 18
        axes = None if axes_attribute else add_initializer(graph, f"{base}_token_axis", np.array([-1], np.int64))
        nodes: list[ir.Node] = []

        def op(op_type: str, *inputs: ir.Value, **attributes: int | list[int]) -> ir.Value:
            nodes.append(ir.node(op_type, list(inputs), attributes=attributes))
            return nodes[-1].outputs[0]

        def reduce(op_type: str, v: ir.Value) -> ir.Value:
            """``op_type`` over the last axis, keeping it."""
            return op(op_type, v, axes=[-1], keepdims=1) if axes_attribute else op(op_type, v, axes, keepdims=1)

        eps = const("token_eps", max(1e-12, float(ml_dtypes.finfo(dtype).smallest_subnormal)))  # nonzero in x's type
        if self.config.symmetric:
            qmax = float(2 ** (self.config.bits - 1) - 1)
            scale = op("Max", op("Mul", reduce("ReduceMax", op("Abs", x)), const("token_step", clip / qmax)), eps)
            codes = op("Clip", op("Round", op("Div", x, scale)), const("token_qmin", -qmax - 1), const("token_qmax", qmax))
        else:
            levels = float(2**self.config.bits - 1)
            kept = const("token_clip", clip)
            low, high = (op("Mul", reduce(kind, x), kept) for kind in ("ReduceMin", "ReduceMax"))
            scale = op("Max", op("Div", op("Sub", high, low), const("token_levels", levels)), eps)
            zero = op("Round", op("Div", op("Neg", low), scale))
            shifted = op("Clip", op("Add", op("Round", op("Div", x, scale)), zero), const("token_qmin", 0.0), const("token_qmax", levels))
            codes = op("Sub", shifted, zero)
        out = ir.node("Mul", [codes, scale], name=f"{base}_token_quant")
        nodes.append(out)
        for i, node in enumerate(nodes):
            node.name = node.name or f"{base}_token_quant_{i}"
            self.stamp(node, [anchor])
        out.metadata_props[TOKEN_QUANT_KEY] = f"int{self.config.bits}"
        out.metadata_props[TOKEN_CLIP_KEY] = f"{clip:.2f}"
        y = out.outputs[0]
        y.name = f"{base}_tq"
        copy_type(y, x)
        graph.insert_before(anchor, nodes)
        return y


def token_quant(x: np.ndarray, bits: int, clip_ratio: float, symmetric: bool) -> np.ndarray:
    """What the emitted graph computes for rows ``x`` (..., K): per-row fake quantization (see the module doc)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = np.maximum(np.abs(x).max(axis=-1, keepdims=True) * clip_ratio / qmax, 1e-12)
        return np.clip(np.round(x / s), -qmax - 1, qmax) * s
    levels = 2**bits - 1
    low, high = x.min(axis=-1, keepdims=True) * clip_ratio, x.max(axis=-1, keepdims=True) * clip_ratio
    s = np.maximum((high - low) / levels, 1e-12)
    z = np.round(-low / s)
    return (np.clip(np.round(x / s) + z, 0, levels) - z) * s
