"""What the multiplication-less passes share: which weights they rewrite, the Hessians GPTQ rounding reads,
emitting a bitfold op (or fake-quantized weights), and counting the bits each weight costs as stored.

Targets are ``MatMul(A, W)`` and plain ``Gemm(A, W[, C])`` (alpha = beta = 1, A not transposed; the bias becomes
an Add after the op) with W a constant 2-D float initializer read by nothing else, and with
``format = "fake"`` also 2-D ``Conv`` weights (reshaped to [C_out, C_in/groups · kernel]; GPTQ rounds each group
of rows against the Gram matrix of that group's input patches, ``bitfold.quant.im2col``). Left alone:
weights matching an ``exclude`` glob (node, weight or torch module scope), low-rank branches pinned to float32,
weights another pass already quantized, and with ``keep_ends`` (default) the first layers (reading a graph
input, like a CNN's stem) and the head (reaching a graph output through bias/residual Adds and layout ops only).
Embedding tables are Gathers and never touched.

Bits per weight count every tensor the op reads besides the activation (codes, scales, means, salient masks and
values) at its stored width, divided by K · N; the pipeline report shows the total and each rewritten node
carries its own in ``bitfold.bits_per_weight``.

The bitfold ops' ONNX functions are typed float32: a pass that would emit one for a float16 or bfloat16 weight
refuses the model (PassPreconditionError) before changing anything; ``format = "fake"`` (or prune's ``masked``)
keeps any float type.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import types
from abc import abstractmethod
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from bitfold.errors import PassPreconditionError
from bitfold.ops.functions import DOMAIN, MIN_OPSET, upgrade_opset
from bitfold.passes.initializers import add_initializer, copy_type, drop_if_unused
from bitfold.passes.registry import ISLAND_KEY, PASS_KEY, QUANTIZED_KEY, BitfoldPass
from bitfold.passes.transforms.structure import feeds_graph_output, reads_graph_input
from bitfold.passes.transforms.weights import fresh_name
from bitfold.quant.im2col import ConvGeometry

BITS_KEY = "bitfold.bits_per_weight"


@dataclasses.dataclass(frozen=True)
class MultlessConfig:
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on node name, weight name or torch module scope"})
    keep_ends: bool = dataclasses.field(default=True, metadata={"doc": "leave layers reading a graph input and the head alone"})
    gptq: bool = dataclasses.field(default=False, metadata={"doc": "round column by column with GPTQ error compensation (needs calibration)"})
    damp: float = dataclasses.field(default=0.01, metadata={"doc": "GPTQ: Hessian dampening, fraction of mean diag"})
    block_size: int = dataclasses.field(default=128, metadata={"doc": "GPTQ: columns per lazy-update block"})
    act_order: bool = dataclasses.field(default=True, metadata={"doc": "GPTQ: visit columns by decreasing Hessian diagonal"})
    sink_weight: float = dataclasses.field(default=1.0, metadata={"doc": "GPTQ: weight in H of each sequence's first token (attention sink)"})
    format: Literal["op", "fake"] = dataclasses.field(default="op", metadata={"doc": "op: the bitfold op | fake: dequantized float weights (also Conv)"})

    def __post_init__(self) -> None:
        if not 0.0 < self.damp <= 1.0:
            raise ValueError("damp must be a number in (0, 1]")


@dataclasses.dataclass
class Encoded:
    """A solved weight: the dequantized (N, K) matrix and the op's tensors (after X, in input order) and attributes."""

    dequantized: np.ndarray
    tensors: dict[str, np.ndarray]
    attributes: dict[str, int] = dataclasses.field(default_factory=dict)
    op: types.ModuleType | None = None  # the op module, when it differs per layer (else the pass's ``op``)

    @property
    def bits(self) -> int:
        return 8 * sum(t.nbytes for t in self.tensors.values())


class WeightPass(BitfoldPass):
    """Base class of passes that rewrite weights one layer at a time: subclasses implement ``solve_node`` and set
    ``op`` (the op module) when ``emits_op``."""

    family = "multless"
    op: ClassVar[types.ModuleType]

    @property
    def uses_hessian(self) -> bool:
        return self.config.gptq

    @property
    def emits_op(self) -> bool:
        """Whether weights become the bitfold op (else they stay float, rewritten in place)."""
        return self.config.format == "op"

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.uses_hessian

    @property
    def loop(self) -> dict[str, float]:
        """GPTQ loop arguments."""
        return {"damp": self.config.damp, "block_size": self.config.block_size, "act_order": self.config.act_order,
                "notes": getattr(self, "_solver_notes", None)}

    @abstractmethod
    def solve_node(self, node: ir.Node, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        """Encode Wᵀ (N, K) of ``node``, given the input's Hessian when ``uses_hessian``."""

    def summary(self, count: int, bits: int, weights: int) -> str:
        return f"{count} weights, {bits / weights:.3f} bits per weight as stored (codes, scales, side tensors)"

    def rewrite(self, model: ir.Model) -> int:
        targets = self.collect(model)
        if not targets:
            return 0
        if self.emits_op:
            self.refuse_low_precision(targets)
        min_opset = max(MIN_OPSET, getattr(self.op, "MIN_OPSET", MIN_OPSET)) if self.emits_op else 0
        if model.opset_imports.get("", 1) < min_opset:
            upgrade_opset(model, min_opset)  # before emitting: it drops unused nodes, targets among them
            kept = len(self.notes)
            targets = self.collect(model)
            del self.notes[kept:]
            if not targets:
                return 1  # the opset changed
        hessians = self._hessians(model, targets) if self.uses_hessian else {}
        inputs = {node: node.inputs[0].name for node in targets}  # Hessian keys; a low-rank branch renames inputs
        bits = weights = 0
        self._solver_notes: list[str] = []
        for node in tqdm(targets, desc=self.name, leave=False, disable=len(targets) < 8):
            w = node.inputs[1].const_value.numpy()
            wt = _as_rows(node, w)
            if node.op_type == "Conv" and node.name in hessians:
                encoded = self._solve_groups(node, wt.astype(np.float64), hessians[node.name])
            else:
                encoded = self.solve_node(node, wt.astype(np.float64), hessians.get(inputs[node]))
            bits, weights = bits + encoded.bits, weights + wt.size
            self.notes += [f"{node.name}: {note}" for note in self._solver_notes]
            self._solver_notes.clear()
            self.fold(model, node, encoded, w)
        self.notes.append(self.summary(len(targets), bits, weights))
        return len(targets)

    def refuse_low_precision(self, targets: list[ir.Node]) -> None:
        """Raise PassPreconditionError if a target's weight is not float32 (the emitted op's function is)."""
        for node in targets:
            dtype = node.inputs[1].const_value.dtype
            if dtype != ir.DataType.FLOAT:
                raise PassPreconditionError(
                    f"pass '{self.name}' emits a bitfold op for node '{node.name}', whose weight is {dtype.name.lower()}, "
                    f"and works on float32 graphs: run it before cast-precision, or on the float32 model."
                )

    # -- collect ------------------------------------------------------------------------------------------------

    def collect(self, model: ir.Model) -> list[ir.Node]:
        found, convs, computed = [], 0, 0
        for node in model.graph:
            kinds = ("MatMul", "Gemm") if self.emits_op else ("MatMul", "Gemm", "Conv")
            if node.op_type not in kinds or node.domain or len(node.inputs) < 2 or not _plain_gemm(node):
                continue
            props = node.metadata_props
            if props.get(ISLAND_KEY) == "float32" or QUANTIZED_KEY in props or BITS_KEY in props or props.get(PASS_KEY) == self.name:
                continue
            weight = node.inputs[1]
            tensor = weight.const_value if weight is not None and weight.is_initializer() else None
            producer = weight.producer() if weight is not None else None
            if tensor is None and producer is not None and producer.op_type == "Transpose" and producer.inputs[0].is_initializer():
                computed += 1
            rank = len(tensor.shape) if node.op_type == "Conv" and tensor is not None else 2
            if tensor is None or len(tensor.shape) != rank or rank < 2 or tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                continue
            if any(user is not node for user, _ in weight.uses()):
                continue
            scope = (node.name or "", weight.name or "", node.metadata_props.get("namespace", ""))
            if any(fnmatch.fnmatchcase(s, p) for p in self.config.exclude for s in scope):
                continue
            if self.config.keep_ends and (reads_graph_input(node.inputs[0]) or feeds_graph_output(node.outputs[0])):
                continue
            if node.op_type == "Conv" and self.uses_hessian and isinstance(ConvGeometry.of(node), str):
                convs += 1
                continue
            found.append(node)
        if computed:
            self.notes.append(f"{computed} weights are computed (Transpose of a constant): run fold-constants first")
        if convs:
            self.notes.append(f"{convs} Conv weights left alone: GPTQ rounding needs a 2-D Conv's patch Hessian")
        return found

    def _hessians(self, model: ir.Model, targets: list[ir.Node]) -> dict[str, np.ndarray]:
        """Gram matrices keyed by input name (MatMul, Gemm) and per-group patch Grams keyed by node name (Conv)."""
        convs = {node.name: (node.inputs[0].name, ConvGeometry.of(node)) for node in targets if node.op_type == "Conv"}
        inputs = sorted({node.inputs[0].name for node in targets if node.op_type != "Conv"})
        stats = self.calibration.collect(model, inputs, gram=inputs, sink_weight=self.config.sink_weight) if inputs else {}
        grams = self.calibration.conv_grams(model, convs) if convs else {}
        return {**{name: s.gram for name, s in stats.items()}, **grams}

    def _solve_groups(self, node: ir.Node, wt: np.ndarray, grams: np.ndarray) -> Encoded:
        """A Conv's rows group by group, each against its group's patch Gram matrix; the tensors of every group
        are kept (under group-prefixed names) so the bits count covers them all."""
        parts = [self.solve_node(node, rows, h) for rows, h in zip(np.split(wt, len(grams)), grams, strict=True)]
        tensors = {f"g{i}_{name}": t for i, part in enumerate(parts) for name, t in part.tensors.items()}
        return Encoded(np.concatenate([part.dequantized for part in parts]), tensors)

    # -- fold ---------------------------------------------------------------------------------------------------

    def fold(self, model: ir.Model, node: ir.Node, encoded: Encoded, w: np.ndarray) -> ir.Node:
        """Write the encoded weight; returns the node that now computes the layer's output (before any bias)."""
        graph, weight = model.graph, node.inputs[1]
        per_weight = f"{encoded.bits / w.size:.3f}"
        if not (self.emits_op and encoded.tensors) or node.op_type == "Conv":
            dense = _from_rows(node, encoded.dequantized, w.shape)
            node.replace_input_with(1, add_initializer(graph, f"{weight.name}_{self.name}", dense.astype(w.dtype)))
            if encoded.tensors:
                node.metadata_props[BITS_KEY] = per_weight
            self.stamp(node, [node])
            producer = node
        else:
            inputs = [add_initializer(graph, f"{weight.name}_{suffix}", t) for suffix, t in encoded.tensors.items()]
            op = encoded.op or self.op
            new = ir.node(op.OP_TYPE, [node.inputs[0], *inputs], domain=DOMAIN, name=fresh_name(graph, f"{node.name or weight.name}_{self.name}", node=True),
                          attributes=encoded.attributes)  # fmt: skip
            new.metadata_props[BITS_KEY] = per_weight
            added = [new]
            if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
                added.append(ir.node("Add", [new.outputs[0], node.inputs[2]], name=fresh_name(graph, f"{node.name or weight.name}_bias", node=True)))
            for n in added:
                copy_type(n.outputs[0], node.outputs[0])
                if "namespace" in node.metadata_props:
                    n.metadata_props["namespace"] = node.metadata_props["namespace"]
                self.stamp(n, [node])
            ir.convenience.replace_nodes_and_values(graph, node, [node], added, node.outputs, added[-1].outputs)
            op.ensure_function(model)
            producer = new
        drop_if_unused(graph, weight)
        return producer


def _plain_gemm(node: ir.Node) -> bool:
    """True for every non-Gemm node; for a Gemm, whether it is A · op(B) + C with no scaling or transposed A."""
    if node.op_type != "Gemm":
        return True
    a = node.attributes
    return a.get_float("alpha", 1.0) == 1.0 and a.get_float("beta", 1.0) == 1.0 and a.get_int("transA", 0) == 0


def _as_rows(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The weight as (N outputs, K inputs)."""
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return w
    return w.T


def _from_rows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_as_rows`."""
    if node.op_type == "Conv":
        return rows.reshape(shape)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return rows
    return rows.T


class MultlessPass(WeightPass):
    """A weight pass whose encoding is the same for every layer: subclasses implement ``solve``."""

    @abstractmethod
    def solve(self, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        """Encode Wᵀ (N, K), given the input's Hessian when ``uses_hessian``."""

    def solve_node(self, node: ir.Node, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        return self.solve(wt, hessian)
