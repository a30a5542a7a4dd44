"""RoPE: rotary position embedding (half-split pairs), angles computed in float64 for long contexts."""
from __future__ import annotations

import torch

from hsa_lightning.errors import ConfigError
from hsa_lightning.model.position import PositionEncoding


class RoPE(PositionEncoding):
    def __init__(self, theta: float = 10000.0):
        if theta <= 0:
            raise ConfigError(f"RoPE theta={theta} must be > 0")
        self.theta = theta

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        inv_freq = self.theta ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
        angles = positions.to(torch.float64)[:, None] * inv_freq  # (T, D/2)
        cos = angles.cos().to(torch.float32)[:, None, :]
        sin = angles.sin().to(torch.float32)[:, None, :]
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
