"""FFN plugin kind: builds the feed-forward module of every block (dense SwiGLU, MoE)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hsa_lightning.model.layers import Linear
from hsa_lightning.registry import Registry, kind_registry


class FFN:
    """A factory: ``build(d_model, layer_index, init_std, out_std)`` returns an nn.Module mapping (B, T, d) -> (B, T, d).

    ``layer_index`` is -1 for the chunk encoder; MoE uses it to keep the first layer dense.
    ``out_std`` is the init std of the projection back into the residual stream.
    """

    def build(self, d_model: int, layer_index: int, init_std: float, out_std: float) -> nn.Module:
        raise NotImplementedError


def round_up(n: int, multiple_of: int) -> int:
    return -(-n // multiple_of) * multiple_of


def default_hidden(d_model: int, multiple_of: int) -> int:
    """The usual SwiGLU width: 8/3 * d_model rounded up to a multiple of ``multiple_of``."""
    return round_up(8 * d_model // 3, multiple_of)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense FFN, and the shared expert of MoE layers."""

    def __init__(self, d_model: int, hidden: int, std: float, out_std: float):
        super().__init__()
        self.gate = Linear(d_model, hidden, std)
        self.up = Linear(d_model, hidden, std)
        self.down = Linear(hidden, d_model, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class RoutedFFN(nn.Module):
    """An FFN with a router (mixture of experts). The training loop adds ``take_aux_loss()`` to the
    loss, logs ``routing_stats()`` and calls ``after_optimizer_step()`` once per optimizer step."""

    def take_aux_loss(self) -> Optional[torch.Tensor]:
        """The auxiliary loss of the last training forward (None if disabled), then forgotten."""
        return None

    def routing_stats(self) -> dict[str, torch.Tensor]:
        """Scalars about routing since the last optimizer step (load balance, dropped tokens)."""
        return {}

    def after_optimizer_step(self) -> None:
        """Update router state that is not trained by the loss (e.g. balancing biases)."""

    def inactive_parameters(self) -> int:
        """Parameters a token does not use (experts it is not routed to), for active-parameter counts."""
        return 0


FFN_REGISTRY: Registry[FFN] = kind_registry("ffn", FFN)
