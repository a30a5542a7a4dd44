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
        cos, sin = rope_table(positions, half, self.theta)
        cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, D/2)
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# An opaque op, so torch.compile keeps the (T, D/2) table a tensor: traced, inductor fused the float64 pow,
# cos and sin into every element of q and k (and their gradients), which took an eighth of a training step.
@torch.library.custom_op("hsa_lightning::rope_table", mutates_args=())
def rope_table(positions: torch.Tensor, half: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin) of positions (T,) x theta^(-i / half), i < half; the angles in float64."""
    inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * inv_freq
    return angles.cos().to(torch.float32), angles.sin().to(torch.float32)


@rope_table.register_fake
def _(positions, half, theta):
    shape = (positions.shape[0], half)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)
