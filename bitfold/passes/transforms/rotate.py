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

With ``learn_steps > 0`` the rotations are then learned (SpinQuant's R1, layer by layer, and each online block):
starting from Q, R = Q · exp(S − Sᵀ) minimises, on calibration rows X_l of every norm output l and its readers'
weights W_l,

    L(R) = Σ_l ‖ (Q_a(X_l R) − X_l R) Rᵀ W_l ‖² / ‖X_l W_l‖²

with Q_a the per-token fake quantization of ``quantize-tokens`` (``learn_bits``, ``learn_symmetric``, clip 1)
through straight-through rounding, by Adam on S (torch, seeded; the best iterate is kept, so L never ends above
Q's). Each writer's online R = kron(B, H_p/√p) gets its own block B · exp(S_w − S_wᵀ) by the same loss on its input
rows; ``online_block`` enlarges B (the smallest size ≥ it whose n / size is a power of two) so that it has
something to learn. The exponential keeps every matrix exactly orthogonal, so the fold stays an equivalence. The
summed losses before and after are recorded in the graph metadata ``bitfold.rotated``.

Guarantees: exact equivalence up to fp32 rounding. Needs: a residual stream as ``structure.residual_stream``
finds it, with affine-free RMSNorms (run ``fold-norm-affine`` first). Refuses (PassPreconditionError) a model with
no embedding Gather to start a stream from, and online Hadamards on a float16/bfloat16 stream (the op's ONNX
function is typed float32). Leaves alone, with a note: streams ``residual_stream`` does not support
(another reader, a writer's or a norm's value that is also a graph output), LayerNorm streams (``fold-norm-affine``
with ``center = true`` turns them into RMSNorm streams), and graphs already rotated.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch

from bitfold.errors import PassPreconditionError
from bitfold.ops import hadamard
from bitfold.passes.initializers import add_initializer, copy_type, drop_if_unused
from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.affine import minimise, ste_fake_quant
from bitfold.passes.transforms.structure import Stream, const, find_embedding, residual_stream
from bitfold.passes.transforms.weights import float_dtype, set_bias, set_weight

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
    online_block: int = dataclasses.field(default=0, metadata={"doc": "online Hadamards' dense block: the smallest size >= this with n / size a power of two"})

    def __post_init__(self) -> None:
        if self.learn_steps < 0 or self.learn_rows < 1 or self.learn_lr <= 0 or self.online_block < 0:
            raise ValueError("learn_steps and online_block must be >= 0, learn_rows >= 1 and learn_lr > 0")
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
        if self.config.online:
            for lin in stream.writers:
                dtype = float_dtype(lin.matmul.inputs[0])
                if dtype != np.float32:
                    raise PassPreconditionError(
                        f"pass 'rotate' with online = true inserts a bitfold Hadamard op before node '{lin.matmul.name}', "
                        f"whose input is {dtype.name}, and works on float32 graphs: run it before cast-precision, or on "
                        f"the float32 model (or set online = false)."
                    )
        rng = np.random.default_rng(self.config.seed)
        q = self.solve(stream.hidden, rng)
        blocks = self.online_blocks(stream, rng) if self.config.online else {}
        learned = ""
        if self.config.learn_steps:
            q, blocks, before, after = self.learn(model, stream, q, blocks)
            learned = f" learned {before:.4g} -> {after:.4g}"
        self.fold(model, stream, q, blocks)
        model.graph.metadata_props[ROTATED_KEY] = f"seed={self.config.seed}{learned}"
        return 1 + len(stream.readers) + len(stream.writers)

    def collect(self, graph: ir.Graph) -> Stream | None:
        if graph.metadata_props.get(ROTATED_KEY):
            self.notes.append("the residual stream is already rotated")
            return None
        embedding = find_embedding(graph)
        if isinstance(embedding, str):
            raise PassPreconditionError(f"pass 'rotate' needs a transformer residual stream, and this model has none: {embedding}.")
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

    def online_blocks(self, stream: Stream, rng: np.random.Generator) -> dict[int, np.ndarray]:
        """Each writer's dense block B of its online R = kron(B, H_p/√p) (by node id): one random block per input
        size, of the smallest size m ≥ ``online_block`` whose n / m is a power of two."""
        by_size: dict[int, np.ndarray] = {}
        blocks = {}
        for lin in stream.writers:
            k = lin.weight.shape[0]
            if k not in by_size:
                m, p = hadamard.split(k)
                while m < self.config.online_block and p > 1:
                    m, p = 2 * m, p // 2
                by_size[k] = hadamard.random_block(m, rng)
            blocks[id(lin.matmul)] = by_size[k]
        return blocks

    def learn(
        self, model: ir.Model, stream: Stream, q: np.ndarray, blocks: dict[int, np.ndarray]
    ) -> tuple[np.ndarray, dict[int, np.ndarray], float, float]:
        """(R, the writers' blocks, loss before, loss after): the stream rotation and each online block refined on
        calibration rows of every norm output and writer input (see the module doc)."""
        groups: dict[str, list[np.ndarray]] = {}
        for lin in stream.readers:
            groups.setdefault(lin.matmul.inputs[0].name, []).append(lin.weight)
        writers = [lin for lin in stream.writers if id(lin.matmul) in blocks]
        names = list(groups) + [lin.matmul.inputs[0].name for lin in writers]
        stats = self.calibration.collect(model, names, rows=names, rows_kept=self.config.learn_rows)
        c = self.config
        settings = (c.learn_bits, c.learn_symmetric, c.learn_steps, c.learn_lr, c.seed)
        rows = [stats[name].sample for name in groups]
        weights = [np.concatenate(ws, axis=1) for ws in groups.values()]
        q, before, after = learn_rotation(rows, weights, q, 1, True, *settings, desc="rotate: learn the stream")
        by_size: dict[int, list] = {}
        for lin in writers:
            by_size.setdefault(lin.weight.shape[0], []).append(lin)
        learned = dict(blocks)
        for k, same in by_size.items():
            block = blocks[id(same[0].matmul)]
            p = k // block.shape[0]
            rows = [stats[lin.matmul.inputs[0].name].sample for lin in same]
            _, b, a, factors = learn_rotation(rows, [lin.weight for lin in same], hadamard.matrix(block, p), p, False, *settings,
                                              desc=f"rotate: learn {len(same)} online blocks of {k}", factors=True)  # fmt: skip
            for lin, factor in zip(same, factors, strict=True):
                learned[id(lin.matmul)] = block @ factor
            before, after = before + b, after + a
        return q, learned, before, after

    def fold(self, model: ir.Model, stream: Stream, q: np.ndarray, blocks: dict[int, np.ndarray]) -> None:
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
        values: dict[int, ir.Value] = {}  # one initializer per distinct block array
        for lin in stream.writers:
            w = lin.weight.astype(np.float64)
            if id(lin.matmul) in blocks:
                block = blocks[id(lin.matmul)]
                if id(block) not in values:
                    values[id(block)] = add_initializer(graph, f"hadamard_block_{w.shape[0]}", block.astype(float_dtype(lin.matmul.inputs[0])))
                w = hadamard.matrix(block, w.shape[0] // block.shape[0]).T @ w
                self._online(graph, lin.matmul, values[id(block)])
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
        return ste_fake_quant(y, bits, -1)
    levels = 2**bits - 1
    low = y.amin(dim=-1, keepdim=True)
    scale = ((y.amax(dim=-1, keepdim=True) - low) / levels).clamp_min(1e-12)
    zero = torch.round(-low / scale).detach()
    q = y / scale + zero
    return (q + (torch.clamp(torch.round(q), 0, levels) - q).detach() - zero) * scale


def learn_rotation(
    rows: list[np.ndarray],
    weights: list[np.ndarray],
    q: np.ndarray,
    p: int,
    shared: bool,
    bits: int,
    symmetric: bool,
    steps: int,
    lr: float,
    seed: int,
    desc: str = "",
    factors: bool = False,
):
    """Learn R_l = Q · kron(E_l, I_p), E_l = exp(S_l − S_lᵀ) ((n/p)×(n/p); one E for all l when ``shared``),
    minimising Σ_l ‖(Q_a(X_l R_l) − X_l R_l) R_lᵀ W_l‖² / ‖X_l W_l‖² over the rows ``X_l`` ([rows, n]) each read
    by the linears ``W_l`` ([n, N_l], concatenated). Returns (R, loss at Q, best loss) for ``shared``, and the E_l
    as a fourth item with ``factors`` (with Q = kron(B, H_p/√p), R_l = kron(B E_l, H_p/√p))."""
    torch.manual_seed(seed)
    count = min(len(x) for x in rows)
    n = q.shape[0]
    m = n // p
    q64 = np.asarray(q, np.float64)
    z = torch.tensor(np.stack([np.asarray(x[:count], np.float64) @ q64 for x in rows]))  # X Q: [L, rows, n]
    # ‖e Rᵀ W‖² = ‖(e Kᵀ)(Qᵀ F)‖² for any F with F Fᵀ = W Wᵀ: the thinner of W and Wᵀ's triangular factor
    thin = [q64.T @ _thin_factor(np.asarray(w, np.float64)) for w in weights]
    width = max(t.shape[1] for t in thin)
    f = torch.tensor(np.stack([np.pad(t, ((0, 0), (0, width - t.shape[1]))) for t in thin]))  # [L, n, r], zero-padded
    scale = 1.0 / (z @ f).square().sum(dim=(1, 2)).clamp_min(1e-30)
    z, f, scale = z.float().reshape(len(rows), count, m, p), f.float(), scale.float()

    def expand(generator: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_exp(generator - generator.transpose(-1, -2)).expand(len(rows), m, m)

    def loss(generator: torch.Tensor) -> torch.Tensor:
        e = expand(generator)
        y = torch.einsum("lrap,lab->lrbp", z, e)  # X R = (X Q) kron(E, I_p)
        err = token_fake_quant(y.reshape(len(rows), count, n), bits, symmetric).reshape(y.shape) - y
        back = torch.einsum("lrbp,lab->lrap", err, e).reshape(len(rows), count, n)  # err kron(E, I_p)ᵀ
        return ((back @ f).square().sum(dim=(1, 2)) * scale).sum()

    start = torch.zeros((1 if shared else len(rows), m, m))
    with torch.no_grad():
        start_loss = float(loss(start))
    best, best_loss = minimise(loss, start, start_loss, steps, lr, desc=desc)
    e = expand(best.double()).numpy()
    r = q64 @ np.kron(e[0], np.eye(p))
    return (r, start_loss, best_loss, list(e)) if factors else (r, start_loss, best_loss)


def _thin_factor(w: np.ndarray) -> np.ndarray:
    """F with F Fᵀ = W Wᵀ and min(K, N) columns."""
    if w.shape[1] <= w.shape[0]:
        return w
    return np.linalg.qr(w.T, mode="r").T
