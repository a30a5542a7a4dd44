"""Reference routed experts: a plain loop over tokens and their chosen experts (slow, obviously right)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def routed_experts_reference(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                             w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_j weights[n, j] * SwiGLU_{indices[n, j]}(x[n]).

    x (N, d); indices, weights (N, k); w_gate, w_up (E, d, h); w_down (E, h, d). A weight of 0 marks a
    dropped assignment.
    """
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for e, w in zip(indices[n].tolist(), weights[n]):
            h = F.silu(x[n] @ w_gate[e]) * (x[n] @ w_up[e])
            out[n] = out[n] + w * (h @ w_down[e])
    return out
