"""Canonical passes: cleanup and exact simplifications every recipe starts with."""

from bitfold.passes.canonical.constants_to_initializers import ConstantsToInitializers
from bitfold.passes.canonical.fold_batchnorm import FoldBatchNorm
from bitfold.passes.canonical.fold_constants import FoldConstants
from bitfold.passes.canonical.remove_dead import RemoveDead
from bitfold.passes.canonical.remove_identity import RemoveIdentity

__all__ = ["ConstantsToInitializers", "FoldBatchNorm", "FoldConstants", "RemoveDead", "RemoveIdentity"]

#: The default cleanup sequence: what `bitfold optimize` runs with no recipe and what `bitfold demo` runs.
CANONICAL = ("fold-constants", "constants-to-initializers", "remove-identity", "fold-batchnorm", "remove-dead")
