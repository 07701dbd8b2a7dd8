"""cast-precision: run the model in float16 or bfloat16, keeping fp32 islands where low precision would hurt.

Rewrites every float32 node computation to ``dtype``: float initializers it reads are stored in ``dtype``, its
float outputs become ``dtype``, and one ``Cast`` is inserted per (tensor, precision) boundary, shared by all its
readers. Islands (nodes kept in fp32) are chosen on calibration data:

1. overflow: a node whose fp32 output (or input) exceeds ``overflow_fraction`` of the format's largest finite
   value stays fp32;
2. precision: the converted model is run on the calibration data with every node output exposed; a node whose
   output's relative error (max |Δ| / max |y|) exceeds ``tolerance`` while all its inputs are still within it
   introduced the error itself, so it joins the islands; repeated ``rounds`` times.

``keep_io_types`` keeps graph inputs and outputs float32 (with Casts at the edge). Guarantees: an error bound, the
measured one.

bfloat16: ONNX Runtime's CPU provider has bfloat16 kernels for Cast and data movement only, so the precision
islands are chosen on an emulation that runs there: every float tensor a converted node reads or writes is
rounded to bfloat16 (``Cast`` to bfloat16 and back) while the arithmetic stays fp32, as GPU bfloat16 kernels
accumulate in fp32. The emitted model computes in bfloat16 and runs where those kernels exist (CUDA, TVM);
``emulate = true`` writes the emulation itself (either dtype), which ONNX Runtime's CPU runs, for accuracy studies. Leaves alone: nodes with subgraphs, Cast nodes (their target type is explicit), non-float tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from bitfold.frontend.onnx_io import clone
from bitfold.passes.initializers import add_initializer, drop_if_unused
from bitfold.passes.registry import ISLAND_KEY, BitfoldPass, register
from bitfold.quant.calibration import expose, exposed_slices

_TYPES = {"float16": (ir.DataType.FLOAT16, np.float16), "bfloat16": (ir.DataType.BFLOAT16, ml_dtypes.bfloat16)}
_FP32 = ir.DataType.FLOAT


@dataclasses.dataclass(frozen=True)
class CastPrecisionConfig:
    dtype: Literal["float16", "bfloat16"] = dataclasses.field(default="float16", metadata={"doc": "float16 | bfloat16 (islands chosen on an fp32 emulation; runs on CUDA/TVM)"})
    keep_io_types: bool = dataclasses.field(default=True, metadata={"doc": "graph inputs and outputs stay float32"})
    tolerance: float = dataclasses.field(default=0.01, metadata={"doc": "relative output error a node may introduce"})
    overflow_fraction: float = dataclasses.field(default=0.5, metadata={"doc": "fp32 island above this fraction of the format's max"})
    rounds: int = dataclasses.field(default=2, metadata={"doc": "precision-island refinement rounds"})
    emulate: bool = dataclasses.field(default=False, metadata={"doc": "write the emulation (fp32 arithmetic, rounded tensors) instead, for accuracy studies on CPU"})

    def __post_init__(self) -> None:
        if not 0 < self.tolerance < 1 or not 0 < self.overflow_fraction <= 1 or self.rounds < 0:
            raise ValueError("tolerance in (0, 1), overflow_fraction in (0, 1] and rounds >= 0 are required")


@register
class CastPrecision(BitfoldPass):
    """Convert float32 computation to float16 or bfloat16 with automatically chosen fp32 islands."""

    name = "cast-precision"
    family = "quant"
    Config = CastPrecisionConfig
    needs_calibration = True

    def rewrite(self, model: ir.Model) -> int:
        ShapeInferencePass()(model)  # every tensor needs its element type to know where Casts go
        candidates = [n for n in model.graph if _convertible(n)]
        if not candidates:
            return 0
        islands = self._overflow_islands(model, candidates)
        for _ in range(self.config.rounds):
            new = self._precision_islands(model, candidates, islands)
            if not new:
                break
            islands |= new
        converted = [n for n in candidates if n.name not in islands]
        for node in candidates:
            if node.name in islands:
                node.metadata_props[ISLAND_KEY] = "float32"
        if self.config.emulate:
            for node in converted:
                node.metadata_props[ISLAND_KEY] = f"{self.config.dtype}-emulated"
            self.emulate(model.graph, converted)
        else:
            self.fold(model.graph, converted)
        return len(converted)

    # -- collect / solve ----------------------------------------------------------------------------------------

    def _overflow_islands(self, model: ir.Model, candidates: list[ir.Node]) -> set[str]:
        limit = float(ml_dtypes.finfo(_TYPES[self.config.dtype][1]).max)
        names = _float_tensors(candidates)
        stats = self.calibration.collect(model, names, progress=False)
        big = {n for n, s in stats.items() if max(abs(s.min), abs(s.max)) > self.config.overflow_fraction * limit}
        return {node.name for node in candidates if any(v is not None and v.name in big for v in (*node.inputs, *node.outputs))}

    def _precision_islands(self, model: ir.Model, candidates: list[ir.Node], islands: set[str]) -> set[str]:
        from bitfold.backends import compile

        names = [v.name for n in candidates for v in n.outputs if _is_float(v)]
        trial = clone(model)
        trial_nodes = [n for n in trial.graph if _convertible(n) and n.name not in islands]
        if self.config.dtype == "bfloat16":
            self.emulate(trial.graph, trial_nodes)
        else:
            self.fold(trial.graph, trial_nodes)
        in_trial = {v.name for n in trial.graph for v in n.outputs}
        errors: dict[str, float] = {}
        for chunk in exposed_slices([name for name in names if name in in_trial]):  # a slice of the tensors per run: bounded memory
            runs = [compile(expose(m, chunk), "ort", "cpu") for m in (model, trial)]
            for feeds in self.calibration:
                ref, got = (r.run(feeds) for r in runs)
                for name in chunk:
                    errors[name] = max(errors.get(name, 0.0), _relative_error(ref[name], got[name]))
            del runs, ref, got
        tol = self.config.tolerance
        new = set()
        for node in candidates:
            if node.name in islands:
                continue
            out_err = max((errors.get(v.name, 0.0) for v in node.outputs if _is_float(v)), default=0.0)
            in_err = max((errors.get(v.name, 0.0) for v in node.inputs if v is not None and v.producer() is not None), default=0.0)
            if out_err > tol and in_err <= tol:
                new.add(node.name)
        return new

    def emulate(self, graph: ir.Graph, converted: list[ir.Node]) -> None:
        """Round every float tensor the converted nodes read or write to bfloat16, keeping fp32 arithmetic. A
        rounded output takes its tensor's name, so statistics by name see what the converted model would hold."""
        low, np_low = _TYPES[self.config.dtype]
        chosen, done, rounded = set(converted), set(), {}

        def round_trip(value: ir.Value, anchor: ir.Node, after: bool) -> ir.Value:
            down = ir.node("Cast", [value], attributes={"to": low})
            up = ir.node("Cast", [down.outputs[0]], attributes={"to": _FP32})
            up.outputs[0].dtype, up.outputs[0].shape = _FP32, value.shape
            (graph.insert_after if after else graph.insert_before)(anchor, [down, up])
            return up.outputs[0]

        for node in converted:
            for value in node.outputs:
                if not _is_float(value):
                    continue
                uses, name = list(value.uses()), value.name
                out = round_trip(value, node, after=True)
                for user, index in uses:
                    user.replace_input_with(index, out)
                graph.outputs[:] = [out if v is value else v for v in graph.outputs]
                value.name, out.name = f"{name}_unrounded", name
                done.add(out)
        for node in converted:
            for index, value in enumerate(node.inputs):
                if not _is_float(value) or value in done or value.producer() in chosen:
                    continue
                if value not in rounded:
                    if value.is_initializer() and value.const_value is not None:
                        array = value.const_value.numpy().astype(np_low).astype(np.float32)
                        rounded[value] = add_initializer(graph, f"{value.name}_{self.config.dtype}_rounded", array)
                    else:
                        rounded[value] = round_trip(value, node, after=False)
                node.replace_input_with(index, rounded[value])

    # -- fold ---------------------------------------------------------------------------------------------------

    def fold(self, graph: ir.Graph, converted: list[ir.Node]) -> None:
        """Store converted nodes' float initializers in dtype, retype their outputs, insert shared Casts."""
        low, np_low = _TYPES[self.config.dtype]
        chosen = set(converted)
        casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        lowered_inits: dict[ir.Value, ir.Value] = {}

        def cast(value: ir.Value, to: ir.DataType, before: ir.Node) -> ir.Value:
            key = (value, to)
            if key not in casts:
                node = ir.node("Cast", [value], attributes={"to": to}, name=f"{value.name}_to_{to.name.lower()}")
                node.outputs[0].name = f"{value.name}_{to.name.lower()}"
                node.outputs[0].dtype, node.outputs[0].shape = to, value.shape
                self.stamp(node, [before])
                graph.insert_before(before, node)
                casts[key] = node.outputs[0]
            return casts[key]

        for node in converted:
            for v in node.outputs:
                if _is_float(v):
                    v.dtype = low
        if not self.config.keep_io_types:
            for v in graph.inputs:
                if _is_float(v) and not v.is_initializer():
                    v.dtype = low
        for node in list(graph):
            mine = node in chosen
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype not in (_FP32, low):
                    continue
                wanted = low if mine else _FP32
                if value.dtype == wanted:
                    continue
                if value.is_initializer() and value.const_value is not None and mine:
                    if value not in lowered_inits:
                        lowered_inits[value] = add_initializer(graph, f"{value.name}_{self.config.dtype}", value.const_value.numpy().astype(np_low))
                    node.replace_input_with(index, lowered_inits[value])
                    drop_if_unused(graph, value)
                elif value.dtype != wanted:
                    node.replace_input_with(index, cast(value, wanted, node))
        for index, value in enumerate(list(graph.outputs)):
            if value.dtype == low and self.config.keep_io_types and value.producer() is not None:
                back = ir.node("Cast", [value], attributes={"to": _FP32}, name=f"{value.name}_to_float")
                self.stamp(back, [value.producer()])
                graph.append(back)
                out = back.outputs[0]
                out.dtype, out.shape = _FP32, value.shape
                old_name = value.name
                value.name = f"{old_name}_{self.config.dtype}"
                out.name = old_name
                graph.outputs[index] = out


def _relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    """max |Δ| / max |reference| over finite entries; inf where the two disagree on the non-finite ones."""
    a, b = reference.astype(np.float64), value.astype(np.float64)
    if not a.size:
        return 0.0
    finite = np.isfinite(a)
    if not np.array_equal(finite, np.isfinite(b)) or not np.array_equal(a[~finite], b[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    return float(np.abs(a[finite] - b[finite]).max() / max(np.abs(a[finite]).max(), 1e-12))


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == _FP32


def _convertible(node: ir.Node) -> bool:
    if ISLAND_KEY in node.metadata_props or node.domain or node.op_type in ("Cast", "CastLike", "Constant", "ConstantOfShape", "Shape", "Size"):
        return False
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        return False
    return any(_is_float(v) for v in node.outputs)


def _float_tensors(nodes: list[ir.Node]) -> list[str]:
    names = {v.name for n in nodes for v in (*n.inputs, *n.outputs) if _is_float(v) and not (v.is_initializer())}
    return sorted(names)
