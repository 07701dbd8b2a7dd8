"""quantize-weights: weight-only quantization of MatMul (and Conv) weights by RTN, GPTQ, AWQ or QuantEase.

Rewrites every ``MatMul(A, W)`` whose W is a constant 2-D float initializer (and whose node, weight or torch
module scope matches no ``exclude`` glob). The weight is quantized as the (N, K) matrix Wᵀ with scale groups of
``group_size`` along the reduction axis K (-1: one scale per output channel, 0: per tensor), then emitted as

- ``qdq``: ``MatMul(A, DequantizeLinear(codes, scale[, zero], axis, block_size))``, standard ONNX (opset ≥ 21;
  the model's opset is raised if lower). Codes of 2–4 bits are stored as int4/uint4, fp8 as float8.
- ``matmulnbits``: ORT's ``com.microsoft.MatMulNBits`` (2/4/8 bits; 3-bit codes in 4-bit storage), so ORT's fused
  kernel runs it; needs integer codes and a power-of-two group size >= 16.
- ``fake``: the dequantized weights in float, for accuracy studies.

Methods: ``rtn`` rounds each weight to the nearest grid point; ``gptq`` corrects rounding error with the layer
input's Hessian (needs calibration; H is collected once on the input graph, not layer by layer on the partially
quantized one); ``awq`` rescales input channels by searched activation-aware scales folded into the producer
(RMSNorm/LayerNorm γ, or the MatMul feeding a gating Mul), so the graph is equivalent before rounding, then rounds;
groups whose producer cannot absorb a scale fall back to RTN; ``quantease`` (``bitfold.quant.quantease``; needs
calibration) starts from GPTQ's solution (or RTN's, ``start = "rtn"``) and lowers the same layer objective by
cyclic coordinate descent over the weights on the fixed grid, at most ``sweeps`` sweeps, never ending above GPTQ's.
``clip`` shrinks each scale group's range before
rounding (``bitfold.quant.clip``): ``weight`` to the least weight MSE, ``output`` to the least output error
δᵀ H_gg δ through the group's block of the input Gram matrix (needs calibration; with AWQ, H of the rescaled
input). With GPTQ the clipped ranges are fitted on the weights as the loop reaches each group.
``compensate_rank = r`` (EoRA, ``bitfold.quant.eora``; needs calibration) adds a float rank-r branch
``(A·L1)·L2`` fitted to the quantization error in the input's eigenspace, at the one place that error is known.

With ``"Conv"`` in ``op_types``, 2-D Conv weights W (C_out, C_in/groups, kh, kw) are quantized too, as the
(N, K) = (C_out, C_in/groups · kh · kw) matrix ``W.reshape(C_out, -1)`` with per-channel or per-group scales, and
emitted as ``qdq`` (per channel: ``DequantizeLinear`` on the 4-D weight, axis 0; per group: on the (N, K) matrix,
then ``Reshape``) or ``fake``. GPTQ and output clipping read the Gram matrix of each group's input patches
(``bitfold.quant.im2col``), so a depthwise Conv gets one kh·kw Hessian per channel. AWQ has no producer to fold
a Conv's scales into: Conv weights take its clip and grid without rescaling.

Scales (and float zero points) are stored in the weight's float type, so a float16 graph stays float16.

Guarantees: the emitted weight equals the solver's dequantized weight exactly in every format (tested; in a
float16 graph, to the rounding of the scales to float16). Leaves alone: Gemm weights, Conv weights unless asked for
(and 1-D/3-D Convs), non-constant weights, shared Conv weights and weights read by anything but MatMuls, nodes
pinned to float32 (a low-rank branch), and layers it already quantized (idempotent). MatMuls sharing a weight
whose solved weights agree (RTN) share one emitted weight.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from bitfold import parallel
from bitfold.ops.functions import upgrade_opset
from bitfold.passes.initializers import add_initializer, drop_if_unused
from bitfold.passes.registry import ISLAND_KEY, QUANTIZED_KEY, BitfoldPass, register
from bitfold.passes.scale_fold import scale_fold
from bitfold.passes.transforms.weights import add_lowrank_branch, fresh_name
from bitfold.quant import matmulnbits
from bitfold.quant.awq import awq_scale
from bitfold.quant.calibration import TensorStats
from bitfold.quant.clip import Clip, group_params
from bitfold.quant.eora import eora
from bitfold.quant.formats import Format, PerChannel, PerTensor, format_from, granularity_from, rtn
from bitfold.quant.gptq import gptq
from bitfold.quant.quantease import quantease
from bitfold.quant.im2col import ConvGeometry

Dtype = Literal["int", "fp8-e4m3", "fp8-e5m2", "fp4-e2m1", "nf4"]
OpType = Literal["MatMul", "Conv"]


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsConfig:
    method: Literal["rtn", "gptq", "awq", "quantease"] = dataclasses.field(default="rtn", metadata={"doc": "rtn | gptq | awq | quantease"})
    bits: int = dataclasses.field(default=4, metadata={"doc": "2, 3, 4 or 8 (integer dtype only)"})
    group_size: int = dataclasses.field(default=128, metadata={"doc": "elements per scale along K; -1 per channel, 0 per tensor"})
    symmetric: bool = dataclasses.field(default=True, metadata={"doc": "signed codes, zero point 0; false: unsigned with zero point"})
    zero_point: Literal["int", "float"] = dataclasses.field(default="int", metadata={"doc": "asymmetric: int (range widened to hold 0, ONNX QDQ) | float (the group's own min-max grid, as llama.cpp Q4_1; matmulnbits and fake only)"})
    dtype: Dtype = dataclasses.field(default="int", metadata={"doc": "int | fp8-e4m3 | fp8-e5m2 | fp4-e2m1 | nf4"})
    format: Literal["qdq", "matmulnbits", "fake"] = dataclasses.field(default="qdq", metadata={"doc": "qdq | matmulnbits | fake"})
    clip: Clip = dataclasses.field(default="none", metadata={"doc": "range shrink per scale group: none | weight (least weight MSE) | output (least output error; needs calibration)"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on node name, weight name or torch module scope"})
    damp: float = dataclasses.field(default=0.01, metadata={"doc": "GPTQ: Hessian dampening, fraction of mean diag"})
    block_size: int = dataclasses.field(default=128, metadata={"doc": "GPTQ: columns per lazy-update block"})
    act_order: bool = dataclasses.field(default=False, metadata={"doc": "GPTQ: visit columns by decreasing Hessian diagonal"})
    sweeps: int = dataclasses.field(default=20, metadata={"doc": "QuantEase: most coordinate-descent sweeps over the columns"})
    start: Literal["gptq", "rtn"] = dataclasses.field(default="gptq", metadata={"doc": "QuantEase: the solution the descent starts from (and whose grid it keeps)"})
    sink_weight: float = dataclasses.field(default=1.0, metadata={"doc": "GPTQ, AWQ, output clip: weight in H of each sequence's first token (attention sink)"})
    awq_grid: int = dataclasses.field(default=20, metadata={"doc": "AWQ: number of alpha steps searched in [0, 1]"})
    accuracy_level: int = dataclasses.field(default=4, metadata={"doc": "matmulnbits: ORT compute type (4 = int8, fastest)"})
    compensate_rank: int = dataclasses.field(default=0, metadata={"doc": "EoRA: rank of a float branch fitted to the quantization error (0: none)"})
    op_types: tuple[OpType, ...] = dataclasses.field(default=("MatMul",), metadata={"doc": "ops whose weights are quantized: MatMul, Conv (2-D)"})

    def __post_init__(self) -> None:
        if self.dtype == "int" and self.bits not in (2, 3, 4, 8):
            raise ValueError("bits must be 2, 3, 4 or 8")
        if self.sweeps < 0:
            raise ValueError("sweeps must be >= 0")
        if self.compensate_rank < 0:
            raise ValueError("compensate_rank must be >= 0")
        if self.group_size < -1:
            raise ValueError("group_size must be -1 (per channel), 0 (per tensor) or a positive size")
        if not 0.0 < self.damp <= 1.0:
            raise ValueError("damp must be a number in (0, 1]")
        if self.clip == "output" and self.group_size == 0:
            raise ValueError("clip = \"output\" fits each scale group; use group_size -1 or > 0, or clip = \"weight\"")
        if self.format == "matmulnbits":
            if self.dtype != "int":
                raise ValueError("format 'matmulnbits' stores integer codes only; use dtype = \"int\"")
            g = self.group_size
            if g < 16 or g & (g - 1):
                raise ValueError("format 'matmulnbits' needs group_size a power of two >= 16 (e.g. 32, 64, 128)")
        if self.format == "qdq" and self.dtype in ("fp4-e2m1", "nf4"):
            raise ValueError(f"dtype '{self.dtype}' has no ONNX Runtime DequantizeLinear kernel; use format = \"fake\"")
        if not self.op_types:
            raise ValueError("op_types must name MatMul and/or Conv")
        if self.zero_point == "float":
            if self.symmetric or self.dtype != "int":
                raise ValueError("zero_point = \"float\" is an asymmetric integer grid; set symmetric = false, dtype = \"int\"")
            if self.format == "qdq":
                raise ValueError("zero_point = \"float\" cannot be stored by DequantizeLinear; use format = \"matmulnbits\" or \"fake\"")
        if "Conv" in self.op_types:
            if self.format == "matmulnbits":
                raise ValueError("format 'matmulnbits' is a MatMul kernel; Conv weights need format = \"qdq\" or \"fake\"")
            if self.group_size == 0:
                raise ValueError("Conv weights take per-channel or per-group scales; use group_size -1 or > 0")
            if self.compensate_rank:
                raise ValueError("compensate_rank adds MatMul branches; drop \"Conv\" from op_types or set it to 0")

    @property
    def number_format(self) -> Format:
        name = f"int{self.bits}" if self.dtype == "int" else self.dtype
        return format_from(name, symmetric=self.symmetric, float_zero=self.zero_point == "float")

    @property
    def tag(self) -> str:
        return f"{self.method}-{self.number_format.name}-{granularity_from(self.group_size)}"


@register
class QuantizeWeights(BitfoldPass):
    """Weight-only quantization of MatMul and Conv weights (RTN, GPTQ, AWQ or QuantEase) emitted as QDQ, MatMulNBits or fake-quant."""

    name = "quantize-weights"
    family = "quant"
    Config = QuantizeWeightsConfig

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.method in ("gptq", "awq", "quantease") or self.config.compensate_rank > 0 or self.config.clip == "output"

    @property
    def holds_whole_model(self) -> str | None:
        reason = super().holds_whole_model
        if reason and self.config.method == "gptq":
            reason += " (reconstruct with clip_steps = 0 and round_steps = 0 is GPTQ block by block)"
        return reason

    def rewrite(self, model: ir.Model) -> int:
        targets = self.collect(model)
        if not targets:
            return 0
        if self.config.format == "qdq" and model.opset_imports.get("", 1) < 21:
            upgrade_opset(model, 21)
            targets = self._recollect(model)  # the upgrade drops unused nodes, targets among them
            if not targets:
                return 1  # the opset changed
        matmuls = [node for node in targets if node.op_type == "MatMul"]
        convs = [node for node in targets if node.op_type == "Conv"]
        patch_grams = self._conv_grams(model, convs) if self.needs_calibration and convs else {}
        stats = self._stats(model, matmuls) if self.needs_calibration and matmuls else {}
        hessians = {name: s.gram for name, s in stats.items()}
        if self.config.method == "awq":
            hessians.update(self._awq(model, matmuls, stats))
        weights = list(dict.fromkeys(node.inputs[1] for node in targets))  # the float weights about to be replaced
        inputs = {node: node.inputs[0].name for node in targets}  # statistics keys; a low-rank branch renames inputs
        self._solver_notes: list[str] = []
        self._emitted: dict[ir.Value, tuple[np.ndarray, ir.Value]] = {}  # weight → (dequantized Wᵀ, its value)
        problems = ((node.inputs[1].const_value.numpy().astype(np.float32).T, hessians.get(inputs[node])) for node in matmuls)
        # the Hessian methods' solves are independent per layer and heavy enough to send to workers (bitfold.parallel)
        executor = parallel.current() if self.config.method in ("gptq", "quantease") else parallel.Serial()
        solved = executor.map(_solve, problems, setup=_solver, shared=(type(self), self.config))
        for node in tqdm(targets, desc=f"quantize-weights {self.config.tag}", leave=False, disable=len(targets) < 8):
            if node.op_type == "Conv":
                w = node.inputs[1].const_value.numpy().astype(np.float32)
                q, scale, zero = self.solve_groups(w.reshape(w.shape[0], -1), patch_grams.get(node.name))
                self.notes += [f"{node.name}: {note}" for note in self._solver_notes]
                self._solver_notes.clear()
                self.fold_conv(model.graph, node, q, scale, zero)
                continue
            x, w = node.inputs[0], node.inputs[1]
            q, scale, zero, notes = next(solved)
            self.notes += [f"{node.name}: {note}" for note in notes]
            producer = self.fold(model.graph, node, q, scale, zero)
            if self.config.compensate_rank:
                wt = w.const_value.numpy().astype(np.float32).T
                l1, l2 = eora((wt - q).T, hessians[inputs[node]], self.config.compensate_rank)
                for added in add_lowrank_branch(model.graph, producer, x, l1, l2):
                    self.stamp(added, [node])
        for weight in weights:
            drop_if_unused(model.graph, weight)
        self._emitted.clear()  # the shared weights' dequantized copies are not kept past the pass
        return len(targets)

    # -- collect ------------------------------------------------------------------------------------------------

    def collect(self, model: ir.Model) -> list[ir.Node]:
        """MatMuls (and 2-D Convs, if asked for) with a constant float weight, not excluded, not already quantized."""
        found, other_convs = [], 0
        for node in model.graph:
            if node.op_type not in self.config.op_types or node.domain or QUANTIZED_KEY in node.metadata_props:
                continue
            if node.metadata_props.get(ISLAND_KEY) == "float32":  # kept float on purpose (a low-rank branch)
                continue
            weight = node.inputs[1]
            tensor = weight.const_value if weight is not None and weight.is_initializer() else None
            if tensor is None or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                continue
            if node.op_type == "Conv":
                if len(tensor.shape) != 4:
                    other_convs += 1
                    continue
                if len(weight.uses()) != 1:
                    continue
            elif len(tensor.shape) != 2 or any(user.op_type != "MatMul" for user, _ in weight.uses()):
                continue
            scope = (node.name or "", weight.name or "", node.metadata_props.get("namespace", ""))
            if any(fnmatch.fnmatchcase(s, pattern) for pattern in self.config.exclude for s in scope):
                continue
            found.append(node)
        if other_convs:
            self.notes.append(f"{other_convs} Conv weights left alone: only 2-D Convs are quantized")
        return found

    def _recollect(self, model: ir.Model) -> list[ir.Node]:
        """``collect`` again, without repeating its notes."""
        kept = len(self.notes)
        found = self.collect(model)
        del self.notes[kept:]
        return found

    def _stats(self, model: ir.Model, targets: list[ir.Node]) -> dict[str, TensorStats]:
        """Statistics with the Gram matrix of every target's input (one calibration run, shared by all methods)."""
        inputs = sorted({node.inputs[0].name for node in targets})
        return self.calibration.collect(model, inputs, gram=inputs, sink_weight=self.config.sink_weight)

    def _conv_grams(self, model: ir.Model, convs: list[ir.Node]) -> dict[str, np.ndarray]:
        """Per-group input-patch Gram matrices (groups, K, K) of every target Conv, keyed by node name."""
        return self.calibration.conv_grams(model, {node.name: (node.inputs[0].name, ConvGeometry.of(node)) for node in convs})

    def _awq(self, model: ir.Model, targets: list[ir.Node], stats: dict[str, TensorStats]) -> dict[str, np.ndarray]:
        """Search and fold AWQ scales for every group of targets sharing an input whose producer can absorb 1/s.

        Column scalings of a weight commute with its quantization (groups run along K), so every group's scale is
        searched on the input graph's statistics, all scales are folded, and quantization follows. Returns the Gram
        matrix of every rescaled input as the rescaled graph computes it (H / s sᵀ).
        """
        groups: dict[ir.Value, list[ir.Node]] = {}
        for node in targets:
            groups.setdefault(node.inputs[0], []).append(node)
        folds = {x: scale_fold(model.graph, x, set(nodes)) for x, nodes in groups.items()}
        hessians = {}
        fmt, granularity = self.config.number_format, granularity_from(self.config.group_size)

        def quantize(w: np.ndarray) -> np.ndarray:  # the search rounds without output clipping, which follows it
            return rtn(w.T, fmt, granularity, clip=self.config.clip == "weight")[0].T

        for x, nodes in groups.items():
            if folds[x] is None:
                continue
            weights = [node.inputs[1].const_value.numpy() for node in nodes]
            found = awq_scale(weights, stats[x.name].gram, stats[x.name].mean_abs, quantize, grid=self.config.awq_grid,
                              group_size=self.config.group_size)  # fmt: skip
            s = found.scale
            folds[x](s)
            hessians[x.name] = stats[x.name].gram / np.outer(s, s)
            for node, w in zip(nodes, weights, strict=True):
                old = node.inputs[1]
                node.replace_input_with(1, add_initializer(model.graph, f"{old.name}_awq", (w * s[:, None]).astype(w.dtype)))
                node.metadata_props["bitfold.awq_alpha"] = f"{found.alpha:.2f}{' with weight term' if found.weight_term else ''}"
                drop_if_unused(model.graph, old)
        return hessians

    # -- solve --------------------------------------------------------------------------------------------------

    def solve(self, wt: np.ndarray, hessian: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Quantize Wᵀ (N, K); returns the dequantized weight and per-element scale and zero point."""
        fmt, granularity = self.config.number_format, granularity_from(self.config.group_size)
        if self.config.method == "gptq":
            return gptq(wt, hessian, fmt, granularity, block_size=self.config.block_size, damp=self.config.damp,
                        act_order=self.config.act_order, clip=self.config.clip, notes=getattr(self, "_solver_notes", None))  # fmt: skip
        if self.config.method == "quantease":
            return quantease(wt, hessian, fmt, granularity, sweeps=self.config.sweeps, start=self.config.start,
                             block_size=self.config.block_size, damp=self.config.damp, act_order=self.config.act_order,
                             clip=self.config.clip, notes=getattr(self, "_solver_notes", None))  # fmt: skip
        scale, zero = group_params(wt, fmt, granularity, self.config.clip, hessian)
        return fmt.dequantize(fmt.quantize(wt, scale, zero), scale, zero), scale, zero

    def solve_groups(self, wt: np.ndarray, grams: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Quantize a Conv's (N, K) rows group by group, each against its own patch Gram matrix (groups, K, K)."""
        if grams is None:
            return self.solve(wt, None)
        parts = [self.solve(rows, h) for rows, h in zip(np.split(wt, len(grams)), grams, strict=True)]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    # -- fold ---------------------------------------------------------------------------------------------------

    def fold(self, graph: ir.Graph, node: ir.Node, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> ir.Node:
        """Emit the quantized weight; returns the node that now computes the MatMul's output."""
        weight = node.inputs[1]
        base = weight.name
        fmt, granularity = self.config.number_format, granularity_from(self.config.group_size)
        emitted = getattr(self, "_emitted", {})
        if self.config.format != "matmulnbits" and weight in emitted and np.array_equal(emitted[weight][0], q):
            node.replace_input_with(1, emitted[weight][1])  # a weight shared by readers is quantized once
            node.metadata_props[QUANTIZED_KEY] = self.config.tag
            self.stamp(node, [node])
            return node
        if self.config.format == "fake":
            node.replace_input_with(1, add_initializer(graph, f"{base}_fq", q.T.astype(weight.const_value.dtype.numpy())))
            if weight.uses():  # still read by another MatMul: it may take the same codes (a weight read once is not kept)
                emitted[weight] = (q, node.inputs[1])
            node.metadata_props[QUANTIZED_KEY] = self.config.tag
            self.stamp(node, [node])
            return node
        codes = fmt.quantize(q, scale, zero)
        n, k = q.shape
        if self.config.format == "matmulnbits":
            g = granularity.size
            storage = 4 if self.config.bits == 3 else self.config.bits
            offset = 0 if not self.config.symmetric else 1 << (storage - 1)
            b, s, zp = matmulnbits.pack(
                (codes + offset).astype(np.uint8), scale[:, ::g], None if self.config.symmetric else zero[:, ::g], storage, g,
                float_zero=self.config.zero_point == "float",
            )
            dtype = weight.const_value.dtype.numpy()  # MatMulNBits types A, scales and float zero points alike (T1)
            s = s.astype(dtype)
            if zp is not None and zp.dtype != np.uint8:
                zp = zp.astype(dtype)
            inputs = [node.inputs[0], add_initializer(graph, f"{base}_q", b), add_initializer(graph, f"{base}_scales", s)]
            if zp is not None:
                inputs.append(add_initializer(graph, f"{base}_zp", zp))
            new = ir.node(
                "MatMulNBits", inputs, domain="com.microsoft", name=fresh_name(graph, f"{node.name or base}_nbits", node=True),
                attributes={"K": k, "N": n, "bits": storage, "block_size": g, "accuracy_level": self.config.accuracy_level},
            )  # fmt: skip
            graph.opset_imports.setdefault("com.microsoft", 1)
            new.metadata_props[QUANTIZED_KEY] = self.config.tag
            self.stamp(new, [node])
            ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
            return new
        dtype = weight.const_value.dtype.numpy()
        dq_inputs, attrs = self._qdq_tensors(graph, base, codes.T, scale, zero, fmt, granularity, channel_axis=1, dtype=dtype)
        dq = ir.node("DequantizeLinear", dq_inputs, attributes=attrs, name=fresh_name(graph, f"{node.name or base}_dq", node=True))
        dq.outputs[0].name = fresh_name(graph, f"{base}_dq")
        self.stamp(dq, [node])
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        if weight.uses():  # still read by another MatMul: it may take the same codes
            emitted[weight] = (q, dq.outputs[0])
        node.metadata_props[QUANTIZED_KEY] = self.config.tag
        return node

    def fold_conv(self, graph: ir.Graph, node: ir.Node, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> None:
        """Emit a Conv's quantized weight from its (N, K) rows: DequantizeLinear on the 4-D codes (per channel) or
        on the (N, K) codes followed by a Reshape (per group), or the dequantized weight (fake)."""
        weight = node.inputs[1]
        base, shape = weight.name, tuple(weight.const_value.shape)
        fmt, granularity = self.config.number_format, granularity_from(self.config.group_size)
        node.metadata_props[QUANTIZED_KEY] = self.config.tag
        if self.config.format == "fake":
            node.replace_input_with(1, add_initializer(graph, f"{base}_fq", q.reshape(shape).astype(weight.const_value.dtype.numpy())))
            self.stamp(node, [node])
            return
        codes = fmt.quantize(q, scale, zero)
        per_channel = isinstance(granularity, PerChannel)
        stored = codes.reshape(shape) if per_channel else codes
        dtype = weight.const_value.dtype.numpy()
        dq_inputs, attrs = self._qdq_tensors(graph, base, stored, scale, zero, fmt, granularity, channel_axis=0, dtype=dtype)
        added = [ir.node("DequantizeLinear", dq_inputs, attributes=attrs, name=fresh_name(graph, f"{node.name or base}_dq", node=True))]
        added[0].outputs[0].name = fresh_name(graph, f"{base}_dq")
        if not per_channel:
            target = add_initializer(graph, f"{base}_shape", np.asarray(shape, np.int64))
            added.append(ir.node("Reshape", [added[0].outputs[0], target], name=fresh_name(graph, f"{node.name or base}_dq_reshape", node=True)))
            added[1].outputs[0].name = fresh_name(graph, f"{base}_dq_4d")
        for new in added:
            self.stamp(new, [node])
        graph.insert_before(node, added)
        node.replace_input_with(1, added[-1].outputs[0])

    def _qdq_tensors(self, graph, base, stored, scale, zero, fmt, granularity, channel_axis: int, dtype: np.dtype):
        """DequantizeLinear inputs for codes ``stored`` in the emitted layout, whose output channels lie on
        ``channel_axis`` (MatMul (K, N): 1; Conv: 0); scale groups run along axis 1 - channel_axis. The scale is
        stored as ``dtype``, the float type of the weight it replaces (DequantizeLinear's output takes its type)."""
        if fmt.name.startswith("fp8"):
            container = stored
        elif self.config.symmetric:
            container = stored.astype(np.int8 if fmt.bits == 8 else ml_dtypes.int4)
        else:
            container = stored.astype(np.uint8 if fmt.bits == 8 else ml_dtypes.uint4)
        if isinstance(granularity, PerTensor):
            s, z, attrs = scale[0, 0], zero[0, 0], {}
        elif isinstance(granularity, PerChannel):
            s, z, attrs = scale[:, 0], zero[:, 0], {"axis": channel_axis}
        else:
            g = granularity.size
            s, z = scale[:, ::g], zero[:, ::g]
            if channel_axis == 1:
                s, z = s.T, z.T
            attrs = {"axis": 1 - channel_axis, "block_size": g}
        inputs = [add_initializer(graph, f"{base}_q", container), add_initializer(graph, f"{base}_scale", np.asarray(s, dtype))]
        if not self.config.symmetric:
            inputs.append(add_initializer(graph, f"{base}_zero", np.asarray(z).astype(container.dtype)))
        return inputs, attrs


def _solver(shared: tuple[type[QuantizeWeights], QuantizeWeightsConfig]) -> QuantizeWeights:
    """A worker's solver: the pass, rebuilt from its class and configuration."""
    cls, config = shared
    solver = cls(config)
    solver._solver_notes = []
    return solver


def _solve(solver: QuantizeWeights, problem: tuple[np.ndarray, np.ndarray | None]):
    """One layer's dequantized Wᵀ, scale and zero point, and the solver's notes."""
    wt, hessian = problem
    q, scale, zero = solver.solve(wt, hessian)
    notes, solver._solver_notes = solver._solver_notes, []
    return q, scale, zero, notes
