"""fold-norm-affine: fold LayerNorm/RMSNorm γ (and β) into the linear layers that read the norm.

For a norm whose output only linears read (``structure.linear_readers``), y = n ⊙ γ + β feeds x·W_j + b_j, so

    W_j ← diag(γ) W_j,    b_j ← β W_j + b_j    (β W_j with the original W_j)

and the norm keeps only its normalization: an RMSNorm loses its γ ``Mul`` (readers take x/rms(x)), a
``LayerNormalization`` gets γ = 1 and β = 0. A bias ``Add`` is inserted where β is non-zero and a reader has none.
A tied weight (``Transpose`` of the embedding table) gets a private copy. Guarantees: exact equivalence up to fp32
rounding. Needs: nothing. Leaves alone, with a note: norms read by anything other than linears (a post-norm
residual, a graph output). Afterwards the norms are affine-free, which ``rotate`` requires.

``center = true`` (QuaRot's treatment of LayerNorm models) also makes the residual stream mean-free: with
M = I - 11ᵀ/d, every writer W ← W M, b ← b M and the embedding E ← E M, so every stream value has zero mean, a
``LayerNormalization`` reading it computes exactly x / sqrt(mean(x²) + ε), and it is rewritten as that RMSNorm,
which commutes with rotations. It needs a residual stream whose norms all lost their affine; else a note says why.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bitfold.passes.initializers import add_initializer, drop_if_unused
from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.structure import Linear, Norm, Stream, const, find_norms, linear_readers, residual_stream
from bitfold.passes.transforms.weights import float_dtype, set_bias, set_weight


@dataclasses.dataclass(frozen=True)
class FoldNormAffineConfig:
    center: bool = dataclasses.field(default=False, metadata={"doc": "make the residual stream mean-free; LayerNorms become RMSNorms"})


@register
class FoldNormAffine(BitfoldPass):
    """Fold norm γ/β into the linears that read the norm."""

    name = "fold-norm-affine"
    family = "transforms"
    Config = FoldNormAffineConfig

    def rewrite(self, model: ir.Model) -> int:
        groups = self.collect(model.graph)
        for norm, readers in groups:
            self.fold(model.graph, norm, readers)
        count = len(groups)
        if self.config.center:
            stream = self._centerable(model.graph)
            if stream is not None:
                count += self.center(model.graph, stream)
        return count

    def _centerable(self, graph: ir.Graph) -> Stream | None:
        stream = residual_stream(graph)
        if isinstance(stream, str):
            self.notes.append(f"not centred: {stream}")
            return None
        layer = [n for n in stream.norms if n.kind == "layer"]
        if not layer:
            return None  # RMSNorm streams need no centring
        if any(n.has_affine for n in stream.norms):
            self.notes.append("not centred: a norm on the residual stream kept its affine")
            return None
        return stream

    def center(self, graph: ir.Graph, stream: Stream) -> int:
        """Project every stream writer and the embedding onto mean-free vectors; LayerNorms become RMSNorms."""
        d = stream.hidden
        m = np.eye(d) - np.full((d, d), 1.0 / d)
        table = const(stream.table)
        stream.embedding.replace_input_with(0, add_initializer(graph, f"{stream.table.name}_centered", (table.astype(np.float64) @ m).astype(table.dtype)))
        drop_if_unused(graph, stream.table)
        for lin in stream.writers:
            set_weight(graph, lin, lin.weight.astype(np.float64) @ m, "centered")
            if lin.bias is not None:
                set_bias(graph, lin, lin.bias.astype(np.float64) @ m, "centered")
            self.stamp(lin.matmul, [lin.matmul])
        layer = [n for n in stream.norms if n.kind == "layer"]
        for norm in layer:
            self._as_rmsnorm(graph, norm.affine)
        return 1 + len(stream.writers) + len(layer)

    def _as_rmsnorm(self, graph: ir.Graph, node: ir.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        eps = node.attributes.get_float("epsilon", 1e-5)
        dtype = float_dtype(x)
        two = add_initializer(graph, f"{node.name}_two", np.array(2.0, dtype))
        epsilon = add_initializer(graph, f"{node.name}_eps", np.array(eps, dtype))
        square = ir.node("Pow", [x, two])
        if graph.opset_imports.get("", 1) < 18:  # ReduceMean takes its axes as an attribute before opset 18
            mean = ir.node("ReduceMean", [square.outputs[0]], attributes={"axes": [-1], "keepdims": 1})
        else:
            axes = add_initializer(graph, f"{node.name}_axes", np.array([-1], np.int64))
            mean = ir.node("ReduceMean", [square.outputs[0], axes], attributes={"keepdims": 1})
        shifted = ir.node("Add", [mean.outputs[0], epsilon])
        root = ir.node("Sqrt", [shifted.outputs[0]])
        inverse = ir.node("Reciprocal", [root.outputs[0]])
        scaled = ir.node("Mul", [x, inverse.outputs[0]], name=f"{node.name}_rms")
        nodes = [square, mean, shifted, root, inverse, scaled]
        for i, n in enumerate(nodes):
            n.name = n.name or f"{node.name}_rms_{i}"
            self.stamp(n, [node])
        params = [v for v in node.inputs[1:] if v is not None]
        ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [y], [scaled.outputs[0]])
        for value in params:
            drop_if_unused(graph, value)

    def collect(self, graph: ir.Graph) -> list[tuple[Norm, list[Linear]]]:
        groups = []
        for norm in find_norms(graph):
            if not norm.has_affine:
                continue
            readers = linear_readers(norm.output)
            if isinstance(readers, str):
                self.notes.append(f"{norm.kind} norm on '{norm.x.name}' kept its affine: {readers}")
                continue
            groups.append((norm, readers))
        return groups

    def fold(self, graph: ir.Graph, norm: Norm, readers: list[Linear]) -> None:
        gamma = norm.gamma.astype(np.float64)
        for lin in readers:
            w = lin.weight.astype(np.float64)
            if norm.beta is not None and np.any(norm.beta != 0):
                b = norm.beta.astype(np.float64) @ w + (lin.bias if lin.bias is not None else 0.0)
                set_bias(graph, lin, b, "normfold")
            set_weight(graph, lin, gamma[:, None] * w, "normfold")
            self.stamp(lin.matmul, [lin.matmul, norm.affine])
        if norm.kind == "rms":
            affine = norm.affine
            for user, index in list(norm.output.uses()):
                user.replace_input_with(index, norm.core)
            gamma_value = next(v for v in affine.inputs if v is not norm.core)
            graph.remove(affine, safe=True)
            drop_if_unused(graph, gamma_value)
            return
        node = norm.affine
        for index, fill in ((1, 1.0), (2, 0.0)):
            if index >= len(node.inputs) or node.inputs[index] is None:
                continue
            old = node.inputs[index]
            node.replace_input_with(index, add_initializer(graph, f"{old.name}_normfold", np.full(old.shape.numpy(), fill, norm.gamma.dtype)))
            drop_if_unused(graph, old)
        self.stamp(node, [node])
