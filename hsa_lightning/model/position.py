"""Position-encoding plugin kind: how SWA layers and the chunk encoder see token positions.

Retrieval and HSA attention never use it (NoPE by design); only local attention does.
"""
from __future__ import annotations

import torch

from hsa_lightning.registry import Registry, kind_registry


class PositionEncoding:
    """Stateless: applies positions to queries/keys of shape (B, T, H, D) given positions (T,)."""

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


POSITION: Registry[PositionEncoding] = kind_registry("position", PositionEncoding)
