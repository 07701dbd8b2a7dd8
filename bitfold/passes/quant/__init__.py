"""Quantization passes: weight-only (RTN, GPTQ, AWQ) emitted as QDQ, MatMulNBits or fake-quant; int8 QDQ
activations (W8A8); simulated per-token activations (A8/A4); float16 casts."""

from bitfold.passes.quant.cast_precision import CastPrecision
from bitfold.passes.quant.quantize_activations import QuantizeActivations
from bitfold.passes.quant.quantize_tokens import QuantizeTokens
from bitfold.passes.quant.quantize_weights import QuantizeWeights

__all__ = ["CastPrecision", "QuantizeActivations", "QuantizeTokens", "QuantizeWeights"]
