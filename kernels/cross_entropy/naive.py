"""Reference of the LM loss: cross-entropy of ``hidden @ weight.T`` with labels, -100 not scored."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token NLLs of the logits ``hidden (N, d) @ weight (V, d).T`` (float32), labels (N,)."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def logit_rows_reference_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's NLL (N,) float32 (0 where the label is -100); ``logits`` (N, V) is overwritten with the
    gradient of the NLL sum with respect to it: softmax - one-hot of the label (0 rows where ignored)."""
    x = logits.float()
    lse = x.logsumexp(-1)
    scored = labels != IGNORE_INDEX
    target = labels.clamp_min(0)[:, None]
    nll = torch.where(scored, lse - x.gather(1, target)[:, 0], 0.0)
    grad = torch.exp(x - lse[:, None]).scatter_add_(1, target, -torch.ones_like(target, dtype=x.dtype))
    logits.copy_(grad * scored[:, None])
    return nll
