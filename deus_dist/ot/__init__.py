"""Optimal transport for layer fusion: solvers, unit features and the alignment of a block's spaces."""
