"""SwiGLU: the dense feed-forward, down(silu(gate(x)) * up(x))."""
from __future__ import annotations

from typing import Optional

from torch import nn

from hsa_lightning.errors import ConfigError
from hsa_lightning.model.ffn import FFN, SwiGLUMLP, default_hidden


class SwiGLU(FFN):
    def __init__(self, hidden_size: Optional[int] = None, multiple_of: int = 64):
        """``hidden_size`` default: 8/3 * d_model rounded up to a multiple of ``multiple_of``."""
        if hidden_size is not None and hidden_size < 1:
            raise ConfigError(f"SwiGLU hidden_size={hidden_size} must be >= 1")
        if multiple_of < 1:
            raise ConfigError(f"SwiGLU multiple_of={multiple_of} must be >= 1")
        self.hidden_size, self.multiple_of = hidden_size, multiple_of

    def build(self, d_model: int, layer_index: int, init_std: float, out_std: float) -> nn.Module:
        return SwiGLUMLP(d_model, self.hidden_size or default_hidden(d_model, self.multiple_of), init_std, out_std)
