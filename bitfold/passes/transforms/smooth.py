"""smooth: SmoothQuant migration of activation outliers into the weights, folded into the producer.

For linears W_j ([K, N_j]) that read one activation X ([..., K]), per input channel k

    s_k = max|X_k|^α / max_j,n |W_j[k, n]|^(1-α),     X ← X / s,  W_j ← diag(s) W_j

so X·W_j is unchanged while X's per-channel ranges flatten (α = 0.5 splits the difficulty evenly; larger α moves
more into the weights). 1/s is absorbed by X's producer where it can be (``quant.scale_fold``: an RMSNorm γ, a
LayerNorm's γ and β, the up projection of a gated MLP); after a plain (affine-free) RMSNorm, as ``fold-norm-affine``
or ``rotate`` leave them, it becomes that norm's γ again. Guarantees: exact equivalence up to fp32 rounding.
Needs: calibration (per-channel max |X|). Leaves alone, with a note: activations no producer can absorb 1/s for
(attention outputs before o_proj; in a post-norm encoder every norm output, which the residual reads too) unless
``explicit = true``, which inserts the per-channel ``Mul`` (one elementwise op per token), and groups already
smoothed (a rerun is a no-op).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bitfold.passes.registry import BitfoldPass, register
from bitfold.passes.transforms.structure import Linear, shared_inputs
from bitfold.passes.transforms.weights import absorber, set_weight

SMOOTHED_KEY = "bitfold.smoothed"


@dataclasses.dataclass(frozen=True)
class SmoothConfig:
    alpha: float = dataclasses.field(default=0.5, metadata={"doc": "migration strength in [0, 1]"})
    exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"doc": "globs on the reading MatMul's name or torch module scope"})
    explicit: bool = dataclasses.field(default=False, metadata={"doc": "where no producer absorbs 1/s, insert a per-channel Mul"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")


@register
class Smooth(BitfoldPass):
    """SmoothQuant per-channel scales on linear inputs, folded into their producers."""

    name = "smooth"
    family = "transforms"
    Config = SmoothConfig
    needs_calibration = True

    def rewrite(self, model: ir.Model) -> int:
        groups = self.collect(model.graph)
        if not groups:
            return 0
        stats = self.calibration.collect(model, [x.name for x, _, _ in groups])
        for x, readers, absorb in groups:
            s = self.solve(stats[x.name].absmax, [lin.weight for lin in readers], self.config.alpha)
            absorb(s)
            for lin in readers:
                set_weight(model.graph, lin, s[:, None].astype(np.float64) * lin.weight, "smooth")
                lin.matmul.metadata_props[SMOOTHED_KEY] = f"alpha={self.config.alpha}"
                self.stamp(lin.matmul, [lin.matmul])
        return len(groups)

    def collect(self, graph: ir.Graph) -> list[tuple[ir.Value, list[Linear], object]]:
        groups = []
        for x, readers in shared_inputs(graph, self.config.exclude):
            if any(SMOOTHED_KEY in lin.matmul.metadata_props for lin in readers):
                continue
            absorb = absorber(graph, x, readers)
            if absorb is None and self.config.explicit:
                self.notes.append(f"'{x.name}' gets an explicit per-channel Mul: no producer absorbs 1/s")
                absorb = absorber(graph, x, readers, explicit=True)
            if absorb is None:
                producer = x.producer()
                self.notes.append(f"'{x.name}' (from {producer.op_type if producer else 'a graph input'}) kept: no producer absorbs 1/s")
                continue
            groups.append((x, readers, absorb))
        return groups

    @staticmethod
    def solve(x_absmax: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
        """s_k = max|X_k|^α / max|W[k, :]|^(1-α) over all readers; 1 where either side is zero."""
        w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
        a = np.asarray(x_absmax, np.float64)
        ok = (a > 0) & (w_absmax > 0)
        s = np.ones_like(a)
        s[ok] = a[ok] ** alpha / w_absmax[ok] ** (1.0 - alpha)
        return s
