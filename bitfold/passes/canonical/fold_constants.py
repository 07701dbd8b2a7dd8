"""fold-constants: evaluate every node whose inputs are all constant and replace it by its value.

Rewrites: nodes computing from initializers/Constants only (shape arithmetic, casts of constants, weight
transposes...) become initializers; ``Shape`` of a statically known shape becomes a constant.
Guarantees: exact equivalence (values are computed by onnxscript's reference evaluator, the same ONNX semantics).
Needs: nothing. Leaves alone: nodes whose inputs or outputs exceed the size limits (so huge weights are not
duplicated), and ops with side effects or randomness. The work is onnxscript's constant folder; this pass gives it
a registered name, typed limits and a counted result.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnxscript.optimizer

from bitfold.passes.registry import BitfoldPass, register


@dataclasses.dataclass(frozen=True)
class FoldConstantsConfig:
    input_size_limit: int = dataclasses.field(
        default=1 << 20, metadata={"doc": "largest input tensor (elements) a folded node may read"}
    )
    output_size_limit: int = dataclasses.field(
        default=1 << 22, metadata={"doc": "largest tensor (elements) a folded node may produce"}
    )

    def __post_init__(self) -> None:
        if self.input_size_limit < 0 or self.output_size_limit < 0:
            raise ValueError("size limits must be >= 0")


@register
class FoldConstants(BitfoldPass):
    """Replace nodes whose inputs are all constant by their computed values (onnxscript's folder)."""

    name = "fold-constants"
    family = "canonical"
    Config = FoldConstantsConfig

    def rewrite(self, model: ir.Model) -> int:
        wiring = {node: tuple(node.inputs) for node in model.graph}
        onnxscript.optimizer.fold_constants(
            model,
            input_size_limit=self.config.input_size_limit,
            output_size_limit=self.config.output_size_limit,
        )
        after = set(model.graph)
        created = [node for node in model.graph if node not in wiring]
        for node in created:
            self.stamp(node, [])
        removed = sum(1 for node in wiring if node not in after)
        rewired = sum(1 for node, inputs in wiring.items() if node in after and tuple(node.inputs) != inputs)
        return removed + len(created) + rewired
