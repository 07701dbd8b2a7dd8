"""Quantization algorithms as pure array functions: formats and granularities, GPTQ, AWQ.

Passes in ``bitfold.passes.quant`` collect statistics, call these solvers, and fold the results into the graph.
"""
