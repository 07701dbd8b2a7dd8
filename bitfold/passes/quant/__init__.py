"""Quantization passes: weight-only (RTN, GPTQ) and their emission as QDQ, MatMulNBits or fake-quant."""

from bitfold.passes.quant.quantize_weights import QuantizeWeights

__all__ = ["QuantizeWeights"]
