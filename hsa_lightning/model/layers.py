"""Small building blocks whose ``reset_parameters`` give the model's init, so a model built on the
meta device and materialised by the strategy starts exactly like one built eagerly."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Recomputable(nn.Module):
    """A unit of the model (a block, the chunk encoder) that subclasses implement as ``compute``.
    With ``recompute`` set, training keeps only its inputs and recomputes its activations in backward
    (activation checkpointing). It happens inside the module's call, so a sharding wrapper around the
    unit gathers its parameters once for both passes, and parameter names stay those of the module."""

    recompute = False

    def forward(self, *args, **kwargs):
        if self.recompute and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.compute, *args, use_reentrant=False, **kwargs)
        return self.compute(*args, **kwargs)

    def compute(self, *args, **kwargs):
        raise NotImplementedError


class Linear(nn.Linear):
    """nn.Linear without bias, initialised N(0, std)."""

    def __init__(self, in_features: int, out_features: int, std: float):
        self.std = std
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings: int, dim: int, std: float):
        self.std = std
        super().__init__(num_embeddings, dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
