"""rotate: QuaRot-style orthogonal rotation of the residual stream, folded into the weights, plus online Hadamards.

With Q = diag(±1) · kron(B, H_p/√p) (hidden = m·p, p a power of two, B a random orthogonal m×m block; seeded),
the residual stream x becomes xQ everywhere:

    embedding table  E ← E Q           writers (residual Add operands)   W ← W Q,  b ← b Q
    readers (linears after a norm)     W ← Qᵀ W

and a plain RMSNorm commutes with Q (‖xQ‖ = ‖x‖), so the model is unchanged while the activations every reader
sees are spread over all channels: outliers shrink, which is what activation quantization needs. With ``online =
true`` each writer's input x also gets an explicit ``bitfold.Hadamard`` (x ← x R, W ← Rᵀ W, R = kron(B', H/√p)):
the MLP down projection's input is the worst-conditioned activation of a transformer, and no producer can absorb
R there. The op carries its ONNX function, so any runtime executes the model.

Guarantees: exact equivalence up to fp32 rounding. Needs: a residual stream as ``structure.residual_stream``
finds it, with affine-free RMSNorms (run ``fold-norm-affine`` first). Leaves alone, with a note: graphs whose stream
has another reader, LayerNorm streams (``fold-norm-affine`` with ``center = true`` turns them into RMSNorm
streams), and graphs already rotated.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bitfold.ops import hadamard
from bitfold.passes.initializers import add_initializer, copy_type, drop_if_unused
from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.structure import Stream, const, residual_stream
from bitfold.passes.transforms.weights import set_bias, set_weight

ROTATED_KEY = "bitfold.rotated"


@dataclasses.dataclass(frozen=True)
class RotateConfig:
    seed: int = dataclasses.field(default=0, metadata={"doc": "seed of the random signs and orthogonal blocks"})
    online: bool = dataclasses.field(default=True, metadata={"doc": "also insert bitfold.Hadamard before every residual writer"})


@register
class Rotate(BitfoldPass):
    """Rotate the residual stream by a seeded randomized Hadamard matrix; optional online Hadamards."""

    name = "rotate"
    family = "transforms"
    Config = RotateConfig

    def rewrite(self, model: ir.Model) -> int:
        stream = self.collect(model.graph)
        if stream is None:
            return 0
        rng = np.random.default_rng(self.config.seed)
        q = self.solve(stream.hidden, rng)
        self.fold(model, stream, q, rng)
        return 1 + len(stream.readers) + len(stream.writers)

    def collect(self, graph: ir.Graph) -> Stream | None:
        if graph.metadata_props.get(ROTATED_KEY):
            self.notes.append("the residual stream is already rotated")
            return None
        stream = residual_stream(graph)
        if isinstance(stream, str):
            self.notes.append(f"no rotation: {stream}")
            return None
        for norm in stream.norms:
            if norm.kind != "rms":
                self.notes.append(f"no rotation: LayerNorm on '{norm.x.name}' needs mean-centring (fold-norm-affine center = true)")
                return None
            if norm.has_affine:
                self.notes.append(f"no rotation: the norm on '{norm.x.name}' has an affine γ; run fold-norm-affine first")
                return None
        return stream

    @staticmethod
    def solve(n: int, rng: np.random.Generator) -> np.ndarray:
        """The orthogonal n×n matrix diag(±1) · kron(B, H_p/√p), B a random orthogonal block."""
        m, p = hadamard.split(n)
        return hadamard.matrix(hadamard.random_block(m, rng), p) * rng.choice([-1.0, 1.0], size=n)[:, None]

    def fold(self, model: ir.Model, stream: Stream, q: np.ndarray, rng: np.random.Generator) -> None:
        graph = model.graph
        table = const(stream.table).astype(np.float64)
        # readers first: a tied head's weight is Transpose(table) and must be read before the table rotates
        for lin in stream.readers:
            set_weight(graph, lin, q.T @ lin.weight.astype(np.float64), "rot")
            self.stamp(lin.matmul, [lin.matmul])
        rotated = add_initializer(graph, f"{stream.table.name}_rot", (table @ q).astype(const(stream.table).dtype))
        stream.embedding.replace_input_with(0, rotated)
        drop_if_unused(graph, stream.table)
        self.stamp(stream.embedding, [stream.embedding])
        blocks: dict[int, tuple[np.ndarray, ir.Value]] = {}  # input size → (dense R, the op's block initializer)
        for lin in stream.writers:
            w = lin.weight.astype(np.float64)
            if self.config.online:
                k = w.shape[0]
                if k not in blocks:
                    m, p = hadamard.split(k)
                    block = hadamard.random_block(m, rng)
                    blocks[k] = (hadamard.matrix(block, p), add_initializer(graph, f"hadamard_block_{k}", block.astype(np.float32)))
                r, block_value = blocks[k]
                w = r.T @ w
                self._online(graph, lin.matmul, block_value)
            set_weight(graph, lin, w @ q, "rot")
            if lin.bias is not None:
                set_bias(graph, lin, lin.bias.astype(np.float64) @ q, "rot")
            self.stamp(lin.matmul, [lin.matmul])
        if blocks:
            hadamard.ensure_function(model)
        graph.metadata_props[ROTATED_KEY] = f"seed={self.config.seed}"

    def _online(self, graph: ir.Graph, matmul: ir.Node, block: ir.Value) -> None:
        x = matmul.inputs[0]
        node = hadamard.make_node(x, block, f"{matmul.name}_hadamard")
        out = node.outputs[0]
        out.name = f"{x.name}_hadamard"
        copy_type(out, x)
        self.stamp(node, [matmul])
        graph.insert_before(matmul, node)
        matmul.replace_input_with(0, out)
