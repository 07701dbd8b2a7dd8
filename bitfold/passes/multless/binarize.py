"""binarize: sign weights, ``MatMul(A, W)`` → ``bitfold.BinaryMatMul`` (XNOR/BiViT, residual, PB-LLM).

W ≈ μ + Σ_{i<r} α_i ⊙ sign planes per output (``bitfold.quant.binary``): ``planes = 1`` with α = mean|W − μ|
(XNOR-Net/BiViT scaling; ``center`` makes μ the row mean), ``planes = 2`` residual binarization (DB-LLM/BiLLM
style). ``salient_ratio = ρ`` is PB-LLM: the top ρ of the weights by ``salience`` stay int8 (a bit mask plus one
byte each), the rest binarized; pair it with ``gptq = true`` as PB-LLM does. ``binarize_input`` binarizes the
activations too (XNOR-popcount semantics; post-training this destroys accuracy, it is for trained models).
Needs calibration with ``gptq`` or an ``activation``/``hessian`` salience.
Guarantees: the op computes exactly the solver's weights (tested against the fake format).
Leaves alone: see ``bitfold.passes.multless.base``. Cost: r bits per weight (+1 + 8ρ with salient weights) plus
32 · (r + 2) per output.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bitfold.ops import binary as op
from bitfold.passes.multless.base import Encoded, MultlessConfig, MultlessPass
from bitfold.passes.registry import register
from bitfold.quant.binary import Salience, binarize


@dataclasses.dataclass(frozen=True)
class BinarizeConfig(MultlessConfig):
    planes: int = dataclasses.field(default=1, metadata={"doc": "1: binary; 2: residual binary (two sign planes)"})
    center: bool = dataclasses.field(default=False, metadata={"doc": "subtract each output's mean weight before binarizing"})
    salient_ratio: float = dataclasses.field(default=0.0, metadata={"doc": "PB-LLM: fraction of weights kept int8 (0: none)"})
    salience: Salience = dataclasses.field(default="magnitude", metadata={"doc": "magnitude | activation | hessian"})
    binarize_input: bool = dataclasses.field(default=False, metadata={"doc": "binarize activations too (XNOR-popcount)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.planes not in (1, 2):
            raise ValueError("planes must be 1 or 2")
        if not 0.0 <= self.salient_ratio < 0.5:
            raise ValueError("salient_ratio must be in [0, 0.5)")
        if self.salient_ratio and self.planes != 1:
            raise ValueError("salient_ratio combines with planes = 1 (PB-LLM)")
        if self.binarize_input and self.format == "fake":
            raise ValueError("binarize_input changes the activations: it needs format = \"op\"")


@register
class Binarize(MultlessPass):
    """MatMul weights to sign planes with per-output scales, optionally PB-LLM salient int8 (bitfold.BinaryMatMul)."""

    name = "binarize"
    Config = BinarizeConfig
    op = op

    @property
    def uses_hessian(self) -> bool:
        return self.config.gptq or (self.config.salient_ratio > 0 and self.config.salience != "magnitude")

    def solve(self, wt: np.ndarray, hessian: np.ndarray | None) -> Encoded:
        c = self.config
        b = binarize(wt, hessian, planes=c.planes, center=c.center, salient_ratio=c.salient_ratio, salience=c.salience,
                     gptq=c.gptq, **self.loop)  # fmt: skip
        salient = None if b.salient is None else b.salient.T
        codes = None if b.codes is None else b.codes.T
        tensors = op.pack(b.signs.transpose(0, 2, 1), b.alpha, b.mean, salient, codes, b.salient_scale)
        dense = op.unpack(*tensors, wt.shape[1]).T
        names = ("signs", "alpha", "mean", "salient", "salient_codes", "salient_scale")
        return Encoded(dense.astype(np.float64), dict(zip(names, tensors, strict=True)), {"binarize_input": int(c.binarize_input)})
