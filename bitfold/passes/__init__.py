"""bitfold passes: plain onnx-ir passes with registered names and typed configs.

Importing this package registers every pass. Each one also works outside bitfold's pipeline::

    import onnx_ir as ir
    from bitfold.passes.canonical import FoldBatchNorm, RemoveDead

    ir.passes.PassManager([FoldBatchNorm(), RemoveDead()])(model)
"""

from bitfold.passes import canonical, learned, multless, quant, sparse, transforms
from bitfold.passes.registry import BitfoldPass, create, describe, get_pass, register, registered

__all__ = ["BitfoldPass", "canonical", "learned", "multless", "quant", "sparse", "transforms", "create", "describe", "get_pass", "register", "registered"]
