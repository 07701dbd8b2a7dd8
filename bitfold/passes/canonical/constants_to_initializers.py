"""constants-to-initializers: turn ``Constant`` nodes holding tensors into graph initializers.

Exporters such as Paddle2ONNX keep every weight in a ``Constant`` node; weight-rewriting passes look for
initializers, so this runs first in any recipe that reads weights.
Guarantees: exact equivalence. Leaves alone: Constants that are graph outputs' direct producers inside
subgraphs, non-tensor constants (``value_ints`` and friends) unless ``lift_all`` is set, and tensors with fewer
than ``min_elements`` elements. The work is onnx-ir's ``LiftConstantsToInitializersPass``.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from bitfold.passes.registry import BitfoldPass, register


@dataclasses.dataclass(frozen=True)
class ConstantsToInitializersConfig:
    min_elements: int = dataclasses.field(
        default=0, metadata={"doc": "lift only constants with at least this many elements (0 lifts all)"}
    )
    lift_all: bool = dataclasses.field(
        default=False, metadata={"doc": "also lift value_int/value_floats/... constants, not only tensors"}
    )

    def __post_init__(self) -> None:
        if self.min_elements < 0:
            raise ValueError("min_elements must be >= 0")


@register
class ConstantsToInitializers(BitfoldPass):
    """Lift Constant nodes into initializers so weight passes can find them."""

    name = "constants-to-initializers"
    family = "canonical"
    Config = ConstantsToInitializersConfig

    def rewrite(self, model: ir.Model) -> int:
        before = _constant_count(model.graph)
        LiftConstantsToInitializersPass(lift_all_constants=self.config.lift_all, size_limit=self.config.min_elements)(
            model
        )
        return before - _constant_count(model.graph)


def _constant_count(graph: ir.Graph) -> int:
    return sum(1 for node in ir.traversal.RecursiveGraphIterator(graph) if node.op_type == "Constant" and not node.domain)
