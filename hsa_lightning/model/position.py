"""Position-encoding plugin kind: how SWA layers and the chunk encoder see token positions.

Retrieval never uses it; HSA attention only with the ``position_in_hsa`` ablation (the paper's HSA is NoPE).
"""
from __future__ import annotations

import torch

from hsa_lightning.registry import Registry, kind_registry


class PositionEncoding:
    """Stateless: applies positions to queries/keys of shape (B, T, H, D) given positions (T,)."""

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


POSITION: Registry[PositionEncoding] = kind_registry("position", PositionEncoding)
