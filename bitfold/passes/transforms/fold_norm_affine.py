"""fold-norm-affine: fold LayerNorm/RMSNorm γ (and β) into the linear layers that read the norm.

For a norm whose output only linears read (``structure.linear_readers``), y = n ⊙ γ + β feeds x·W_j + b_j, so

    W_j ← diag(γ) W_j,    b_j ← β W_j + b_j    (β W_j with the original W_j)

and the norm keeps only its normalization: an RMSNorm loses its γ ``Mul`` (readers take x/rms(x)), a
``LayerNormalization`` gets γ = 1 and β = 0. A bias ``Add`` is inserted where β is non-zero and a reader has none.
A tied weight (``Transpose`` of the embedding table) gets a private copy. Guarantees: exact equivalence up to fp32
rounding. Needs: nothing. Leaves alone, with a note: norms read by anything other than linears (a post-norm
residual, a graph output). Afterwards the norms are affine-free, which ``rotate`` requires.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bitfold.passes.initializers import add_initializer, drop_if_unused
from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.structure import Linear, Norm, find_norms, linear_readers
from bitfold.passes.transforms.weights import set_bias, set_weight


@register
class FoldNormAffine(BitfoldPass):
    """Fold norm γ/β into the linears that read the norm."""

    name = "fold-norm-affine"
    family = "transforms"

    def rewrite(self, model: ir.Model) -> int:
        groups = self.collect(model.graph)
        for norm, readers in groups:
            self.fold(model.graph, norm, readers)
        return len(groups)

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
