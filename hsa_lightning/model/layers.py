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


def nll_of_slice(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int,
    slice_nll=nll_of_slice,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token NLLs and the number of scored tokens, without a (B*T, V) fp32 logit tensor.

    Logits are built ``chunk_tokens`` rows at a time and recomputed in backward (checkpointed), so peak
    memory is one slice's logits. Labels equal to -100 are ignored. ``slice_nll`` scores one slice; a
    compiled one fuses the float cast, log-softmax and its gradient.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    # split, not slicing: the backward joins the slices' gradients in one concatenation, where each slice
    # would add a zero-filled full-size gradient
    for h_part, y_part in zip(h.split(chunk_tokens), y.split(chunk_tokens)):
        total = total + torch.utils.checkpoint.checkpoint(slice_nll, h_part, head_weight, y_part, use_reentrant=False)
    return total, (y != -100).sum()

