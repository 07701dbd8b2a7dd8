"""Sparsity: pruning by magnitude, Wanda and SparseGPT under unstructured, N:M and block patterns."""

from bitfold.passes.sparse.prune import Prune

__all__ = ["Prune"]
