"""NoPE: no position encoding; attention sees content only (causality still orders tokens)."""
from __future__ import annotations

import torch

from hsa_lightning.model.position import PositionEncoding


class NoPE(PositionEncoding):
    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x
