"""hsa-lightning: train, ablate and evaluate Hierarchical Sparse Attention language models."""

__version__ = "0.1.0"
