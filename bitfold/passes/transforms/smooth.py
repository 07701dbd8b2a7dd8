"""smooth: SmoothQuant migration of activation outliers into the weights, folded into the producer.

For linears W_j ([K, N_j]) that read one activation X ([..., K]), per input channel k

    s_k = max|X_k|^α / max_j,n |W_j[k, n]|^(1-α),     X ← X / s,  W_j ← diag(s) W_j

so X·W_j is unchanged while X's per-channel ranges flatten (α = 0.5 splits the difficulty evenly; larger α moves
more into the weights). With ``shift = true`` (Outlier Suppression+), each channel is first centred on
z_k = (max X_k + min X_k) / 2: X ← (X − z) / s, with s from the centred ranges max|X_k − z_k|, and z · W_j moves
into each reader's bias (an ``Add`` after the MatMul when it has none); the −z / s is one per-channel ``Add`` in
front of the readers. Outlier channels of LLM activations are mostly one-signed, so centring halves their range;
but per-tensor asymmetric 8-bit already places its zero point for one dominant one-signed channel, and the
centred range gets less migration, so a group is centred only where that lowers ``output_error`` on sampled
calibration rows (SmolLM2: centring every group cost 35.6 → 91.5 perplexity through one late down projection). 1/s is absorbed by X's producer where it can be (``passes.scale_fold``: an RMSNorm γ, a
LayerNorm's γ and β, the up projection of a gated MLP); after a plain (affine-free) RMSNorm, as ``fold-norm-affine``
or ``rotate`` leave them, it becomes that norm's γ again. Guarantees: exact equivalence up to fp32 rounding.
``search = true`` picks α per group of linears from an 11-point grid by the quantized output error on sampled
calibration rows (8-bit per-tensor activations, ``weight_bits`` per-channel weights: the W8A8 of
``quantize-activations``); the chosen α is recorded on each MatMul (``bitfold.smoothed``). Needs: calibration
(per-channel max |X|; rows when searching) and each X's width, read from its shape: where an exporter left shapes
out, they are inferred first (``structure.infer_shapes``, which only adds annotations). Leaves alone, with a note
naming the reason (``structure.unabsorbed_reason``): activations no producer can absorb 1/s for (attention outputs
before o_proj; in a post-norm encoder every norm output, which the residual reads too) unless ``explicit = true``,
which inserts the per-channel ``Mul`` (one elementwise op per token), and groups already smoothed (a rerun is a
no-op).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.structure import Linear, infer_shapes, shared_inputs, unabsorbed_reason, width
from bitfold.passes.transforms.weights import absorber, insert_scale, set_bias, set_weight

SMOOTHED_KEY = "bitfold.smoothed"


@dataclasses.dataclass(frozen=True)
class SmoothConfig:
    alpha: float = dataclasses.field(default=0.5, metadata={"doc": "migration strength in [0, 1]"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on the reading MatMul's name or torch module scope"})
    explicit: bool = dataclasses.field(default=False, metadata={"doc": "where no producer absorbs 1/s, insert a per-channel Mul"})
    search: bool = dataclasses.field(default=False, metadata={"doc": "pick α per layer group on calibration rows (ignores alpha)"})
    shift: bool = dataclasses.field(default=False, metadata={"doc": "OS+: centre each channel first, the shift moving into the readers' biases"})
    weight_bits: int = dataclasses.field(default=8, metadata={"doc": "search: per-channel weight bits of the target quantization"})
    rows: int = dataclasses.field(default=512, metadata={"doc": "search: calibration rows per input"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if not 2 <= self.weight_bits <= 8 or self.rows < 1:
            raise ValueError("weight_bits must be in [2, 8] and rows >= 1")


@register
class Smooth(BitfoldPass):
    """SmoothQuant per-channel scales on linear inputs, folded into their producers."""

    name = "smooth"
    family = "transforms"
    Config = SmoothConfig
    needs_calibration = True

    def rewrite(self, model: ir.Model) -> int:
        if any(width(x) is None for x, _ in shared_inputs(model.graph, self.config.exclude)):
            infer_shapes(model)  # the absorbers match their per-channel constants to X's width
        groups = self.collect(model.graph)
        if not groups:
            return 0
        names = [x.name for x, _, _ in groups]
        sampled = self.config.search or self.config.shift
        stats = self.calibration.collect(model, names, rows=names if sampled else (), rows_kept=self.config.rows)
        count = 0
        for x, readers, explicit in groups:
            # an earlier group may have put a bias Add after x's producer: fold 1/s where the readers read now
            current = readers[0].matmul.inputs[0]
            absorb = absorber(model.graph, current, readers, explicit=explicit)
            if absorb is None:
                self.notes.append(f"'{x.name}' kept: {unabsorbed_reason(current)} once an earlier group's bias is in place")
                continue
            weights = [lin.weight for lin in readers]
            center, alpha, s = self.plan(stats[x.name], weights)
            absorb(s)
            count += 1
            if center.any():
                insert_scale(model.graph, readers[0].matmul.inputs[0], -center / s, "shift", op_type="Add")
                for lin in readers:
                    moved = center @ lin.weight.astype(np.float64)
                    set_bias(model.graph, lin, moved if lin.bias is None else lin.bias + moved, "shift")
            for lin in readers:
                set_weight(model.graph, lin, s[:, None].astype(np.float64) * lin.weight, "smooth")
                lin.matmul.metadata_props[SMOOTHED_KEY] = f"alpha={alpha:.2f}" + (",shift" if center.any() else "")
                self.stamp(lin.matmul, [lin.matmul])
        return count

    def collect(self, graph: ir.Graph) -> list[tuple[ir.Value, list[Linear], bool]]:
        """Each group to smooth: its activation, its linears and whether 1/s needs an explicit ``Mul``."""
        groups = []
        for x, readers in shared_inputs(graph, self.config.exclude):
            if any(SMOOTHED_KEY in lin.matmul.metadata_props for lin in readers):
                continue
            explicit = absorber(graph, x, readers) is None
            if explicit and not self.config.explicit:
                self.notes.append(f"'{x.name}' kept: {unabsorbed_reason(x)}; explicit = true inserts a per-channel Mul")
                continue
            if explicit:
                self.notes.append(f"'{x.name}' gets an explicit per-channel Mul: {unabsorbed_reason(x)}")
            groups.append((x, readers, explicit))
        return groups

    def plan(self, st, weights: list[np.ndarray]) -> tuple[np.ndarray, float, np.ndarray]:
        """(centre, α, s) for one group: without a shift, and with ``shift`` also centred, keeping the centring
        only where it lowers the quantized output error on the sampled rows."""
        c = self.config
        options = [np.zeros(st.absmax.shape)]
        if c.shift:
            options.append((st.channel_max.astype(np.float64) + st.channel_min) / 2)
        plans = []
        for center in options:
            spread = st.channel_max - center if center.any() else st.absmax
            alpha = search_alpha(st.sample, spread, weights, c.weight_bits, center=center) if c.search else c.alpha
            s = self.solve(spread, weights, alpha)
            error = output_error(st.sample, center, s, weights, c.weight_bits) if len(options) > 1 else 0.0
            plans.append((error, center, alpha, s))
        _, center, alpha, s = min(plans, key=lambda plan: plan[0])
        return center, alpha, s

    @staticmethod
    def solve(x_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
        """s_k = max|X_k|^α / max|W[k, :]|^(1-α) over all readers; 1 where either side is zero."""
        w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
        a = np.asarray(x_absmax, np.float64)
        ok = (a > 0) & (w_absmax > 0)
        s = np.ones_like(a)
        s[ok] = a[ok] ** alpha / w_absmax[ok] ** (1.0 - alpha)
        return s


def search_alpha(rows: np.ndarray, x_absmax: np.ndarray, weights: list[np.ndarray], weight_bits: int, grid: int = 10, center=None) -> float:
    """The α on a grid in [0, 1] minimising ``output_error`` (rows centred on ``center`` when given). α = 0 (no
    migration) is on the grid."""
    center = np.zeros(rows.shape[-1]) if center is None else center
    errors = [output_error(rows, center, Smooth.solve(x_absmax, weights, float(a)), weights, weight_bits) for a in np.linspace(0.0, 1.0, grid + 1)]
    return float(np.linspace(0.0, 1.0, grid + 1)[int(np.argmin(errors))])


def output_error(rows: np.ndarray, center: np.ndarray, s: np.ndarray, weights: list[np.ndarray], weight_bits: int) -> float:
    """Σ_j ‖Q_a((X − c) / s)·Q_w(diag(s) W_j) − (X − c) W_j‖² / ‖X W_j‖² on sampled rows X.

    Q_a: per-tensor asymmetric 8-bit over the rows' range (``quantize-activations``'s minmax); Q_w: symmetric
    per-output-channel ``weight_bits``.
    """
    x = np.asarray(rows, np.float64).reshape(-1, rows.shape[-1])
    centred = x - center
    xs = centred / s
    lo, hi = min(xs.min(), 0.0), max(xs.max(), 0.0)
    step = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / step)
    xq = (np.clip(np.round(xs / step) + zero, 0, 255) - zero) * step
    qmax = 2 ** (weight_bits - 1) - 1
    err = 0.0
    for w in weights:
        w = w.astype(np.float64)
        ws = s[:, None] * w
        scale = np.maximum(np.abs(ws).max(axis=0, keepdims=True), 1e-12) / qmax
        err += float(np.sum((xq @ (np.clip(np.round(ws / scale), -qmax - 1, qmax) * scale) - centred @ w) ** 2) / max(np.sum((x @ w) ** 2), 1e-30))
    return err
