"""ternarize: BitNet b1.58 absmean ternary weights, ``MatMul(A, W)`` → ``bitfold.TernaryMatMul``.

W ≈ γ · clip(round(W / γ), −1, 1) with γ = mean|W| per tensor (BitNet) or per output (``per_channel``)
(``bitfold.quant.binary.ternarize``); ``gptq = true`` rounds column by column with error compensation (needs
calibration). Post-training ternary weights lose much accuracy; BitNet trains with them.
Guarantees: the op computes exactly the solver's weights (tested against the fake format).
Leaves alone: see ``bitfold.passes.multless.base``. Cost: 2 bits per weight plus 32 per output.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bitfold.ops import ternary as op
from bitfold.passes.multless.base import Encoded, MultlessConfig, MultlessPass
from bitfold.passes.registry import register
from bitfold.quant.binary import ternarize


@dataclasses.dataclass(frozen=True)
class TernarizeConfig(MultlessConfig):
    per_channel: bool = dataclasses.field(default=False, metadata={"doc": "one γ per output instead of per tensor"})


@register
class Ternarize(MultlessPass):
    """MatMul weights to {−γ, 0, +γ} with BitNet b1.58 absmean scaling (bitfold.TernaryMatMul)."""

    name = "ternarize"
    Config = TernarizeConfig
    op = op

    def solve(self, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        trits, gamma = ternarize(wt, hessian, per_channel=self.config.per_channel, **self.loop)
        packed, g = op.pack(trits.T.astype(np.int64), gamma)
        return Encoded(trits * g.astype(np.float64)[:, None], {"ternary": packed, "gamma": g})
