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

With ``learn_steps > 0`` the stream's rotation is then learned (SpinQuant's R1, layer by layer): starting from
Q, R = Q · exp(S − Sᵀ) minimises, on calibration rows X_l of every norm output l and its readers' weights W_l,

    L(R) = Σ_l ‖ (Q_a(X_l R) − X_l R) Rᵀ W_l ‖² / ‖X_l W_l‖²

with Q_a the per-token fake quantization of ``quantize-tokens`` (``learn_bits``, ``learn_symmetric``, clip 1)
through straight-through rounding, by Adam on S (torch, seeded; the best iterate is kept, so L never ends above
Q's). The exponential keeps R exactly orthogonal, so the fold stays an equivalence. The losses before and after
are recorded in the graph metadata ``bitfold.rotated``. The online Hadamards stay fixed.

Guarantees: exact equivalence up to fp32 rounding. Needs: a residual stream as ``structure.residual_stream``
finds it, with affine-free RMSNorms (run ``fold-norm-affine`` first). Leaves alone, with a note: graphs whose stream
has another reader, LayerNorm streams (``fold-norm-affine`` with ``center = true`` turns them into RMSNorm
streams), and graphs already rotated.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch

from bitfold.ops import hadamard
from bitfold.passes.initializers import add_initializer, copy_type, drop_if_unused
from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.affine import minimise
from bitfold.passes.transforms.structure import Stream, const, residual_stream
from bitfold.passes.transforms.weights import set_bias, set_weight

ROTATED_KEY = "bitfold.rotated"


@dataclasses.dataclass(frozen=True)
class RotateConfig:
    seed: int = dataclasses.field(default=0, metadata={"doc": "seed of the random signs and orthogonal blocks"})
    online: bool = dataclasses.field(default=True, metadata={"doc": "also insert bitfold.Hadamard before every residual writer"})
    learn_steps: int = dataclasses.field(default=0, metadata={"doc": "> 0: learn the stream rotation for per-token activation quantization (Adam steps; needs calibration)"})
    learn_bits: int = dataclasses.field(default=4, metadata={"doc": "per-token activation bits the rotation is learned for"})
    learn_symmetric: bool = dataclasses.field(default=False, metadata={"doc": "learn for symmetric (true) or zero-point (false) per-token quantization"})
    learn_rows: int = dataclasses.field(default=256, metadata={"doc": "calibration rows per norm output"})
    learn_lr: float = dataclasses.field(default=0.003, metadata={"doc": "Adam learning rate on the skew-symmetric generator"})

    def __post_init__(self) -> None:
        if self.learn_steps < 0 or self.learn_rows < 1 or self.learn_lr <= 0:
            raise ValueError("learn_steps must be >= 0, learn_rows >= 1 and learn_lr > 0")
        if not 2 <= self.learn_bits <= 8:
            raise ValueError("learn_bits must be in [2, 8]")


@register
class Rotate(BitfoldPass):
    """Rotate the residual stream by a seeded randomized Hadamard matrix; optional online Hadamards."""

    name = "rotate"
    family = "transforms"
    Config = RotateConfig

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.config.learn_steps > 0

    def rewrite(self, model: ir.Model) -> int:
        stream = self.collect(model.graph)
        if stream is None:
            return 0
        rng = np.random.default_rng(self.config.seed)
        q = self.solve(stream.hidden, rng)
        learned = ""
        if self.config.learn_steps:
            q, before, after = self.learn(model, stream, q)
            learned = f" learned {before:.4g} -> {after:.4g}"
        self.fold(model, stream, q, rng)
        model.graph.metadata_props[ROTATED_KEY] = f"seed={self.config.seed}{learned}"
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

    def learn(self, model: ir.Model, stream: Stream, q: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(R, L(Q), L(R)): the rotation refined on calibration rows of every norm output (see the module doc)."""
        groups: dict[str, list[np.ndarray]] = {}
        for lin in stream.readers:
            groups.setdefault(lin.matmul.inputs[0].name, []).append(lin.weight)
        names = list(groups)
        stats = self.calibration.collect(model, names, rows=names, rows_kept=self.config.learn_rows)
        rows = [stats[name].sample for name in names]
        weights = [np.concatenate(ws, axis=1) for ws in groups.values()]
        c = self.config
        return learn_rotation(rows, weights, q, c.learn_bits, c.learn_symmetric, c.learn_steps, c.learn_lr, c.seed)

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

    def _online(self, graph: ir.Graph, matmul: ir.Node, block: ir.Value) -> None:
        x = matmul.inputs[0]
        node = hadamard.make_node(x, block, f"{matmul.name}_hadamard")
        out = node.outputs[0]
        out.name = f"{x.name}_hadamard"
        copy_type(out, x)
        self.stamp(node, [matmul])
        graph.insert_before(matmul, node)
        matmul.replace_input_with(0, out)


def token_fake_quant(y: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """``quantize-tokens``' per-row rounding (clip 1) with a straight-through gradient: y + s · δ, δ detached."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = y.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / qmax
        q = y / scale
        return (q + (torch.clamp(torch.round(q), -qmax - 1, qmax) - q).detach()) * scale
    levels = 2**bits - 1
    low = y.amin(dim=-1, keepdim=True)
    scale = ((y.amax(dim=-1, keepdim=True) - low) / levels).clamp_min(1e-12)
    zero = torch.round(-low / scale).detach()
    q = y / scale + zero
    return (q + (torch.clamp(torch.round(q), 0, levels) - q).detach() - zero) * scale


def learn_rotation(
    rows: list[np.ndarray], weights: list[np.ndarray], q: np.ndarray, bits: int, symmetric: bool, steps: int, lr: float, seed: int
) -> tuple[np.ndarray, float, float]:
    """(R, L(Q), best L): R = Q · exp(S − Sᵀ) minimising Σ_l ‖(Q_a(X_l R) − X_l R) Rᵀ W_l‖² / ‖X_l W_l‖² over the
    rows ``X_l`` ([rows, K]) each read by the linears ``W_l`` ([K, N_l], concatenated)."""
    torch.manual_seed(seed)
    count = min(len(x) for x in rows)
    xs = torch.tensor(np.stack([np.asarray(x[:count], np.float64) for x in rows]))  # [L, rows, K]
    grams = torch.tensor(np.stack([w.astype(np.float64) @ w.T.astype(np.float64) for w in weights]))  # W Wᵀ: [L, K, K]
    scale = 1.0 / torch.einsum("lrk,lkj,lrj->l", xs, grams, xs).clamp_min(1e-30)  # 1 / ‖X W‖²
    xs, grams, scale = xs.float(), grams.float(), scale.float()
    base = torch.tensor(q, dtype=torch.float32)

    def loss(generator: torch.Tensor) -> torch.Tensor:
        r = base @ torch.linalg.matrix_exp(generator - generator.T)
        y = xs @ r
        e = (token_fake_quant(y, bits, symmetric) - y) @ r.T
        return (torch.einsum("lrk,lkj,lrj->l", e, grams, e) * scale).sum()

    start = torch.zeros_like(base)
    with torch.no_grad():
        start_loss = float(loss(start))
    best, best_loss = minimise(loss, start, start_loss, steps, lr, desc="rotate: learn")
    r = base.double() @ torch.linalg.matrix_exp(best.double() - best.double().T)
    return r.numpy(), start_loss, best_loss
