"""Quantization learned against a block's output: integer and power-of-two weight grids whose clipping and rounding
are trained block by block (reconstruct)."""

from bitfold.passes.learned.reconstruct import Reconstruct

__all__ = ["Reconstruct"]
