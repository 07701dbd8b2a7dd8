"""Multiplication-less MatMuls: power-of-two shifts, ShiftAddLLM binary coding with lookup tables, binary
(XNOR/BiViT, residual, PB-LLM) and ternary (BitNet b1.58) weights, each emitted as a bitfold op."""

from bitfold.passes.multless.binarize import Binarize
from bitfold.passes.multless.shift import Shift
from bitfold.passes.multless.shiftadd import ShiftAdd
from bitfold.passes.multless.ternarize import Ternarize

__all__ = ["Binarize", "Shift", "ShiftAdd", "Ternarize"]
