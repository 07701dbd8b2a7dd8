"""affine: a per-layer diagonal equivalent transform learned to minimise the quantized layer's output error.

For linears W_j reading one activation X, learn s > 0 (per input channel) minimising, on calibration rows,

    L(s) = Σ_j ‖ Q_a(X / s) · Q_w(diag(s) W_j) - X W_j ‖² / ‖X W_j‖²

with Q_a per-token symmetric ``activation_bits`` (as ``quantize-tokens``) and Q_w per-output-channel symmetric
``weight_bits`` (as ``quantize-weights`` RTN), through straight-through rounding, by Adam on log s (torch autograd,
seeded, ``steps`` steps; the search starts from the better of s = 1 and SmoothQuant's α = 0.5 and keeps the best
iterate, so L never ends above its start). The diagonal AffineQuant/OmniQuant-LET transform. 1/s is absorbed like
``smooth`` (norm γ, LayerNorm, gated-MLP up projection, or a new γ after a plain RMSNorm); where nothing can absorb
it, it stays as an explicit per-channel ``Mul`` and a note says so.

With ``block = b > 0`` a block-diagonal rotation R (b×b orthogonal blocks, b dividing K; the orthogonal half of
FlatQuant/SpinQuant's learned transforms, the diagonal being s) is learned next, on top of s, from R = I:

    L(R) = Σ_j ‖ Q_a(X / s · R) · Q_w(Rᵀ · diag(s) W_j) - X W_j ‖² / ‖X W_j‖²,   R_i = exp(S_i − S_iᵀ)

(the matrix exponential of a skew-symmetric matrix keeps every block exactly orthogonal, so the transform cannot
become ill-conditioned on rows outside the calibration sample; best iterate kept, so L(R) ≤ L(s)). No producer can
absorb a full matrix: R stays as an explicit float32 ``MatMul`` in front of the readers (``bitfold.precision =
"float32"``, so quantizers leave it alone; K·b multiply-adds per row), and a note says so for every group.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import torch
from tqdm.auto import tqdm

from bitfold.passes.initializers import add_initializer, copy_type
from bitfold.passes.registry import ISLAND_KEY, BitfoldPass, register
from bitfold.passes.transforms.smooth import Smooth
from bitfold.passes.transforms.structure import Linear, shared_inputs
from bitfold.passes.transforms.weights import absorber, float_dtype, set_weight

AFFINE_KEY = "bitfold.affine"


@dataclasses.dataclass(frozen=True)
class AffineConfig:
    weight_bits: int = dataclasses.field(default=4, metadata={"doc": "weight bits the transform is learned for"})
    activation_bits: int = dataclasses.field(default=8, metadata={"doc": "per-token activation bits it is learned for"})
    steps: int = dataclasses.field(default=100, metadata={"doc": "Adam steps per layer group"})
    lr: float = dataclasses.field(default=0.02, metadata={"doc": "Adam learning rate on log s"})
    rows: int = dataclasses.field(default=512, metadata={"doc": "calibration rows per activation"})
    seed: int = dataclasses.field(default=0, metadata={"doc": "torch seed"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on the reading MatMul's name or torch module scope"})
    block: int = dataclasses.field(default=0, metadata={"doc": "> 0: also learn a block-diagonal rotation with blocks this size (an explicit MatMul)"})

    def __post_init__(self) -> None:
        if not (2 <= self.weight_bits <= 8 and 2 <= self.activation_bits <= 16):
            raise ValueError("weight_bits must be in [2, 8] and activation_bits in [2, 16]")
        if self.block < 0:
            raise ValueError("block must be >= 0")
        if self.steps < 0 or self.rows < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 0, rows >= 1 and lr > 0")


@register
class Affine(BitfoldPass):
    """Learned per-channel equivalent scaling for quantization, folded where a producer can absorb it."""

    name = "affine"
    family = "transforms"
    Config = AffineConfig
    needs_calibration = True

    def rewrite(self, model: ir.Model) -> int:
        groups = self.collect(model.graph)
        if not groups:
            return 0
        names = [x.name for x, _, _ in groups]
        stats = self.calibration.collect(model, names, rows=names, rows_kept=self.config.rows)
        c = self.config
        for x, readers, absorb in groups:
            weights = [lin.weight for lin in readers]
            start = Smooth.solve(stats[x.name].absmax, weights, 0.5)
            s, before, after = learn_scale(stats[x.name].sample, weights, start, c.weight_bits, c.activation_bits, c.steps, c.lr, c.seed)
            matrix = None
            if c.block:
                scaled = [s[:, None] * w.astype(np.float64) for w in weights]
                matrix, after = learn_rotation(stats[x.name].sample / s, scaled, c.block, c.weight_bits, c.activation_bits, c.steps, c.lr, c.seed)
            if absorb is None:
                self.notes.append(f"'{x.name}' keeps an explicit per-channel Mul: no producer absorbs 1/s")
                absorb = absorber(model.graph, x, readers, explicit=True)
            absorb(s)
            if matrix is not None:
                self.notes.append(f"'{x.name}' gets an explicit float32 MatMul by a learned rotation ({c.block}×{c.block} blocks)")
                insert_matrix(model.graph, readers[0].matmul.inputs[0], matrix)
            for lin in readers:
                w = s[:, None] * lin.weight.astype(np.float64)
                set_weight(model.graph, lin, w if matrix is None else matrix.T @ w, "affine")
                lin.matmul.metadata_props[AFFINE_KEY] = f"loss {before:.4g} -> {after:.4g}"
                self.stamp(lin.matmul, [lin.matmul])
        return len(groups)

    def collect(self, graph: ir.Graph) -> list[tuple[ir.Value, list[Linear], object]]:
        groups = []
        for x, readers in shared_inputs(graph, self.config.exclude):
            if any(AFFINE_KEY in lin.matmul.metadata_props for lin in readers):
                continue
            if self.config.block and x.shape is not None and x.shape[-1] % self.config.block:
                self.notes.append(f"'{x.name}' kept: {x.shape[-1]} channels are not a multiple of block {self.config.block}")
                continue
            groups.append((x, readers, absorber(graph, x, readers)))
        return groups


def insert_matrix(graph: ir.Graph, x: ir.Value, matrix: np.ndarray) -> ir.Node:
    """Insert ``x ← x · matrix`` (a ``MatMul`` in x's type, kept there by cast-precision) in front of every reader of ``x``."""
    readers = list(x.uses())
    weight = add_initializer(graph, f"{x.name}_affine_rotation", matrix.astype(float_dtype(x)))
    node = ir.node("MatMul", [x, weight], name=f"{x.name}_affine_rotation")
    node.metadata_props[ISLAND_KEY] = "float32"
    node.outputs[0].name = f"{x.name}_affine"
    copy_type(node.outputs[0], x)
    if x.producer() is not None:
        graph.insert_after(x.producer(), node)
    else:
        graph.insert_before(readers[0][0], node)
    for user, index in readers:
        user.replace_input_with(index, node.outputs[0])
    return node


def ste_fake_quant(t: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Symmetric max-scaled rounding along ``dim`` with a straight-through gradient."""
    qmax = 2 ** (bits - 1) - 1
    scale = t.abs().amax(dim=dim, keepdim=True).clamp_min(1e-8) / qmax
    q = t / scale
    return (q + (torch.clamp(torch.round(q), -qmax - 1, qmax) - q).detach()) * scale


def learn_scale(
    x: np.ndarray, weights: list[np.ndarray], start: np.ndarray, weight_bits: int, activation_bits: int, steps: int, lr: float, seed: int
) -> tuple[np.ndarray, float, float]:
    """(s, loss at the start, best loss): the per-channel scale minimising the quantized output error L(s)."""
    torch.manual_seed(seed)
    rows = torch.tensor(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
    ws = [torch.tensor(np.asarray(w, np.float32)) for w in weights]
    refs = [rows @ w for w in ws]
    norms = [r.square().sum().clamp_min(1e-12) for r in refs]

    def loss(log_s: torch.Tensor) -> torch.Tensor:
        s = log_s.exp()
        xq = ste_fake_quant(rows / s, activation_bits, -1)
        return sum(((xq @ ste_fake_quant(s[:, None] * w, weight_bits, 0) - r).square().sum() / n for w, r, n in zip(ws, refs, norms, strict=True)))

    with torch.no_grad():
        candidates = [torch.zeros(rows.shape[1]), torch.tensor(np.log(np.maximum(start, 1e-8)), dtype=torch.float32)]
        losses = [float(loss(c)) for c in candidates]
    first = int(np.argmin(losses))
    best, best_loss = minimise(loss, candidates[first], losses[first], steps, lr)
    return best.exp().double().numpy(), losses[0], best_loss


def minimise(loss, start: torch.Tensor, start_loss: float, steps: int, lr: float, desc: str = "") -> tuple[torch.Tensor, float]:
    """Adam on ``loss`` from ``start`` for ``steps`` steps; the best iterate seen (start included) and its loss.
    A progress bar is shown when ``desc`` names the run."""
    parameter = torch.nn.Parameter(start.clone())
    best, best_loss = parameter.detach().clone(), start_loss
    optimizer = torch.optim.Adam([parameter], lr=lr)
    for step in tqdm(range(steps + 1), desc=desc, disable=not desc, leave=False):
        optimizer.zero_grad()
        value = loss(parameter)
        if float(value.detach()) < best_loss:
            best, best_loss = parameter.detach().clone(), float(value.detach())
        if step == steps:  # the last iterate is scored, not stepped from
            break
        value.backward()
        optimizer.step()
    return best, best_loss


def learn_rotation(
    x: np.ndarray, weights: list[np.ndarray], block: int, weight_bits: int, activation_bits: int, steps: int, lr: float, seed: int
) -> tuple[np.ndarray, float]:
    """(R, best loss): the block-diagonal rotation ([K, K], ``block``-sized orthogonal blocks, from I) minimising
    the quantized output error of X · R against Rᵀ · W_j (x and weights already scaled by the diagonal step)."""
    torch.manual_seed(seed)
    rows = torch.tensor(np.asarray(x, np.float32).reshape(-1, x.shape[-1]))
    ws = [torch.tensor(np.asarray(w, np.float32)) for w in weights]
    refs = [rows @ w for w in ws]
    norms = [r.square().sum().clamp_min(1e-12) for r in refs]
    k = rows.shape[1]
    count = k // block
    blocks = rows.reshape(-1, count, block)

    def rotation(generator: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_exp(generator - generator.transpose(1, 2))  # [count, block, block]

    def loss(generator: torch.Tensor) -> torch.Tensor:
        r = rotation(generator)
        xq = ste_fake_quant(torch.einsum("rcb,cbd->rcd", blocks, r).reshape(-1, k), activation_bits, -1)
        total = 0.0
        for w, ref, n in zip(ws, refs, norms, strict=True):
            wr = torch.einsum("cdb,cdn->cbn", r, w.reshape(count, block, -1)).reshape(k, -1)  # Rᵀ W, block by block
            total = total + (xq @ ste_fake_quant(wr, weight_bits, 0) - ref).square().sum() / n
        return total

    start = torch.zeros(count, block, block)
    with torch.no_grad():
        start_loss = float(loss(start))
    best, best_loss = minimise(loss, start, start_loss, steps, lr * 0.1)
    r = rotation(best.double())
    return np.asarray(torch.block_diag(*r).numpy()), best_loss
