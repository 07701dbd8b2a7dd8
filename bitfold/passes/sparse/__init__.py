"""Sparsity: pruning by magnitude, Wanda and SparseGPT under unstructured, N:M and block patterns; dense-and-sparse
outlier splitting."""

from bitfold.passes.sparse.prune import Prune
from bitfold.passes.sparse.split_outliers import SplitOutliers

__all__ = ["Prune", "SplitOutliers"]
