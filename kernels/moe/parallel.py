"""Routed experts, grouped: assignments sorted by expert, one grouped matmul per projection.

``torch._grouped_mm`` multiplies contiguous row groups by their expert's weight in one call (CUDA
bf16 on Hopper, and CPU); elsewhere a padded batched matmul does the same. Outputs are put back by
(token, slot) with unique indices and summed over slots: no atomics, so results are deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def routed_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                   w_up: torch.Tensor, w_down: torch.Tensor, capacity: Optional[int] = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``routed_experts_reference``; returns (out, assignments each expert was asked for,
    dropped assignments).

    With ``capacity``, each expert keeps its first ``capacity`` assignments in token order; the rest
    are dropped (they contribute nothing, the shared expert and the residual still carry the token).
    """
    N, d = x.shape
    k, E = indices.shape[1], w_gate.shape[0]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # grouped by expert, token order inside a group
    requested = counts = torch.bincount(flat, minlength=E)
    dropped = torch.zeros((), dtype=torch.int64, device=x.device)
    if capacity is not None:
        expert_sorted = flat[order]
        starts = torch.cumsum(counts, 0) - counts
        keep = torch.arange(order.numel(), device=x.device) - starts[expert_sorted] < capacity
        dropped = (~keep).sum()
        order = order[keep]
        counts = counts.clamp(max=capacity)
    xs = x[order // k]
    h = F.silu(_grouped(xs, w_gate, counts)) * _grouped(xs, w_up, counts)
    ys = _grouped(h, w_down, counts) * weights.reshape(-1)[order, None].to(h.dtype)
    out = torch.zeros(N * k, d, dtype=ys.dtype, device=x.device)
    out[order] = ys  # unique positions: a plain scatter, deterministic
    return out.view(N, k, d).sum(1), requested, dropped  # in the compute dtype, like a Linear under autocast


def _grouped(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` in consecutive groups of ``counts[e]`` rows, each times ``w[e]``."""
    dtype = torch.get_autocast_dtype(a.device.type) if torch.is_autocast_enabled(a.device.type) else a.dtype
    a, w = a.to(dtype), w.to(dtype)
    if _grouped_mm_supported(a):
        return torch._grouped_mm(a, w, offs=torch.cumsum(counts, 0).to(torch.int32))
    return _padded_bmm(a, w, counts)


def _grouped_mm_supported(a: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if a.device.type == "cpu":
        return a.dtype in (torch.float32, torch.bfloat16)
    return a.is_cuda and a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device)[0] >= 9


def _padded_bmm(a: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    E = w.shape[0]
    expert = torch.repeat_interleave(torch.arange(E, device=a.device), counts)
    slot = torch.arange(a.shape[0], device=a.device) - (torch.cumsum(counts, 0) - counts)[expert]
    padded = a.new_zeros(E, int(counts.max()) if a.shape[0] else 0, a.shape[1])
    padded[expert, slot] = a
    return torch.bmm(padded, w)[expert, slot]
