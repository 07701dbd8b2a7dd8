"""quantize-activations: int8 or fp8 QDQ on the inputs (and weights) of Conv, MatMul and Gemm.

Rewrites each target's activation input x into ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)`` with one
per-tensor scale from calibration, and (``weights = true``, W8A8) its constant weight into
``DequantizeLinear(int8 W, per-output-channel scale)`` with symmetric scales absmax / 127. With ``outputs = true``
the target's output (or that of the Relu/Clip that alone reads it) gets a Q/DQ pair too and a Conv/Gemm bias
becomes int32 with scale x_scale · w_scale: the
DQ → op → Q shape ONNX Runtime fuses into int8 kernels (QLinearConv, QLinearMatMul). A tensor read by several
targets gets one Q/DQ pair. The result is standard ONNX (opset >= 13).

Ops reading a graph input (also behind Pad/Reshape/Transpose and the like) stay float unless ``graph_inputs =
true``: the input is the caller's data, rounding it adds noise no later layer removes, and with a float input the
op cannot run an int8 kernel, so int8 weights would save bytes only. On EfficientNet-Lite0 the 8-bit image alone
costs more top-1 agreement than every other activation together.

Observers (range per activation tensor, from the calibration statistics): ``minmax``; ``percentile`` (the
``percentile``-th / (100 - percentile)-th percentiles of the signed values); ``mse`` (the shrink of the min/max
range that minimises the squared round-trip error over a sample of the values). ``uint8`` activations are
asymmetric with a zero point, ``int8`` symmetric. ``fp8-e4m3`` / ``fp8-e5m2`` activations are symmetric with
scale max|range| / the format's largest finite value (448 / 57344) and round to nearest even (ml_dtypes; ONNX
QuantizeLinear with saturation); their weights take the same fp8 format per output channel, biases stay float
(there is no fp8 kernel to fuse them into: ONNX Runtime dequantizes and computes in fp32), and the model's opset
is raised to 21 if lower (fp8 Q/DQ needs 19). Guarantees: an error bound, the one of the chosen grid; the
report measures it. Needs calibration. Leaves alone: targets whose activation is a constant or already comes from
DequantizeLinear (idempotent), weights that are not constant initializers, excluded nodes. Scales and biases take
the float type of the tensor they belong to, so a float16 graph stays float16.

``bias_correction`` (on by default) removes the mean output shift that weight rounding causes, ΔW·E[x] with E[x]
the per-input-channel calibration mean, from the Conv/Gemm bias (added if absent; a Gemm's C moves by alpha / beta
times the shift, any transA/transB); MatMul has no bias to absorb it.

With ``weights = false`` a Conv/Gemm keeps its float weight between Q/DQ pairs; ONNX Runtime's default session
would quantize that weight itself (its ``WeightBiasQuantization`` rewrite), which ``bitfold.compile`` disables.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bitfold.ops.functions import upgrade_opset
from bitfold.passes.initializers import add_initializer, drop_if_unused
from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.structure import reads_graph_input
from bitfold.passes.transforms.weights import float_dtype, fresh_name

_WEIGHT_AXIS = {"Conv": 0, "MatMul": 1}
ActivationDtype = Literal["uint8", "int8", "fp8-e4m3", "fp8-e5m2"]
_FP8 = {"fp8-e4m3": ml_dtypes.float8_e4m3fn, "fp8-e5m2": ml_dtypes.float8_e5m2}


@dataclasses.dataclass(frozen=True)
class QuantizeActivationsConfig:
    observer: Literal["minmax", "percentile", "mse"] = dataclasses.field(default="minmax", metadata={"doc": "minmax | percentile | mse"})
    percentile: float = dataclasses.field(default=99.99, metadata={"doc": "percentile observer: tail kept, in percent"})
    activation_dtype: ActivationDtype = dataclasses.field(default="uint8", metadata={"doc": "uint8 (asymmetric) | int8 (symmetric) | fp8-e4m3 | fp8-e5m2"})
    weights: bool = dataclasses.field(default=True, metadata={"doc": "also quantize weights per output channel, int8 (fp8 with fp8 activations)"})
    op_types: tuple[str, ...] = dataclasses.field(default=("Conv", "MatMul", "Gemm"), metadata={"doc": "ops whose inputs are quantized"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on node name or torch module scope"})
    bias_correction: bool = dataclasses.field(default=True, metadata={"doc": "subtract the weight error's mean output shift from the bias"})
    outputs: bool = dataclasses.field(default=True, metadata={"doc": "also Q/DQ outputs and int32 biases, so ORT fuses int8 kernels"})
    graph_inputs: bool = dataclasses.field(default=False, metadata={"doc": "also quantize ops that read a graph input (and their input)"})

    def __post_init__(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        unknown = set(self.op_types) - {"Conv", "MatMul", "Gemm"}
        if unknown:
            raise ValueError(f"op_types may contain Conv, MatMul and Gemm, not {sorted(unknown)[0]}")


@register
class QuantizeActivations(BitfoldPass):
    """int8 or fp8 QDQ on Conv/MatMul/Gemm activations (calibrated) and, for W8A8, their weights."""

    name = "quantize-activations"
    family = "quant"
    Config = QuantizeActivationsConfig
    needs_calibration = True

    def rewrite(self, model: ir.Model) -> int:
        targets = self.collect(model)
        if not targets:
            return 0
        low = any(float_dtype(node.inputs[0]) != np.float32 for node in targets)  # float16 scales need opset 19
        if (self.fp8 or low) and model.opset_imports.get("", 1) < 19:
            upgrade_opset(model, 21)
            targets = self.collect(model)  # the upgrade drops unused nodes, targets among them
            if not targets:
                return 1  # the opset changed
        names = [node.inputs[0].name for node in targets]
        if self.config.outputs:
            names += [_output(node).name for node in targets if not _output(node).is_graph_output()]
        names = list(dict.fromkeys(names))
        axes = {node.inputs[0].name: _channel_axis(node) for node in targets if _channel_axis(node) != -1}
        stats = self.calibration.collect(model, names, channel_axis=axes)
        graph = model.graph
        self._weights: dict[tuple[ir.Value, int], ir.Value] = {}  # (weight, channel axis) → its DequantizeLinear output
        quantized: dict[str, tuple[ir.Value, float]] = {}  # tensor name → (DQ output, scale)
        original: dict[str, str] = {}  # DQ output name → the tensor it stands for
        for node in targets:
            x = node.inputs[0]
            if x.name not in quantized:
                quantized[x.name] = self._qdq(graph, x, *self.observe(stats[x.name]), node)
            dq, x_scale = quantized[x.name]
            node.replace_input_with(0, dq)
            x_name = original.get(x.name, x.name)
            mean = stats[x_name].mean if axes.get(x_name, -1) == _channel_axis(node) else None  # per input channel
            w_scale = self._quantize_weight(graph, node, mean) if self.config.weights else None
            if self.config.outputs and w_scale is not None and not self.fp8:
                self._quantize_bias(graph, node, x_scale * w_scale)
            y = _output(node)
            if self.config.outputs and not y.is_graph_output():
                quantized[y.name] = self._qdq(graph, y, *self.observe(stats[y.name]), y.producer(), after=True)
                dq_name = quantized[y.name][0].name  # readers of y now read its DQ
                quantized[dq_name], original[dq_name] = quantized[y.name], y.name
        return len(targets)

    def collect(self, model: ir.Model) -> list[ir.Node]:
        found = []
        for node in model.graph:
            if node.op_type not in self.config.op_types or node.domain:
                continue
            x = node.inputs[0]
            if x.const_value is not None or (x.producer() is not None and x.producer().op_type == "DequantizeLinear"):
                continue
            if not self.config.graph_inputs and reads_graph_input(x):
                continue
            scope = (node.name or "", node.metadata_props.get("namespace", ""))
            if any(fnmatch.fnmatchcase(s, p) for p in self.config.exclude for s in scope):
                continue
            found.append(node)
        return found

    def observe(self, stats) -> tuple[float, float]:
        """(lo, hi) range of one activation tensor, by the configured observer."""
        if self.config.observer == "minmax":
            return stats.min, stats.max
        sample = stats.reservoir
        if self.config.observer == "percentile":
            p = self.config.percentile
            return float(np.percentile(sample, 100.0 - p)), float(np.percentile(sample, p))
        best, best_err = (stats.min, stats.max), np.inf
        for ratio in np.linspace(1.0, 0.3, 36):
            lo, hi = stats.min * ratio, stats.max * ratio
            err = float(np.sum((self.round_trip(sample, lo, hi) - sample) ** 2))
            if err < best_err:
                best, best_err = (lo, hi), err
        return best

    @property
    def fp8(self) -> bool:
        return self.config.activation_dtype in _FP8

    def _params(self, lo: float, hi: float) -> tuple[float, int, int, int]:
        """(scale, zero point, qmin, qmax) of the activation grid for the range [lo, hi]."""
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if self.fp8:
            top = float(ml_dtypes.finfo(_FP8[self.config.activation_dtype]).max)
            return max(-lo, hi) / top or 1.0, 0, -top, top
        if self.config.activation_dtype == "int8":
            scale = max(-lo, hi) / 127.0 or 1.0
            return scale, 0, -128, 127
        scale = (hi - lo) / 255.0 or 1.0
        return scale, int(np.clip(round(-lo / scale), 0, 255)), 0, 255

    def round_trip(self, x: np.ndarray, lo: float, hi: float) -> np.ndarray:
        """What Q → DQ computes on x with the grid of [lo, hi] (QuantizeLinear saturates fp8 to ±max)."""
        scale, zero, qmin, qmax = self._params(lo, hi)
        if self.fp8:
            fp8 = _FP8[self.config.activation_dtype]
            return np.clip(x / np.float32(scale), qmin, qmax).astype(np.float32).astype(fp8).astype(np.float32) * np.float32(scale)
        return (np.clip(np.round(x / scale) + zero, qmin, qmax) - zero) * scale

    def _qdq(self, graph: ir.Graph, x: ir.Value, lo: float, hi: float, anchor: ir.Node, after: bool = False):
        """Insert x → QuantizeLinear → DequantizeLinear next to ``anchor``; returns (DQ output, scale).

        Before ``anchor``, only ``anchor`` is rewired by the caller; after it (an output), every reader of x is.
        """
        scale, zero, _, _ = self._params(lo, hi)
        dtype = _FP8.get(self.config.activation_dtype, np.uint8 if self.config.activation_dtype == "uint8" else np.int8)
        s = add_initializer(graph, f"{x.name}_scale", np.array(scale, float_dtype(x)))  # DQ's output takes its type
        z = add_initializer(graph, f"{x.name}_zero_point", np.array(zero, dtype))
        readers = list(x.uses())
        q = ir.node("QuantizeLinear", [x, s, z], name=fresh_name(graph, f"{x.name}_quantize", node=True))
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=fresh_name(graph, f"{x.name}_dequantize", node=True))
        q.outputs[0].name = fresh_name(graph, f"{x.name}_q")
        dq.outputs[0].name = fresh_name(graph, f"{x.name}_dq")
        for node in (q, dq):
            self.stamp(node, [anchor])
        if after:
            graph.insert_after(anchor, [q, dq])
            for user, index in readers:
                user.replace_input_with(index, dq.outputs[0])
        else:
            graph.insert_before(anchor, [q, dq])
        return dq.outputs[0], np.float32(s.const_value.numpy())

    def _quantize_weight(self, graph: ir.Graph, node: ir.Node, input_mean: np.ndarray | None) -> np.ndarray | None:
        """Per-output-channel int8 (or fp8) weight behind a DequantizeLinear; returns the scales (None if left alone).
        ``input_mean`` (per input channel; None when unknown) feeds bias correction."""
        w_value = node.inputs[1]
        if w_value is None or not w_value.is_initializer() or w_value.const_value is None:
            return None
        w = w_value.const_value.numpy().astype(np.float32)
        axis = _WEIGHT_AXIS.get(node.op_type, 0 if node.attributes.get_int("transB", 0) else 1)
        if w.ndim < 2:
            return None
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        fp8 = _FP8.get(self.config.activation_dtype)
        top = 127.0 if fp8 is None else float(ml_dtypes.finfo(fp8).max)
        scale = np.abs(w).max(axis=reduce) / top
        scale = np.where(scale > 0, scale, 1.0).astype(float_dtype(w_value)).astype(np.float32)  # as stored
        shape = [1] * w.ndim
        shape[axis] = -1
        if fp8 is None:
            codes = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
        else:
            codes = np.clip(w / scale.reshape(shape), -top, top).astype(fp8)
        if self.config.bias_correction and input_mean is not None:
            self._correct_bias(graph, node, codes.astype(np.float32) * scale.reshape(shape) - w, input_mean)
        shared = self._weights.get((w_value, axis))  # a weight read by several nodes is quantized once
        if shared is None:
            q = add_initializer(graph, f"{w_value.name}_{'int8' if fp8 is None else 'fp8'}", codes)
            s = add_initializer(graph, f"{w_value.name}_scale", scale.astype(float_dtype(w_value)))
            name = fresh_name(graph, f"{node.name or w_value.name}_weight_dequantize", node=True)
            dq = ir.node("DequantizeLinear", [q, s], attributes={"axis": axis}, name=name)
            dq.outputs[0].name = fresh_name(graph, f"{w_value.name}_dq")
            self.stamp(dq, [node])
            graph.insert_before(node, dq)
            shared = self._weights[(w_value, axis)] = dq.outputs[0]
        node.replace_input_with(1, shared)
        drop_if_unused(graph, w_value)
        return scale

    def _quantize_bias(self, graph: ir.Graph, node: ir.Node, scale: np.ndarray) -> None:
        """Conv/Gemm bias as int32 with scale x_scale · w_scale, the form ORT's int8 kernels take."""
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if node.op_type == "MatMul" or bias is None or not bias.is_initializer() or bias.const_value is None:
            return
        b = bias.const_value.numpy().astype(np.float64)
        if b.ndim != 1 or b.size != scale.size or (node.op_type == "Gemm" and node.attributes.get_float("beta", 1.0) != 1.0):
            return
        scale = scale.astype(float_dtype(bias))
        codes = np.clip(np.round(b / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        q = add_initializer(graph, f"{bias.name}_int32", codes)
        s = add_initializer(graph, f"{bias.name}_scale", scale)
        dq = ir.node("DequantizeLinear", [q, s], attributes={"axis": 0}, name=fresh_name(graph, f"{node.name or bias.name}_bias_dequantize", node=True))
        dq.outputs[0].name = fresh_name(graph, f"{bias.name}_dq")
        self.stamp(dq, [node])
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        drop_if_unused(graph, bias)

    def _correct_bias(self, graph: ir.Graph, node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> None:
        """Bias correction: quantizing W shifts the output mean by ΔW·E[x]; remove that shift from the bias.

        Gemm computes alpha · A'·B' + beta · C, so its shift is alpha · ΔW·E[x] and C moves by that over beta; a
        Gemm with beta = 0 ignores C, so C becomes the correction alone and beta 1.
        """
        if node.op_type == "MatMul":
            return
        shift = _mean_shift(node, delta.astype(np.float64), mean.astype(np.float64))
        if shift is None:
            return
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if node.op_type == "Gemm":
            shift = shift * node.attributes.get_float("alpha", 1.0)
            beta = node.attributes.get_float("beta", 1.0)
            if beta == 0.0:
                node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
                if bias is not None:
                    old, bias = bias, None
                    node.replace_input_with(2, None)
                    drop_if_unused(graph, old)
            else:
                shift = shift / beta
        if bias is None:
            node.resize_inputs(3)
            node.replace_input_with(2, add_initializer(graph, f"{node.name}_bias", (-shift).astype(float_dtype(node.inputs[1]))))
            return
        if not bias.is_initializer() or bias.const_value is None or bias.const_value.size != shift.size:
            return
        corrected = (bias.const_value.numpy().reshape(-1) - shift).reshape(bias.const_value.shape).astype(float_dtype(bias))
        node.replace_input_with(2, add_initializer(graph, f"{bias.name}_corrected", corrected))
        drop_if_unused(graph, bias)



def _channel_axis(node: ir.Node) -> int:
    """The axis of a target's activation that holds its input channels: 1 for Conv (NCHW), 0 for a Gemm with
    transA (A is K × M), the last one otherwise."""
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return 0
    return -1


def _mean_shift(node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """E[Δy] per output channel for weight error Δ and per-input-channel input mean (spatially uniform) of the
    product alone (Gemm's alpha not applied); None when the mean does not have one entry per input channel."""
    if node.op_type == "Conv":
        group = node.attributes.get_int("group", 1)
        per_tap = delta.reshape(delta.shape[0], delta.shape[1], -1).sum(axis=2)  # (O, I/g)
        out, in_g = per_tap.shape
        if mean.size != group * in_g:
            return None
        return np.einsum("goi,gi->go", per_tap.reshape(group, out // group, in_g), mean.reshape(group, in_g)).reshape(out)
    if node.attributes.get_int("transB", 0):
        return delta @ mean if mean.size == delta.shape[1] else None
    return mean @ delta if mean.size == delta.shape[0] else None


def _output(node: ir.Node) -> ir.Value:
    """The tensor to quantize after ``node``: its output, or the output of a Relu/Clip that is its only reader.

    Quantizing before a clipping activation would spend the 8-bit range on values the activation discards
    (a ReLU6 input spans tens, its output 0–6); ONNX Runtime folds the activation into the quantized op.
    """
    y = node.outputs[0]
    users = [user for user, _ in y.uses()]
    if len(users) == 1 and users[0].op_type in ("Relu", "Clip") and not users[0].domain and not y.is_graph_output():
        return users[0].outputs[0]
    return y
