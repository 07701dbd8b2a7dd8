"""shift: power-of-two weights, ``MatMul(A, W)`` → ``bitfold.ShiftMatMul`` (DeepShift-PS, DenseShift).

Each weight becomes s_n · (±2^(−e)) with one scale s_n per output and a ``bits``-bit code (sign + exponent),
rounded in the log domain (``bitfold.quant.shift``). ``zero = true`` spends one exponent code on 0 (DeepShift-PS:
small weights vanish); ``zero = false`` is DenseShift: every code a power of two, one more octave of range.
``gptq = true`` rounds column by column with GPTQ error compensation (needs calibration).
Guarantees: the op computes A · (s ⊙ U) for exactly the solver's U and s (tested against the fake format).
Leaves alone: see ``bitfold.passes.multless.base``. Cost: ``bits`` per weight plus 32 per output.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bitfold.ops import shift as op
from bitfold.passes.multless.base import Encoded, MultlessConfig, MultlessPass
from bitfold.passes.registry import register
from bitfold.quant.shift import shift


@dataclasses.dataclass(frozen=True)
class ShiftConfig(MultlessConfig):
    bits: int = dataclasses.field(default=4, metadata={"doc": "code bits: sign + exponent, 3 or 4"})
    zero: bool = dataclasses.field(default=True, metadata={"doc": "one code means 0 (DeepShift-PS); false: DenseShift"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits not in (3, 4):
            raise ValueError("bits must be 3 or 4")


@register
class Shift(MultlessPass):
    """MatMul weights to signed powers of two with a per-output scale (bitfold.ShiftMatMul)."""

    name = "shift"
    Config = ShiftConfig
    op = op

    def solve(self, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        units, scale = shift(wt, hessian, self.config.bits, self.config.zero, **self.loop)
        packed, s = op.pack(units.T, scale, self.config.bits, self.config.zero)
        return Encoded(units * s.astype(np.float64)[:, None], {"shift": packed, "scale": s}, {"zero": int(self.config.zero)})
