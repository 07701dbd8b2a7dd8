"""Equivalent transforms: passes that change weights and activations without changing what the model computes."""

from bitfold.passes.transforms.affine import Affine
from bitfold.passes.transforms.fold_norm_affine import FoldNormAffine
from bitfold.passes.transforms.lowrank_split import LowrankSplit
from bitfold.passes.transforms.rotate import Rotate
from bitfold.passes.transforms.smooth import Smooth

__all__ = ["Affine", "FoldNormAffine", "LowrankSplit", "Rotate", "Smooth"]
