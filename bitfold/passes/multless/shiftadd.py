"""shiftadd: ShiftAddLLM binary coding, ``MatMul(A, W)`` → ``bitfold.BCQMatMul``.

W ≈ Σ_{i<q} α_i ⊙ B_i with q sign planes and one α per plane, output and group of ``group_size`` inputs, α
rounded to sums of ``alpha_terms`` powers of two (``bitfold.quant.bcq``: alternating least squares per group,
each column's error weighted by its input energy diag H, then every column rounded inside the GPTQ loop; with
``act_order`` (default) columns go by decreasing diag H and α is fitted on the unquantized group first, without
it each group is fitted on its error-updated columns). The op executes as table lookups and adds
(``bitfold.ops.bcq``). Needs calibration (GPTQ rounding) unless ``gptq = false``.
Guarantees: the op computes A · W for exactly the solver's signs and α (tested against the fake format); the
weight error falls as q grows. Leaves alone: see ``bitfold.passes.multless.base``.
Cost: q bits per weight plus 16 · q / group_size.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bitfold.ops import bcq as op
from bitfold.passes.multless.base import Encoded, MultlessConfig, MultlessPass
from bitfold.passes.registry import register
from bitfold.quant.bcq import bcq


@dataclasses.dataclass(frozen=True)
class ShiftAddConfig(MultlessConfig):
    gptq: bool = dataclasses.field(default=True, metadata={"doc": "fit and round inside the GPTQ column loop (needs calibration)"})
    q: int = dataclasses.field(default=3, metadata={"doc": "binary planes: 2, 3 or 4"})
    group_size: int = dataclasses.field(default=128, metadata={"doc": "inputs sharing one α, a multiple of 8; -1: one per output"})
    alpha_terms: int = dataclasses.field(default=2, metadata={"doc": "powers of two summed per α (0: keep float16)"})
    iters: int = dataclasses.field(default=10, metadata={"doc": "alternating least-squares rounds per group"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.q not in (2, 3, 4):
            raise ValueError("q must be 2, 3 or 4")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError("group_size must be a positive multiple of 8 (or -1 for one group per output)")
        if not 0 <= self.alpha_terms <= 4:
            raise ValueError("alpha_terms must be 0 (float16) to 4")


@register
class ShiftAdd(MultlessPass):
    """MatMul weights to binary codes with power-of-two scales, run by lookup tables (bitfold.BCQMatMul)."""

    name = "shiftadd"
    Config = ShiftAddConfig
    op = op

    def solve(self, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        k = wt.shape[1]
        group = self.config.group_size if self.config.group_size > 0 else -(-k // 8) * 8
        signs, alpha = bcq(wt, hessian, self.config.q, group, iters=self.config.iters, alpha_terms=self.config.alpha_terms,
                           **self.loop)  # fmt: skip
        packed, a = op.pack(signs.transpose(0, 2, 1), alpha.transpose(0, 2, 1))
        dense = op.unpack(packed, a, k, group).T
        return Encoded(dense.astype(np.float64), {"bcq": packed, "alpha": a}, {"group_size": group})
